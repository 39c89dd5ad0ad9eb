"""nash-lm's Nash-MD-PG step on exactly the TRL peer's workload (bench/trl_peer.py runs TRL on it).

    .venv/bin/python bench/trl_workload.py [--steps 128] [--new-tokens 32] [--max-pos 128] [--breakdown 5]
                                           [--judge reward|preference] [--out bench/results/trl_workload.jsonl]

Workload (the numbers bench/trl_peer.py gives TRL): Llama-style decoder, vocab 512, d_model 128,
2 layers, 4 heads (head_dim 32, no GQA), SwiGLU d_ff 512, RMSNorm, RoPE, max_pos 128, untied LM head, f32
(656,000 parameters); reference = copy of the initial policy; judge = a reward model with the same trunk (different
seed) and P(y > y') = sigmoid(r(y) - r(y')), read at the last real token (nash-lm's 'reward' judge, the same
computation as TRL's reward-model path; `--judge preference` swaps in the pairwise preference head instead);
256 prompts of BOS + 15 ids drawn with random.Random(0) as the peer draws them; 32 new tokens for y ~ pi and for
y' ~ the token-level geometric mixture (coefficient 0.5 on the reference); KL coefficient tau = 0.1;
temperature 1; EOS allowed (tokens after the first EOS masked); batch 8; 128 steps (4 reshuffled epochs);
AdamW lr 1e-5 with linear decay to 0, no warmup, weight decay 0, global-norm clip 1.0 (the HF Trainer's default
max_grad_norm, which the peer runs with).

Algorithmic difference (same work, different estimator): nash-lm's loss puts the KL in as a per-token
reward-to-go (sum over m >= n); TRL's multiplies each token's score by that token's log-ratio only. The cost of
either is a cumsum over [8, 32]; the FLOPs are the same.

Timing follows the peer: `wall_s` is the training loop only (all `--steps` steps, the first included), with
model building (`build_s`) and XLA compilation (`compile_s`, an explicit AOT `lower().compile()` before the
loop) reported separately; `first_step_s` is the first executed step (after compilation). Threads: XLA's CPU
client uses one intra-op thread per core; on the 2-core benchmark host that is 2, the peer's
`torch.set_num_threads(2)`.

Prints one JSON line (the last line of stdout) with the peer's fields and appends it to --out.
`--breakdown R` also compiles each phase on its own and reports the median of R timings of each (the pair
y, y' from one decode loop as the step samples it; for comparison y alone, y' alone and a plain sample of the
same length for the mixture/plain ratio; judge; update) and the analytic FLOPs of each.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nashmd_bench as nb  # noqa: E402
from common import machine  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trl_workload.jsonl")


def run(w: nb.Workload, breakdown: int = 0, tag: str = "") -> dict:
    t0 = time.perf_counter()
    b = nb.build(w)
    build_s = time.perf_counter() - t0
    step_fn, compile_s = nb.compile_step(b)
    phases = None
    if breakdown:
        ph = nb.compile_phases(b)
        timed = nb.time_phases(b, ph, breakdown)
        flops = nb.phase_flops(w)
        phases = {k: {"median_s": round(v["median_s"], 5), "runs_s": v["runs_s"]} for k, v in timed.items()}
        phases["mixture_over_plain"] = round(timed["sample_mixture"]["median_s"] / timed["sample_plain_ref"]["median_s"], 3)
        phases["pair_over_separate"] = round(timed["sample_pair"]["median_s"] / (
            timed["sample_policy"]["median_s"] + timed["sample_mixture"]["median_s"]), 3)
        phases["sum_of_phases_s"] = round(sum(timed[k]["median_s"] for k in ("sample_pair", "judge", "update")), 5)
        phases["flops"] = {k: flops[k] for k in ("sample_pair", "sample_policy", "sample_mixture", "judge", "update",
                                                 "step")}
    with nb.CpuMeter() as cpu:
        t1 = time.perf_counter()
        mut, times, mets = nb.train(b, step_fn, w.steps)
        wall = time.perf_counter() - t1
    prompts = w.steps * w.batch
    y_tok = sum(int(m["y_tokens"]) for m in mets)
    y2_tok = sum(int(m["y2_tokens"]) for m in mets)
    srt = sorted(times)
    steady = times[1:] if len(times) > 1 else times
    rec = {
        "impl": "nash_lm.train.step.policy_step (one jax.jit)",
        "config": f"nash-lm bench (judge={w.judge}, f32, AOT-compiled, donated state){tag}",
        "decode_rules": w.decode_rules,
        "steps": w.steps, "batch": w.batch, "prompt_len": w.prompt_len, "new_tokens": w.new_tokens,
        "max_pos": w.max_pos,
        "wall_s": round(wall, 3), "build_s": round(build_s, 3), "compile_s": round(compile_s, 3),
        "prompts_per_s": round(prompts / wall, 3),
        "gen_tokens_per_s_nominal": round(prompts * 2 * w.new_tokens / wall, 1),
        "gen_tokens_per_s_actual": round((y_tok + y2_tok) / wall, 1),
        "first_step_s": round(times[0], 4), "median_step_s": round(srt[len(srt) // 2], 5),
        "max_step_s": round(srt[-1], 4),
        "steady_prompts_per_s_excl_first_step": round(len(steady) * w.batch / sum(steady), 3),
        "gen_tokens_actual": y_tok + y2_tok, "gen_tokens_nominal": prompts * 2 * w.new_tokens,
        "eos_rate_policy": round(sum(int(m["y_eos_rows"]) for m in mets) / prompts, 4),
        "eos_rate_mixture": round(sum(int(m["y2_eos_rows"]) for m in mets) / prompts, 4),
        "peak_rss_mib": round(nb.peak_rss_mib(), 1),
        "params": b.n_params,
        "train_loss": round(sum(float(m["loss"]) for m in mets) / len(mets), 6),
        "last_metrics": {k: round(float(v), 6) for k, v in mets[-1].items() if k != "finite"},
        **cpu.record(),
        "step_times_s": [round(x, 4) for x in times],
        "phases": phases,
        "nproc": os.cpu_count(),
        "versions": nb.versions(),
        "machine": machine(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser()
    d = nb.Workload()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens)
    ap.add_argument("--max-pos", type=int, default=d.max_pos)
    ap.add_argument("--judge", choices=("reward", "preference"), default=d.judge)
    ap.add_argument("--breakdown", type=int, default=0, help="also time each phase R times (median)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps (CI)")
    ap.add_argument("--decode-rules", choices=("default", "training"), default=d.decode_rules,
                    help="the sampler's layout (PolicyHParams.decode_rules: the default decode rules or None)")
    ap.add_argument("--out", default=RESULTS, help="JSONL file to append to ('' = none)")
    args = ap.parse_args(argv)
    w = nb.Workload(steps=args.steps, new_tokens=args.new_tokens, max_pos=args.max_pos, judge=args.judge,
                    decode_rules=args.decode_rules)
    if args.smoke:
        w = dataclasses.replace(nb.SMOKE, judge=args.judge, decode_rules=args.decode_rules)
    rec = run(w, breakdown=args.breakdown)
    line = json.dumps(rec)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return rec


if __name__ == "__main__":
    main()
