"""Benchmark of nash_lm.sampling: plain vs geometric-mixture decode throughput, and the per-token decode
time at cache positions 64 and 1024 (the KV cache makes it flat in the position).

Every number is the median of `--repeats` (≥ 5) timed runs after a compile/warm-up run, and every ratio is
formed from numbers measured in the same process, interleaved, because the machine may be shared and noisy.

  * throughput: `sample` with B prompts of length 64 and N new tokens (no EOS, so every row decodes N
    tokens); tokens/s = B·N / median wall time (prefill included), for plain sampling and for the mixture
    (two trees, two KV caches). ratio = t_mixture / t_plain (target ≤ 2.2).
  * per-token decode time at position P ∈ {64, 1024}: prompts of length P, one fixed cache buffer for both
    positions, and t(N = n2) − t(N = n1) divided by n2 − n1 (the prefill cancels). For contrast, the
    cost a cache-free decoder would pay per token at that position (one full forward over P tokens) is
    reported too. ratio = per_token(1024) / per_token(64) (target ≈ 1).

Writes JSON lines to bench/results/sampling.jsonl (appends) and prints them.
Usage: .venv/bin/python bench/sampling.py [--repeats 5] [--batch 8] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import models, sampling
from nash_lm.models import ModelConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampling.jsonl")


def machine() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), load_avg_1m=os.getloadavg()[0],
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              n_devices=len(jax.devices()), jax=jax.__version__, python=platform.python_version())


def timed(fn, *args):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
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
  t_plain, t_mix = [], []
  for _ in range(args.repeats):  # interleaved, so both see the same machine load
    t_plain.append(timed(plain, g, pol, x, m, rng))
    t_mix.append(timed(plain, g, pol, x, m, rng, ref, mix_beta))
  tp_, tm_ = statistics.median(t_plain), statistics.median(t_mix)
  rows.append(dict(base, metric="decode_throughput", prompt_len=64, new_tokens=n,
                   plain_tokens_per_s=b * n / tp_, mixture_tokens_per_s=b * n / tm_,
                   plain_s=tp_, mixture_s=tm_, mixture_over_plain=tm_ / tp_, target_ratio_max=2.2,
                   plain_runs_s=t_plain, mixture_runs_s=t_mix))

  # ---- per-token decode time at positions 64 and 1024 (one cache buffer for both)
  n1, n2 = 16, 80
  cache_len = 1024 + n2
  per_pos = {}
  fns = {k: sampling.sample_jit(max_new_tokens=k, eos_id=None, pad_id=0, cache_len=cache_len) for k in (n1, n2)}
  lm = jax.jit(models.lm_logits, static_argnums=0)
  inputs = {pos: prompts(pos) for pos in (64, 1024)}
  for pos, (x, m) in inputs.items():
    for k in (n1, n2):
      timed(fns[k], g, pol, x, m, rng)
      timed(fns[k], g, pol, x, m, rng, ref, mix_beta)
    timed(lm, g, pol, x, m)
  samples = {(pos, mode, k): [] for pos in inputs for mode in ("plain", "mixture") for k in (n1, n2)}
  full = {pos: [] for pos in inputs}
  for _ in range(args.repeats):
    for pos, (x, m) in inputs.items():
      for k in (n1, n2):
        samples[(pos, "plain", k)].append(timed(fns[k], g, pol, x, m, rng))
        samples[(pos, "mixture", k)].append(timed(fns[k], g, pol, x, m, rng, ref, mix_beta))
      full[pos].append(timed(lm, g, pol, x, m))
  for mode in ("plain", "mixture"):
    for pos in inputs:
      d = [(a2 - a1) / (n2 - n1) for a1, a2 in zip(samples[(pos, mode, n1)], samples[(pos, mode, n2)])]
      per_pos[(mode, pos)] = statistics.median(d)
    rows.append(dict(base, metric="per_token_decode", mode=mode, cache_len=cache_len, tokens_between=(n1, n2),
                     per_token_ms_pos64=1e3 * per_pos[(mode, 64)], per_token_ms_pos1024=1e3 * per_pos[(mode, 1024)],
                     pos1024_over_pos64=per_pos[(mode, 1024)] / per_pos[(mode, 64)],
                     no_cache_forward_ms_pos64=1e3 * statistics.median(full[64]),
                     no_cache_forward_ms_pos1024=1e3 * statistics.median(full[1024])))
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
