"""Benchmark of the Nash-MD-PG pair decode with LoRA adapters: the token-level mixture of an adapted policy and
its base in one pass over the base weights (`sampling.ADAPTERS_OFF`), against plain sampling of the adapted
policy, on the same prompts and keys.

`sampling.sample_pair` with B prompts of length 64 and N new tokens (no EOS: every row decodes N tokens),
prefill included; y ~ π and y' ~ π^(1−β)·μ^β, β = 0.125, rank-16 adapters on every projection (B random, so π
differs from μ):

  * plain_adapted:   y, y' ~ π (the adapted policy alone, 2B rows)                       the baseline
  * mixture_fused:   y ~ π, y' ~ mixture, μ = π's base, adapters off on μ's rows (3B rows, one model pass)
  * mixture_merged:  the same pair with the adapters merged into a separate π and the base as μ (two trees,
                     two model passes per step: the full-model mixture of a policy stage without adapters)
  * plain_base:      y, y' ~ the base (no adapters: what the adapters' low-rank terms cost)
  * ema_one_pass:    Nash-EMA-PG's pair, y ~ π and y' ~ the EMA of the adapters (another adapter set on the same
                     base, `sampling.Adapters`; 2B rows, one model pass, the two sets concatenated along the rank)
  * ema_two_trees:   the same pair from two merged trees, base + π's adapters and base + the EMA's (two passes)

Ratios over plain_adapted (target: mixture_fused ≤ 1.3), from medians of `--repeats` (≥ 5) interleaved runs
after a compile run, in wall time and this process's CPU time.

Writes JSON lines to bench/results/lora_decode.jsonl (appends) and prints them.
Usage: .venv/bin/python bench/lora_decode.py [--repeats 7] [--batch 8] [--size quick|small|large|smollm2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

from nash_lm import models, sampling
from nash_lm.models import ModelConfig, lora

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lora_decode.jsonl")
SIZES = {  # 'small' is bench/sampling.py's model; 'large' (~100M parameters, 0.4 GB f32) does not fit the caches;
    # 'smollm2' is SmolLM2-135M-Instruct's architecture (configs/smollm2_docstrings.py), random weights
    "quick": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128),
    "small": dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=768),
    "large": dict(vocab_size=8192, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=8, d_ff=2816),
    "smollm2": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                    rope_theta=100000.0, norm_eps=1e-5),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    assert args.repeats >= 5, "medians of at least 5 runs"

    cfg = ModelConfig(max_len=256, **SIZES[args.size])
    lc = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    g_base, base = models.init(cfg, "lm", seed=0)
    g_ad, full = models.init(cfg, "lm", seed=0, lora_cfg=lc)
    adapters = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                            lora.split(full)[0])
    params = lora.join(adapters, base)
    merged = lora.merge(cfg, lc, params)
    ema = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)
    merged_ema = lora.merge(cfg, lc, lora.join(ema, base))
    b, n, beta = args.batch, args.new_tokens, 0.125
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randint(1, cfg.vocab_size, (b, 64)), jnp.int32)
    m = jnp.ones((b, 64), jnp.int32)
    keys = tuple(jax.random.split(jax.random.key(0)))
    kw = dict(max_new_tokens=n, eos_id=None, pad_id=0)
    pair = jax.jit(sampling.sample_pair, static_argnums=0, static_argnames=tuple(kw) + ("beta",))
    modes = {
        "plain_adapted": lambda: pair(g_ad, params, x, m, keys, **kw),
        "mixture_fused": lambda: pair(g_ad, params, x, m, keys, mix_params=sampling.ADAPTERS_OFF, beta=beta, **kw),
        "mixture_merged": lambda: pair(g_base, merged, x, m, keys, mix_params=base, beta=beta, **kw),
        "plain_base": lambda: pair(g_base, base, x, m, keys, **kw),
        "ema_one_pass": lambda: pair(g_ad, params, x, m, keys, mix_params=sampling.Adapters(ema), beta=1.0, **kw),
        "ema_two_trees": lambda: pair(g_base, merged, x, m, keys, mix_params=merged_ema, beta=1.0, **kw),
    }
    wall = {k: [] for k in modes}
    cpu = {k: [] for k in modes}
    for fn in modes.values():
        jax.block_until_ready(fn())  # compile
    for _ in range(args.repeats):  # interleaved, so that every mode sees the same machine load
        for k, fn in modes.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    record = dict(
        metric="lora_pair_decode", size=args.size, model=cfg.to_dict(), n_params=models.num_params(base),
        n_adapter_params=models.num_params(adapters), rank=args.rank, batch=b, prompt_len=64, new_tokens=n,
        beta=beta, repeats=args.repeats, machine=machine(), time=datetime.datetime.now().isoformat(timespec="seconds"),
        median_s=med, median_cpu_s=med_cpu,
        over_plain_adapted={k: med[k] / med["plain_adapted"] for k in modes},
        over_plain_adapted_cpu_time={k: med_cpu[k] / med_cpu["plain_adapted"] for k in modes},
        target_fused_over_plain_max=1.3, runs_s=wall)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("model", "machine", "runs_s")}))


if __name__ == "__main__":
    main()
