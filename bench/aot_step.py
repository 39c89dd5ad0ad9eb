"""The compiled Nash-MD-PG step at scale, shown by the TPU compiler without a TPU: one JSON line per compile.

Compiles `nash_lm.train.step.policy_step` (rollout with the KV-cached decode of the policy and of mu, the
preference judge, the update) from abstract arguments for a deviceless TPU topology
(`jax.experimental.topologies`, needs libtpu) or for the local devices, and prints: per-chip memory
(`compiled.memory_analysis()`: arguments, outputs, aliased, temporaries), the collective inventory
(`nash_lm.hlo`) inside the decode loops and outside them (bytes per step = sum of result bytes x executions;
also per named scope of the step: 'sample_y_y2' alone is the once-per-step re-layout of policy and mu),
the weight-shaped all-gathers inside the decode loops, and the ratio of all collective bytes per step to the
bf16 bytes of policy + mu.

The decode loops are chained (one per `nash_lm.sampling.GROW` tokens) and may stop early at EOS, so XLA knows
none of their trip counts; this script counts each at its maximum (no early stop): the loops' derived bounds
(the limit of their condition, 128, 256, ...) in increasing order, each minus the previous one.

    PYTHONPATH=.:DIR JAX_PLATFORMS=cpu python bench/aot_step.py --model=configs/model/llama_1b.py \
        --topology=v5e:4x4 --batch=64 --prompt_len=512 --new_tokens=256 --beta=0.125

`--lora_rank=R` compiles the step of a LoRA stage instead (`nash_lm.models.lora`, rank R, alpha 2R, every
projection): the state holds the adapters and their Adam moments, the frozen reference is the base (bf16 with
`--frozen_dtype=bfloat16`) and the decode samples the mixture in one pass over it (`sampling.ADAPTERS_OFF`).

Results are appended to bench/results/aot_step.jsonl with `--out`.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from nash_lm import hlo, models, parallel  # noqa: E402
from nash_lm.models import lora  # noqa: E402
from nash_lm.train import config as cfg_lib  # noqa: E402
from nash_lm.train import state as state_lib  # noqa: E402
from nash_lm.train import step as step_lib  # noqa: E402

DECODE_LOOP = hlo.DECODE_LOOP
PHASES = ("sample_y_y2/prefill", "sample_y_y2/decode", "sample_y_y2", "judge", "ref_logprobs",
          "policy_grad/transpose", "policy_grad", "optimizer_update", "ema_update")
DECODE_RULES = ("default", "tensor", "auto", "none")
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip, published (as nash_lm.aot)


def decode_rules(name, mesh, model_cfg, decode_bytes, topology):
    """--decode_rules: 'default' (weights whole per tensor group), 'tensor' (`parallel.tensor_decode_rules`: over
    the mesh axes that divide the KV heads), 'auto' (`parallel.choose_decode_rules` with half the chip's HBM as
    the budget of the decode's bf16 policy + mu), 'none' (the training layout)."""
    if name == "default":
        return parallel.DEFAULT_DECODE_RULES
    if name == "tensor":
        return parallel.tensor_decode_rules(mesh, model_cfg.n_kv_heads, model_cfg.d_ff)
    if name == "auto":
        budget = HBM_GIB.get((topology or "").split(":")[0], 1 << 20) * 2**30 // 2
        return parallel.choose_decode_rules(decode_bytes, mesh, budget, model_cfg.n_kv_heads, model_cfg.d_ff)
    return None


def _load_model_config(path):
    spec = importlib.util.spec_from_file_location("model_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _weight_shapes(params):
    shapes = set()
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value, axes = v.get_value(), v.get_metadata()["out_sharding"]
        per_layer = tuple(d for d, a in zip(value.shape, axes) if a != "layers")
        if len(per_layer) >= 2:
            shapes.update(tuple(d for d in s if d != 1) for s in (value.shape, per_layer))
    return shapes


def _bytes(tree, dtype=None):
    return sum(math.prod(x.shape) * jnp.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(tree))


def run(args):
    c = _load_model_config(args.model)
    if args.max_len:
        c.model.max_len = args.max_len
    fields = c.model.to_dict()
    arch = fields.pop("architecture", "llama")
    model_cfg = models.ModelConfig.from_config(fields)
    if arch != "llama":  # Qwen2 / Gemma: the variant's decoder settings (the judge keeps the same widths)
        from nash_lm.interop import variants
        model_cfg = variants.config_for(model_cfg, arch)
    if args.topology:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    else:
        devices = jax.devices()
    mesh = parallel.make_mesh(json.loads(args.mesh) if args.mesh else c.mesh, devices=devices)
    rules = parallel.validate_rules(c.rules, mesh)
    lora_cfg = lora.LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
    graphdef, policy = models.abstract_init(model_cfg, "lm", lora_cfg)
    pref_graphdef, pref = models.abstract_init(model_cfg, "preference")
    ref = policy  # with adapters: the base with zero adapters, and the trained tree the adapters alone
    weights = lora.split(policy)[1] if lora_cfg else policy  # the decoder's own weights
    if lora_cfg:
        policy = lora.split(policy)[0]
    if args.frozen_dtype != "float32":
        ref, pref = models.cast_storage(ref, args.frozen_dtype), models.cast_storage(pref, args.frozen_dtype)
    param_sh = parallel.param_shardings(policy, mesh, rules)
    stage = cfg_lib.stage("nash_md_pg", lr=1e-6, batch_size=args.batch, steps=10)
    tx = state_lib.make_optimizer(stage)
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0), policy)
    mut_sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
    frozen_sh = step_lib.Frozen(ref=parallel.param_shardings(ref, mesh, rules),
                                judge=parallel.param_shardings(pref, mesh, rules))
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.prompt_len), jnp.int32) for k in ("prompt", "prompt_mask")}
    batch_sh = {k: parallel.batch_sharding(mesh, rules, 2, args.batch) for k in batch}
    rules_d = decode_rules(args.decode_rules, mesh, model_cfg, 2 * _bytes(policy, jnp.bfloat16), args.topology)
    hp = step_lib.PolicyHParams(algorithm="nash_md_pg", tau=args.tau, beta=args.beta, max_new_tokens=args.new_tokens,
                                decode_rules=rules_d, microbatches=args.microbatches)
    fn = functools.partial(step_lib.policy_step, hp, graphdef, step_lib.Judge("preference", pref_graphdef), tx)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    t = time.time()
    with parallel.activate(mesh, rules):
        lowered = jax.jit(fn, in_shardings=(mut_sh, frozen_sh, batch_sh), out_shardings=(mut_sh, replicated),
                          donate_argnums=0).lower(abstract, step_lib.Frozen(ref=ref, judge=pref), batch)
        t_lower = time.time() - t
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler's own verdict: it does not fit this chip
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            message = next((x for x in str(e).splitlines() if "RESOURCE_EXHAUSTED" in x), str(e)).strip()
            record = {"bench": "aot_step", "model": os.path.basename(args.model), "topology": args.topology,
                      "chips": mesh.devices.size, "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))),
                      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "beta": args.beta, "decode_rules": args.decode_rules, "frozen_dtype": args.frozen_dtype,
                      "decode_model_axes": None if rules_d is None else dict(rules_d).get("heads"),
                      "fits": False, "compile_error": message, "compile_s": round(time.time() - t - t_lower, 1)}
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
            print(f"error: does not fit {args.topology}: {message}", file=sys.stderr)
            sys.exit(2)
    t_compile = time.time() - t - t_lower
    text = compiled.as_text()
    if args.save_hlo:
        with open(args.save_hlo, "w") as f:
            f.write(text)
    trips = hlo.decode_trip_counts(text)
    inv = hlo.inventory(text, trip_counts=trips)
    s = hlo.summary(inv, within=DECODE_LOOP)
    shapes = _weight_shapes(weights)
    dims = lambda x: tuple(d for d in hlo.shape_dims(x.shape)[0][1] if d != 1) if hlo.shape_dims(x.shape) else ()
    weight_in_decode = [x for x in inv if x.kind == "all-gather" and x.inside(DECODE_LOOP) and dims(x) in shapes]
    by_phase = {}
    for x in inv:  # the step's named scopes, in the order they run
        phase = next((k for k in PHASES if k in x.op_name), "other")
        d = by_phase.setdefault(phase, {})
        d[x.kind] = d.get(x.kind, 0) + x.total_bytes
    mem = compiled.memory_analysis()
    bf16_policy_mu = 2 * _bytes(weights, jnp.bfloat16)
    n_chips = mesh.devices.size
    top = sorted(inv, key=lambda x: -x.total_bytes)[:12]
    record = {
        "bench": "aot_step", "model": os.path.basename(args.model), "params": models.num_params(weights),
        "lora_rank": args.lora_rank, "trained_params": models.num_params(policy),
        "topology": args.topology or jax.devices()[0].device_kind, "chips": n_chips,
        "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))), "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "beta": args.beta,
        "judge": "preference", "decode_rules": args.decode_rules, "frozen_dtype": args.frozen_dtype,
        "decode_model_axes": None if rules_d is None else dict(rules_d).get("heads"),
        "microbatches": args.microbatches, "lower_s": round(t_lower, 1), "compile_s": round(t_compile, 1),
        "memory_per_chip": {k: getattr(mem, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp",
                                                                            "generated_code")},
        "decode_trip_counts": trips,
        "collectives": {k: {kk: s[k][kk] for kk in ("count", "executions", "bytes_per_step", "exact", "by_kind")}
                        for k in ("inside", "outside", "total")},
        "bytes_per_step_by_phase": by_phase,
        "stack": _stack(),
        "weight_allgathers_in_decode": {"count": len(weight_in_decode),
                                        "bytes_per_step": sum(x.total_bytes for x in weight_in_decode)},
        "bf16_bytes_policy_plus_mu": bf16_policy_mu,
        "collective_bytes_over_bf16_policy_mu": round(s["total"]["bytes_per_step"] / bf16_policy_mu, 3),
        "largest": [{"kind": x.kind, "shape": x.shape.split("{")[0], "count": x.count, "bytes_per_step": x.total_bytes,
                     "in_decode": x.inside(DECODE_LOOP), "op_name": x.op_name[-90:]} for x in top],
    }
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return record


def _stack() -> dict:
    """The compiler's versions: the TPU program is libtpu's, the lowering jax's."""
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": version("jaxlib"),
            "libtpu": version("libtpu")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="configs/model/llama_1b.py")
    p.add_argument("--topology", default="v5e:4x4", help="deviceless TPU topology ('' = the local devices)")
    p.add_argument("--mesh", default="", help='JSON {axis: size}; default: the model config\'s mesh')
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.125)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--decode_rules", choices=DECODE_RULES, default="default")
    p.add_argument("--frozen_dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--max_len", type=int, default=0, help="override the model config's max_len")
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: the step of a LoRA stage with adapters of this rank")
    p.add_argument("--save_hlo", default="")
    p.add_argument("--out", default="")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
