"""Step time against the number of new tokens: nash-lm and the TRL peer, N in {32, 64, 128, 256, 512}.

    .venv/bin/python bench/length_scaling.py [--lengths 32,64,128,256,512] [--steps 11] [--peer-steps 6]
        [--no-peer] [--trl-python venv-trl/bin/python] [--smoke] [--out bench/results/length_scaling.jsonl]

The workload is the TRL workload (bench/trl_workload.py) with only the completion length N changed (for y and
y'), and max_pos raised to 16 + max(N) = 528 for every N on both sides (RoPE models: max_pos changes no parameter
and no computation, it only has to admit the longest sequence).

nash-lm: one process, for each N a fresh build + AOT compile, then `--steps` training steps; the step time is
the median of the steps after the first (>= 5). Phase medians (policy sample, mixture sample, update) come from
the per-phase compiled functions (median of 5).

Peer: bench/trl_peer.py (TRL's NashMDTrainer, in the TRL venv: `--trl-python` or $TRL_PYTHON) with
`--workload '{"new_tokens": N, "max_pos": 528}' --steps S`. Its step time is the median of its `step_times_s`
after the first step. `--trl-defaults` runs the peer in TRL's default configuration (gradient
checkpointing on, no KV cache for either sample), the only one whose mixture samples are correct
(bench/trl_mixture_cache_check.md). At N = 512 a peer step takes tens of seconds (quadratic: the mixture
re-runs both models over the whole prefix at every token), so `--peer-steps` is small there and the median is
over fewer steps (the JSON records how many).

Growth: for each side, the log-log slope of step time against N over each doubling and the least-squares slope
over all N (1 = linear, 2 = quadratic), and t(512) / t(32) (16 = linear, 256 = quadratic). The summary also
gives the same slopes of nash-lm's analytic FLOPs per step (`nashmd_bench.phase_flops`, exact causal attention
included): the growth any exact implementation at a constant FLOP rate would show.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import nashmd_bench as nb  # noqa: E402
from common import machine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "length_scaling.jsonl")


def ours(n: int, max_pos: int, steps: int, phase_repeats: int, base: nb.Workload) -> dict:
    w = nb.Workload(**{**base.__dict__, "new_tokens": n, "max_pos": max_pos, "steps": steps})
    b = nb.build(w)
    phases = {}
    if phase_repeats:
        ph = nb.compile_phases(b)
        timed = nb.time_phases(b, ph, phase_repeats)
        phases = {k: round(v["median_s"], 5) for k, v in timed.items()}
    step_fn, compile_s = nb.compile_step(b)
    with nb.CpuMeter() as cpu:
        _, times, mets = nb.train(b, step_fn, steps)
    steady = times[1:]
    return {"side": "nash_lm", "model": {k: getattr(w, k) for k in ("d_model", "n_layers", "vocab")}, "new_tokens": n, "max_pos": max_pos, "steps": steps,
            "median_step_s": statistics.median(steady), "first_step_s": times[0],
            "step_times_s": [round(x, 5) for x in times], "compile_s": round(compile_s, 2),
            "gen_tokens_actual": sum(int(m["y_tokens"]) + int(m["y2_tokens"]) for m in mets),
            "phase_median_s": phases, **cpu.record()}


def ours_interleaved(lengths, max_pos: int, rounds: int, steps_per_round: int, base: nb.Workload) -> list[dict]:
    """All lengths compiled up front, then `rounds` round-robin passes of `steps_per_round` steps per length, so
    that a drifting host speed affects every length alike; median over all timed steps of each length."""
    built = {}
    for n in lengths:
        w = nb.Workload(**{**base.__dict__, "new_tokens": n, "max_pos": max_pos, "steps": rounds * steps_per_round})
        b = nb.build(w)
        fn, _ = nb.compile_step(b)
        built[n] = [b, fn, b.mut, nb.batch_order(w, rounds * steps_per_round + 1), 0, []]
    for _ in range(rounds):
        for n in lengths:
            b, fn, mut, order, k, times = built[n]
            for _ in range(steps_per_round + (k == 0)):  # one untimed warm-up step per length
                t = time.perf_counter()
                mut, m = fn(mut, nb.make_batch(b, order[k]))
                jax.block_until_ready(m)
                if k:
                    times.append(time.perf_counter() - t)
                k += 1
            built[n][2], built[n][4] = mut, k
    return [{"side": "nash_lm_interleaved", "new_tokens": n, "max_pos": max_pos, "rounds": rounds,
             "median_step_s": statistics.median(built[n][5]), "step_times_s": [round(x, 5) for x in built[n][5]]}
            for n in lengths]


def peer(n: int, max_pos: int, steps: int, trl_python: str, trl_defaults: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    extra = ["--trl-defaults"] if trl_defaults else []
    p = subprocess.run([trl_python, os.path.join(HERE, "trl_peer.py"), "--workload",
                        json.dumps({"new_tokens": n, "max_pos": max_pos}), "--steps", str(steps), *extra], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["new_tokens"] == n, rec["new_tokens"]
    steady = rec["step_times_s"][1:] or rec["step_times_s"]
    return {"side": "peer", "new_tokens": n, "max_pos": max_pos, "steps": rec["steps"],
            "median_step_s": statistics.median(steady), "first_step_s": rec["first_step_s"],
            "step_times_s": rec["step_times_s"], "time_breakdown_s": rec["time_breakdown_s"],
            "gen_tokens_actual": rec["gen_tokens_actual"], "own_cpu_s": rec["own_cpu_s"],
            "foreign_cpu_s_during_run": rec["foreign_cpu_s_during_run"],
            "loadavg_1m_before_after": rec["loadavg_1m_before_after"], "config": rec["config"]}


def growth(rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["new_tokens"])
    ns = [r["new_tokens"] for r in rows]
    ts = [r["median_step_s"] for r in rows]
    pairs = {f"{a}->{b}": math.log(tb / ta) / math.log(b / a) for a, b, ta, tb in zip(ns, ns[1:], ts, ts[1:])}
    lx, ly = [math.log(x) for x in ns], [math.log(y) for y in ts]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return {"loglog_slope_per_doubling": {k: round(v, 3) for k, v in pairs.items()},
            "loglog_slope_fit": round(slope, 3), "t_last_over_t_first": round(ts[-1] / ts[0], 2),
            "n_last_over_n_first": ns[-1] / ns[0], "median_step_s": dict(zip(map(str, ns), ts))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32,64,128,256,512")
    ap.add_argument("--steps", type=int, default=11, help="nash-lm steps per length (median over all but the first)")
    ap.add_argument("--peer-steps", default="6,6,6,4,3",
                    help="peer steps per length (one number, or one per length)")
    ap.add_argument("--phase-repeats", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--interleave", type=int, default=0,
                    help="nash-lm only: R round-robin rounds over all lengths (robust to host drift)")
    ap.add_argument("--peer-only", action="store_true")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="run the peer in TRL's default configuration (no KV cache: its only correct mixture)")
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "venv-trl/bin/python"),
                    help="the Python of the TRL venv (see bench/trl_peer.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, lengths 2 and 4, 3 steps, no peer (CI)")
    ap.add_argument("--out", default=RESULTS, help="JSONL file to append to ('' = none)")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    base = nb.Workload()
    if args.smoke:
        base = nb.SMOKE
        lengths, args.steps, args.no_peer, args.phase_repeats = [2, 4], 3, True, 0
    max_pos = base.prompt_len + max(lengths)
    peer_steps = [int(x) for x in args.peer_steps.split(",")]
    if len(peer_steps) == 1:
        peer_steps = peer_steps * len(lengths)
    session = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []

    def emit(rec):
        rec = {"session": session, **rec}
        rows.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("step_times_s",)}), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    if args.interleave:
        for rec in ours_interleaved(lengths, max_pos, args.interleave, 2, base):
            emit(rec)
        args.no_peer, args.peer_only = True, True
    for i, n in enumerate(lengths):  # interleaved per length, so both sides of a length see the same load
        if not args.peer_only:
            emit(ours(n, max_pos, args.steps, args.phase_repeats, base))
        if not args.no_peer:
            emit(peer(n, max_pos, peer_steps[i], args.trl_python, args.trl_defaults))
    summary = {"session": session, "summary": True, "lengths": lengths, "machine": machine(),
               "versions": nb.versions()}
    for side in ("nash_lm", "peer", "nash_lm_interleaved"):
        sr = [r for r in rows if r["side"] == side]
        if len(sr) >= 2:
            summary[side] = growth(sr)
    if len(lengths) >= 2:  # what the arithmetic alone implies (the median_step_s field holds FLOPs here)
        flops = [{"new_tokens": n, "median_step_s": nb.phase_flops(
            dataclasses.replace(base, new_tokens=n, max_pos=max_pos))["step"]} for n in lengths]
        summary["nash_lm_analytic_flops"] = growth(flops)
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
