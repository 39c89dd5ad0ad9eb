"""A roofline step-time estimate for the compiled Nash-MD-PG steps of `bench/aot_step.py` (its JSON lines), and the
README's scaling table.

    python bench/roofline.py bench/results/aot_table.jsonl [--out=bench/results/roofline.jsonl] [--markdown]

For each compiled step (one JSON line of bench/aot_step.py) the estimate adds three times per chip, with no
overlap between them (so it is an upper estimate of an ideal program, not a prediction of a real one):

  * decode: the sampler's decode loops are memory-bound. Per generated token (N = new tokens, every loop at its
    maximum trip count, no early EOS) each chip reads its share of the decode's bf16 weights (policy + mu,
    divided over the decode layout's model axes: `decode_model_axes` of the record; the LM head whole, the
    embedding table only at the rows looked up) and its share of the KV
    caches (the policy's on the y and y' rows, mu's on the y' rows; each buffer read whole: prompt + 128,
    + 256, ... slots, the sampler's GROW chunks), and does its share of the decode FLOPs; time = max(FLOPs /
    peak FLOP/s, bytes / HBM bandwidth).
  * everything else (prefills, the judge, mu's log-probs, the policy's forward and backward, the optimizer):
    taken as compute-bound at the chip's peak: the analytic FLOPs (`nash_lm.train.algorithms.step_flops` minus
    the decode's) divided over the chips.
  * interconnect: the compiled program's collective bytes per step per chip (the result bytes of every
    collective times its executions, trip counts included: `nash_lm.hlo`, from the record) divided by the
    chip's ICI bandwidth.

Peaks are the published per-chip figures (bf16 dense FLOP/s, HBM GB/s, ICI bandwidth as total bytes/s over all
links): v5e 197 TFLOP/s, 819 GB/s, 1,600 Gbit/s = 200 GB/s; v5p 459 TFLOP/s, 2,765 GB/s, 4,800 Gbit/s = 600
GB/s. Limits: no overlap of compute and communication (real XLA programs overlap some); peak FLOP/s and
bandwidths are never reached (a real MFU of 40-60 % on the compute-bound part would make that part 2x
longer); collectives at the per-chip link total, although a ring over one axis of a torus uses only some
links; the element-wise work, the softmax and the sampling arithmetic are left out; the KV bytes ignore the
cache writes. It is a scale for comparing layouts and topologies, not a measured time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nash_lm import models  # noqa: E402
from nash_lm.train import algorithms, metrics  # noqa: E402
from nash_lm.train import config as cfg_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Published per-chip peaks: bf16 FLOP/s, HBM bytes/s, ICI bytes/s (all links together).
PEAKS = {"v5e": (197e12, 819e9, 200e9), "v5p": (459e12, 2765e9, 600e9), "v4": (275e12, 1228e9, 300e9),
         "v6e": (918e12, 1640e9, 400e9)}
GROW = 128  # nash_lm.sampling.GROW


def _model(name):
    path = os.path.join(ROOT, "configs", "model", name)
    spec = importlib.util.spec_from_file_location("model_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fields = mod.get_config().model.to_dict()
    fields.pop("architecture", None)  # the variants differ in biases and activation, not in the counted matmuls
    return models.ModelConfig(**fields).validate()


def estimate(r: dict) -> dict:
    if "compile_error" in r:  # the TPU compiler refused the program: it does not fit, nothing to estimate
        return {"bench": "roofline", **{k: r[k] for k in ("model", "topology", "chips", "mesh", "batch",
                                                          "decode_rules", "frozen_dtype")},
                "decode_model_axes": [r["decode_model_axes"]] if isinstance(r.get("decode_model_axes"), str)
                else list(r.get("decode_model_axes") or ()), "fits": False, "compile_error": r["compile_error"]}
    m = _model(r["model"])
    kind = r["topology"].split(":")[0]
    flops_peak, hbm_bw, ici_bw = PEAKS[kind]
    chips, b, p, n = r["chips"], r["batch"], r["prompt_len"], r["new_tokens"]
    st = cfg_lib.stage("nash_md_pg", batch_size=b, max_new_tokens=n, beta=r["beta"])
    alg = algorithms.get("nash_md_pg")
    total_flops = algorithms.step_flops(alg, st, m, p, n, "preference")
    shape = dict(n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                 head_dim=m.head_dim, d_ff=m.d_ff, vocab_size=m.vocab_size)
    _, decodes = alg.passes(st)
    decode_flops = decodes * metrics.lm_forward_flops(**shape, tokens=b * n, context=p + n / 2)
    # Decode bytes per chip per token: weights (bf16, divided over the decode's model axes), KV caches.
    axes = r.get("decode_model_axes", "tensor" if r["decode_rules"] == "default" else None) or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    model_par = math.prod(r["mesh"].get(a, 1) for a in axes) if r["decode_rules"] != "none" else 1
    # policy + mu, bf16: the LM head (vocab x d_model, the tied table for a tied model) is whole in the decode
    # layouts and read whole for each token's logits; the embedding lookup reads only the rows it needs; the rest
    # is divided over the decode's model axes.
    head = m.vocab_size * m.d_model
    table = head * (1 if m.tie_embeddings else 2)
    weights = 2 * 2 * (head + (m.num_params() - table) / model_par)
    rows = 2 * b + b  # the policy's cache on the y and y' rows, mu's on the y' rows (0 < beta < 1)
    kv_per_slot = rows * m.n_layers * 2 * m.n_kv_heads * m.head_dim * 2 / chips  # bf16 k and v, all rows
    kv = sum(kv_per_slot * (p + GROW * (t // GROW + 1)) for t in range(n))
    decode_bytes = n * weights + kv
    t_decode = max(decode_flops / chips / flops_peak, decode_bytes / hbm_bw)
    t_rest = (total_flops - decode_flops) / chips / flops_peak
    coll = r["collectives"]
    t_ici = coll["total"]["bytes_per_step"] / ici_bw
    mem = r["memory_per_chip"]
    needed = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    hbm_gib = {"v5e": 16, "v5p": 95, "v4": 32, "v6e": 32}[kind]
    return {
        "bench": "roofline", "model": r["model"], "topology": r["topology"], "chips": chips, "mesh": r["mesh"],
        "batch": b, "decode_rules": r["decode_rules"], "decode_model_axes": list(axes),
        "frozen_dtype": r.get("frozen_dtype"), "per_chip_gib": round(needed / 2**30, 2), "hbm_gib": hbm_gib,
        "fits": needed <= hbm_gib * 2**30, "analytic_flops": total_flops, "decode_flops": decode_flops,
        "decode_hbm_bytes_per_chip": decode_bytes, "collective_bytes_in_decode": coll["inside"]["bytes_per_step"],
        "collective_bytes_outside_decode": coll["outside"]["bytes_per_step"],
        "weight_allgather_bytes_in_decode": r["weight_allgathers_in_decode"]["bytes_per_step"],
        "t_decode_s": round(t_decode, 3), "t_rest_s": round(t_rest, 3), "t_ici_s": round(t_ici, 3),
        "step_s": round(t_decode + t_rest + t_ici, 3),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="JSON lines of bench/aot_step.py")
    ap.add_argument("--out", default="")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for path in args.inputs:
        for line in open(path):
            if line.startswith("{") and '"aot_step"' in line:
                rows.append(estimate(json.loads(line)))
    for e in rows:
        line = json.dumps(e)
        print(line if not args.markdown else "", end="\n" if not args.markdown else "")
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    if args.markdown:
        print("| model | topology (chips) | batch | mesh | decode weights per chip | per chip GiB (of HBM) | fits | weight gathers in "
              "decode | collectives in decode / outside, GB per step | roofline s: decode + rest + ICI = step |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for e in rows:
            mesh = "x".join(f"{k}{v}" for k, v in e["mesh"].items() if v > 1)
            name = e["model"].replace(".py", "") + (" (μ, judge f32)" if e.get("frozen_dtype") == "float32" else "")
            if "compile_error" in e:
                print(f"| {name} | {e['topology']} ({e['chips']}) | {e['batch']} | {mesh} | "
                      f"| **no**: the TPU compiler refuses it ({e['compile_error'].split(': ', 1)[-1]}) | | | | |")
                continue
            par = math.prod(e["mesh"].get(a, 1) for a in e["decode_model_axes"])
            on = ("training layout" if e["decode_rules"] == "none" else "whole" if par == 1 else
                  f"/{par} ({'x'.join(e['decode_model_axes'])})")
            print(f"| {name} | {e['topology']} ({e['chips']}) | {e['batch']} | {mesh} | {on} | "
                  f"{e['per_chip_gib']:.1f} ({e['hbm_gib']}) | {'yes' if e['fits'] else '**no**'} | "
                  f"{e['weight_allgather_bytes_in_decode'] / 1e9:,.0f} GB | "
                  f"{e['collective_bytes_in_decode'] / 1e9:,.1f} / {e['collective_bytes_outside_decode'] / 1e9:,.1f} | "
                  f"{e['t_decode_s']:.2f} + {e['t_rest_s']:.2f} + {e['t_ici_s']:.2f} = **{e['step_s']:.2f}** |")


if __name__ == "__main__":
    main()
