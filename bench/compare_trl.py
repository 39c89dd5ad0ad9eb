"""nash-lm vs TRL's NashMDTrainer (trl 1.13.0) on the identical workload, back to back in one session.

    .venv/bin/python bench/compare_trl.py [--runs 5] [--trl-python venv-trl/bin/python] [--trl-defaults]
        [--steps 128] [--out bench/results/compare_trl.jsonl]

Alternates one TRL run (`bench/trl_peer.py` under the TRL venv's Python, `--trl-python` or $TRL_PYTHON; see that
file for the venv) and one nash-lm run (`bench/trl_workload.py`), `--runs` times, so both sides see the same
machine; both are fresh processes with the same environment and the same workload (nash-lm's
`nashmd_bench.Workload`, passed to the peer as JSON), and both exclude building (and nash-lm its compilation)
from wall_s. Every run passes one gate: before it, a wait (at most --wait-max s) until the machine is >= 90%
idle over 3 s; after it, the run counts as clean when the CPU seconds other processes used during its training
are under 10% of its own; an unclean run is retried, at most --max-attempts times (the last one is kept, marked
unclean).

Prints every run's headline and a summary: medians of the clean runs of each side and the ratio of nash-lm's
median prompts/s to the peer's. Appends every run and the summary to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nashmd_bench as nb  # noqa: E402
import trl_peer  # noqa: E402  (its WORKLOAD names the fields the peer takes; torch is imported only to run it)

from nash_lm import distributed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "compare_trl.jsonl")


def idle_pct(window: float = 3.0) -> float:
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]

    t1, i1 = read()
    time.sleep(window)
    t2, i2 = read()
    return 100.0 * (i2 - i1) / max(1, t2 - t1)


def wait_idle(wait_max: float) -> float:
    waited, idle = 0.0, idle_pct()
    while idle < 90 and waited < wait_max:
        waited += 3
        idle = idle_pct()
    return idle


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output:\n" + text[-2000:])


def clean(rec: dict) -> bool:
    return rec["foreign_cpu_s_during_run"] < 0.10 * rec["own_cpu_s"]


def run_gated(side: str, command: list[str], env: dict, wait_max: float, max_attempts: int) -> dict:
    """One run of `command` (its last stdout line is its JSON record) through the gate of the module docstring."""
    for attempt in range(1, max_attempts + 1):
        idle = wait_idle(wait_max)
        p = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{side}: {' '.join(command)} exited {p.returncode}\n{p.stderr[-3000:]}")
        rec = last_json(p.stdout)
        rec["clean"] = clean(rec)
        print(f"[compare] {side} attempt {attempt} (idle before {idle:.0f}%) clean={int(rec['clean'])}",
              file=sys.stderr)
        if rec["clean"]:
            break
    return rec


def headline(rec: dict) -> dict:
    keys = ("prompts_per_s", "wall_s", "median_step_s", "first_step_s", "gen_tokens_per_s_actual",
            "gen_tokens_per_s_nominal", "peak_rss_mib", "own_cpu_s", "foreign_cpu_s_during_run", "compile_s",
            "build_s", "train_loss", "gen_tokens_actual", "clean")
    return {k: rec.get(k) for k in keys}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "venv-trl/bin/python"),
                    help="the Python of the TRL venv (see bench/trl_peer.py)")
    ap.add_argument("--trl-defaults", action="store_true", help="peer with TRL's default gradient checkpointing")
    ap.add_argument("--wait-max", type=float, default=180.0)
    ap.add_argument("--max-attempts", type=int, default=6)
    ap.add_argument("--ours-args", default="", help="extra arguments for bench/trl_workload.py")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    args.trl_python = os.path.abspath(args.trl_python)
    if not os.path.isfile(args.trl_python):
        ap.error(f"--trl-python={args.trl_python}: no such interpreter (build the TRL venv: see bench/trl_peer.py)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" or "device_count" not in v}
    workload = {k: v for k, v in dataclasses.asdict(nb.Workload(steps=args.steps)).items() if k in trl_peer.WORKLOAD}
    peer_cmd = [args.trl_python, os.path.join(HERE, "trl_peer.py"), "--workload", json.dumps(workload)] + (
        ["--trl-defaults"] if args.trl_defaults else [])
    ours_cmd = [sys.executable, os.path.join(HERE, "trl_workload.py"), "--steps", str(args.steps), "--out", "",
                *args.ours_args.split()]
    session = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runs = {"peer": [], "nash_lm": []}

    def log(side, rec):
        runs[side].append(rec)
        h = headline(rec)
        print(json.dumps({"side": side, **h}))
        if args.out:
            distributed.append_line(args.out, json.dumps({"session": session, "side": side, "record": rec}))

    for i in range(args.runs):
        log("peer", run_gated("peer", peer_cmd, env, args.wait_max, args.max_attempts))
        log("nash_lm", run_gated("nash_lm", ours_cmd, env, args.wait_max, args.max_attempts))

    def med(side, key):
        vals = [r[key] for r in runs[side] if r["clean"]] or [r[key] for r in runs[side]]
        return statistics.median(vals)

    summary = {"session": session, "summary": True, "runs_each": args.runs,
               "clean": {s: sum(r["clean"] for r in v) for s, v in runs.items()},
               "peer_config": runs["peer"][0].get("config"),
               "peer_prompts_per_s_median": med("peer", "prompts_per_s"),
               "nash_lm_prompts_per_s_median": med("nash_lm", "prompts_per_s"),
               "peer_prompts_per_s_runs": [r["prompts_per_s"] for r in runs["peer"]],
               "nash_lm_prompts_per_s_runs": [r["prompts_per_s"] for r in runs["nash_lm"]],
               "peer_median_step_s": med("peer", "median_step_s"),
               "nash_lm_median_step_s": med("nash_lm", "median_step_s"),
               "peer_gen_tokens_per_s_actual": med("peer", "gen_tokens_per_s_actual"),
               "nash_lm_gen_tokens_per_s_actual": med("nash_lm", "gen_tokens_per_s_actual"),
               "peer_peak_rss_mib": med("peer", "peak_rss_mib"),
               "nash_lm_peak_rss_mib": med("nash_lm", "peak_rss_mib"),
               "nash_lm_compile_s": med("nash_lm", "compile_s"),
               "machine": runs["nash_lm"][0].get("machine"), "peer_versions": runs["peer"][0].get("versions"),
               "nash_lm_versions": runs["nash_lm"][0].get("versions")}
    summary["ratio_prompts_per_s"] = summary["nash_lm_prompts_per_s_median"] / summary["peer_prompts_per_s_median"]
    summary["target_ratio_min"] = 10.0
    print(json.dumps(summary))
    if args.out:
        distributed.append_line(args.out, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
