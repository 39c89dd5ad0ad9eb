"""Benchmark of nash_lm.sampling: plain vs geometric-mixture decode throughput, and the per-token decode
time at cache positions 64 and 1024 (the KV cache makes it flat in the position).

Every number is the median of `--repeats` (≥ 5) timed runs after a compile/warm-up run, and every ratio is
formed from numbers measured in the same process, interleaved, because the machine may be shared and noisy.
Ratios are given from wall time and, as a check that is less sensitive to other processes on a shared host,
from this process's CPU time (`time.process_time`).

  * throughput: `sample` with B prompts of length 64 and N new tokens (no EOS, so every row decodes N
    tokens); tokens/s = B·N / median wall time (prefill included), for plain sampling and for the mixture
    (two trees, two KV caches). ratio = t_mixture / t_plain (target ≤ 2.2).
  * per-token decode time at position P ∈ {64, 1024}: `sampling.prefill` on prompts of length P into one
    cache buffer of the same size (1024 + N) for both positions, then the `sampling.decode` loop alone,
    timed and divided by N, plain and mixture. For contrast, the cost a cache-free decoder would pay per
    token at that position (one full forward over P tokens) is reported too.
    ratio = per_token(1024) / per_token(64) (target ≈ 1, i.e. flat).

Writes JSON lines to bench/results/sampling.jsonl (appends) and prints them.
Usage: .venv/bin/python bench/sampling.py [--repeats 5] [--batch 8] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

from nash_lm import models, sampling
from nash_lm.models import ModelConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampling.jsonl")


CPU_TIMES: list[float] = []  # process CPU seconds of every timed() call, in call order


def timed(fn, *args):
    """Wall seconds of one call; its process CPU seconds are appended to CPU_TIMES (robust to other load)."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    CPU_TIMES.append(time.process_time() - c)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smaller model (smoke run)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    assert args.repeats >= 5, "medians of at least 5 runs"

    if args.quick:
        cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=1152)
    else:
        cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768,
                          max_len=1152)
    g, pol = models.init(cfg, "lm", seed=0)
    _, ref = models.init(cfg, "lm", seed=1)
    b, n = args.batch, args.new_tokens
    rs = np.random.RandomState(0)

    def prompts(length):
        return (jnp.asarray(rs.randint(1, cfg.vocab_size, (b, length)), jnp.int32), jnp.ones((b, length), jnp.int32))

    base = dict(model=cfg.to_dict(), n_params=models.num_params(pol), batch=b, machine=machine(),
                time=datetime.datetime.now().isoformat(timespec="seconds"), repeats=args.repeats)
    rows = []

    # ---- throughput: plain vs mixture, prompt length 64, N new tokens
    x, m = prompts(64)
    plain = sampling.sample_jit(max_new_tokens=n, eos_id=None, pad_id=0)
    rng = jax.random.key(0)
    mix_beta = jnp.float32(0.5)
    timed(plain, g, pol, x, m, rng)
    timed(plain, g, pol, x, m, rng, ref, mix_beta)
    t_plain, t_mix, c_plain, c_mix = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        t_plain.append(timed(plain, g, pol, x, m, rng))
        c_plain.append(CPU_TIMES[-1])
        t_mix.append(timed(plain, g, pol, x, m, rng, ref, mix_beta))
        c_mix.append(CPU_TIMES[-1])
    tp_, tm_ = statistics.median(t_plain), statistics.median(t_mix)
    rows.append(dict(base, metric="decode_throughput", prompt_len=64, new_tokens=n,
                     plain_tokens_per_s=b * n / tp_, mixture_tokens_per_s=b * n / tm_,
                     plain_s=tp_, mixture_s=tm_, mixture_over_plain=tm_ / tp_, target_ratio_max=2.2,
                     mixture_over_plain_cpu_time=statistics.median(c_mix) / statistics.median(c_plain),
                     plain_runs_s=t_plain, mixture_runs_s=t_mix))

    # ---- per-token decode time at positions 64 and 1024: the decode loop alone, one cache buffer for both
    cache_len = 1024 + n
    lm = jax.jit(models.lm_logits, static_argnums=0)
    pre = jax.jit(lambda p, x, m, mix: sampling.prefill(g, p, x, m, max_new_tokens=n, mix_params=mix,
                                                        cache_len=cache_len))
    dec = jax.jit(lambda p, st, r, mix, beta: sampling.decode(g, p, st, r, max_new_tokens=n, eos_id=None,
                                                              pad_id=0, mix_params=mix, beta=beta))
    states, full = {}, {}
    for pos in (64, 1024):
        x, m = prompts(pos)
        states[(pos, "plain")] = jax.block_until_ready(pre(pol, x, m, None))
        states[(pos, "mixture")] = jax.block_until_ready(pre(pol, x, m, ref))
        full[pos] = (x, m)
    runs = {k: [] for k in states}
    cpu = {k: [] for k in states}
    fwd = {pos: [] for pos in full}
    for k, st in states.items():  # compile
        timed(dec, pol, st, rng, ref if k[1] == "mixture" else None, mix_beta)
    for pos, (x, m) in full.items():
        timed(lm, g, pol, x, m)
    for _ in range(args.repeats):
        for k, st in states.items():
            runs[k].append(timed(dec, pol, st, rng, ref if k[1] == "mixture" else None, mix_beta) / n)
            cpu[k].append(CPU_TIMES[-1] / n)
        for pos, (x, m) in full.items():
            fwd[pos].append(timed(lm, g, pol, x, m))
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for mode in ("plain", "mixture"):
        rows.append(dict(base, metric="per_token_decode", mode=mode, cache_len=cache_len, new_tokens=n,
                         per_token_ms_pos64=1e3 * med[(64, mode)], per_token_ms_pos1024=1e3 * med[(1024, mode)],
                         pos1024_over_pos64=med[(1024, mode)] / med[(64, mode)],
                         pos1024_over_pos64_cpu_time=med_cpu[(1024, mode)] / med_cpu[(64, mode)],
                         decode_tokens_per_s_pos64=b / med[(64, mode)],
                         no_cache_forward_ms_pos64=1e3 * statistics.median(fwd[64]),
                         no_cache_forward_ms_pos1024=1e3 * statistics.median(fwd[1024])))
    rows.append(dict(base, metric="decode_only_mixture_over_plain", cache_len=cache_len,
                     pos64=med[(64, "mixture")] / med[(64, "plain")],
                     pos1024=med[(1024, "mixture")] / med[(1024, "plain")],
                     pos64_cpu_time=med_cpu[(64, "mixture")] / med_cpu[(64, "plain")],
                     pos1024_cpu_time=med_cpu[(1024, "mixture")] / med_cpu[(1024, "plain")], target_ratio_max=2.2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            line = json.dumps(r)
            f.write(line + "\n")
            short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if k not in ("model", "machine", "plain_runs_s", "mixture_runs_s")}
            print(json.dumps(short))


if __name__ == "__main__":
    main()
