"""MFU of the Nash-MD-PG step on a compute-bound workload, whole step and by phase.

    .venv/bin/python bench/mfu.py [--repeats 5] [--smoke] [--out bench/results/mfu.jsonl]

Workload: Llama-style decoder, d_model 512, 8 layers, 8 heads (head_dim 64, no GQA), SwiGLU d_ff 2048, vocabulary
8192, untied head, f32 (41.9M parameters); reference = copy of the initial policy; reward-model judge with the
same trunk; batch 32 prompts of 128 tokens, 128 new tokens for y and for y' (mixture coefficient 0.5, tau 0.1,
temperature 1, AdamW).

Measured in one process: the f32 matmul rate (`nash_lm.train.metrics.measure_peak_flops`, square matmuls of 512,
1024 and 2048, best of 5 each, the best size is the peak; measured before and after the workload and the higher
value is used, so MFU is never flattered by a slow peak measurement); the whole compiled step (median of
`--repeats` runs); and each phase compiled on its own (median of `--repeats` interleaved rounds):
  sampling = y ~ pi and y' ~ mixture from one decode loop of 128 KV-cached steps (the policy on 2B rows, the
             reference on the B y' rows), as the step samples them; y alone and y' alone are also timed,
  judge    = reward model on (x, y) and (x, y'),
  update   = reference log-probs on (x, y) + policy forward and backward on (x, y) + AdamW
             ("forward + backward on the sampled pairs").
FLOPs are analytic model FLOPs (`nash_lm.train.algorithms.step_flops`, split by phase in nashmd_bench.phase_flops:
2 per multiply-add, causal attention over the attended prefix, LM head included, embedding gather excluded;
backward = 2x forward). MFU = analytic FLOPs / seconds / measured peak. Sampling tokens/s = 2·B·N / sampling
seconds (y and y'), and plain vs mixture decode separately.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nashmd_bench as nb  # noqa: E402
from common import machine  # noqa: E402

import jax  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mfu.jsonl")

BIG = nb.Workload(vocab=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=2048, max_pos=256,
                  prompt_len=128, new_tokens=128, batch=32, n_prompts=256, steps=1, lr=1e-5)
SMOKE = nb.SMOKE


def run(w: nb.Workload, repeats: int, skip_step: bool = False, peak_sizes=(512, 1024, 2048),
        step_repeats: int | None = None) -> dict:
    step_repeats = repeats if step_repeats is None else step_repeats
    peak0 = nb.matmul_peak(peak_sizes)
    t0 = time.perf_counter()
    b = nb.build(w)
    build_s = time.perf_counter() - t0
    flops = nb.phase_flops(w)
    phases = nb.compile_phases(b)
    compile_s = {k: round(v[1], 2) for k, v in phases.items() if not k.startswith("_")}
    with nb.CpuMeter() as cpu_ph:
        timed = nb.time_phases(b, phases, repeats)
    step = None
    if not skip_step:  # the whole step, one jit, donated state; a fresh batch each run
        step_fn, c = nb.compile_step(b)
        compile_s["step"] = round(c, 2)
        order = nb.batch_order(w, step_repeats + 1)
        mut, times = b.mut, []
        with nb.CpuMeter() as cpu_st:
            for r in range(step_repeats + 1):
                batch = nb.make_batch(b, order[r])
                t = time.perf_counter()
                mut, m = step_fn(mut, batch)
                jax.block_until_ready((mut, m))
                times.append(time.perf_counter() - t)
        step = {"median_s": statistics.median(times[1:]), "runs_s": [round(x, 4) for x in times[1:]],
                "first_s": round(times[0], 4), **cpu_st.record()}
    peak1 = nb.matmul_peak(peak_sizes)
    peak = max(peak0["peak_flops"], peak1["peak_flops"])

    med = {k: v["median_s"] for k, v in timed.items()}
    sampling_s = med["sample_pair"]  # y and y' from one decode loop, as the step samples them
    rec = {
        "metric": "mfu", "model": w.model_config().to_dict(), "params": b.n_params,
        "batch": w.batch, "prompt_len": w.prompt_len, "new_tokens": w.new_tokens, "repeats": repeats, "decode_rules": w.decode_rules,
        "peak_flops": peak, "peak_before": peak0, "peak_after": peak1,
        "flops": {k: flops[k] for k in ("sample_pair", "sample_policy", "sample_mixture", "sampling", "judge",
                                        "update", "step")},
        "phase_median_s": {k: round(v, 4) for k, v in med.items()},
        "phase_runs_s": {k: v["runs_s"] for k, v in timed.items()},
        "update": {"seconds": med["update"], "flops_per_s": flops["update"] / med["update"],
                   "mfu": flops["update"] / med["update"] / peak, "target_mfu_min": 0.40},
        "sampling": {"seconds": sampling_s, "flops_per_s": flops["sampling"] / sampling_s,
                     "mfu": flops["sampling"] / sampling_s / peak,
                     "tokens_per_s": 2 * w.batch * w.new_tokens / sampling_s,
                     "plain_tokens_per_s": w.batch * w.new_tokens / med["sample_policy"],
                     "mixture_tokens_per_s": w.batch * w.new_tokens / med["sample_mixture"],
                     "mixture_over_plain": med["sample_mixture"] / med["sample_plain_ref"],
                     "pair_over_separate": sampling_s / (med["sample_policy"] + med["sample_mixture"]),
                     "target_mixture_over_plain_max": 2.2},
        "judge": {"seconds": med["judge"], "mfu": flops["judge"] / med["judge"] / peak},
        "sum_of_phases": {"seconds": sampling_s + med["judge"] + med["update"],
                          "mfu": flops["step"] / (sampling_s + med["judge"] + med["update"]) / peak},
        "cpu_phases": cpu_ph.record(),
        "build_s": round(build_s, 2), "compile_s": compile_s, "peak_rss_mib": round(nb.peak_rss_mib(), 1),
        "versions": nb.versions(), "machine": machine(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if step is not None:
        step.update(flops_per_s=flops["step"] / step["median_s"], mfu=flops["step"] / step["median_s"] / peak,
                    prompts_per_s=w.batch / step["median_s"])
        rec["step"] = step
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model (CI)")
    ap.add_argument("--skip-step", action="store_true", help="phases only (no whole-step timing)")
    ap.add_argument("--step-repeats", type=int, default=None, help="whole-step runs (default: --repeats)")
    ap.add_argument("--decode-rules", choices=("default", "training"), default="default",
                    help="the sampler's layout (PolicyHParams.decode_rules: the default decode rules or None)")
    ap.add_argument("--out", default=RESULTS, help="JSONL file to append to ('' = none)")
    args = ap.parse_args(argv)
    w = dataclasses.replace(SMOKE if args.smoke else BIG, decode_rules=args.decode_rules)
    rec = run(w, args.repeats, args.skip_step,
              peak_sizes=(256,) if args.smoke else (512, 1024, 2048), step_repeats=args.step_repeats)
    line = json.dumps(rec)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    short = {k: rec[k] for k in ("update", "sampling", "judge", "sum_of_phases") if k in rec}
    short.update(step=rec.get("step"), peak_gflops=rec["peak_flops"] / 1e9, phase_median_s=rec["phase_median_s"])
    print(json.dumps(short), file=sys.stderr)
    print(line)
    return rec


if __name__ == "__main__":
    main()
