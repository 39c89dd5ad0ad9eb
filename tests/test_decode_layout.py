"""The decode layout of the compiled Nash-MD-PG step: with FSDP training rules, the KV-cached decode loop of the
training layout gathers each layer's weights at every generated token (the HLO inventory of `nash_lm.hlo`
finds weight-shaped all-gathers inside the 'decode/while' loop); with the decode rules (`PolicyHParams.
decode_rules`, default `parallel.DEFAULT_DECODE_RULES`) it has none, on the 8 fake CPU devices and on a
deviceless TPU v5e:2x2 topology (skipped when libtpu is not installed), and none in a LoRA stage's Nash-MD-PG or
Nash-EMA-PG step either (the training layout gathers there too). The tensor-parallel decode layout,
chosen by the model's KV-head count, keeps the KV cache local (no KV-cache-sized all-gather in the decode loop,
where the former fixed rules gathered it at every token). The re-layout changes no sampled
token: the rollout with the decode rules on 8 devices gives the tokens of the unmodified path
(`decode_rules=None`, no re-layout at all) on one device."""
import dataclasses
import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nash_lm import hlo, models, parallel
from nash_lm.data import synthetic
from nash_lm.train import algorithms
from nash_lm.train import config as cfg_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

# Scanned layers (the layout of the real configs); widths chosen so that no weight shape is also an activation
# shape of the decode (rows 2B = 16, vocab 64, d_model 32, d_ff 96).
CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_len=24,
                         scan_layers=True)
DATA = synthetic.SyntheticConfig(vocab_size=64, prompt_len=6, response_len=6, n_examples=16, seed=0)
B, N_NEW = 8, 6
DECODE_LOOP = r"/decode/while$"  # op_name of the sampler's decode loops (nash_lm.sampling's named scope)


def _weight_shapes(params):
    """Every floating matrix's shape, whole and per layer (the 'layers' axis dropped), with size-1 dims
    squeezed (XLA:TPU keeps a [1, ...] slice of a stacked weight), from the parameter tree itself."""
    shapes = set()
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = v.get_value()
        axes = v.get_metadata()["out_sharding"]
        per_layer = tuple(d for d, a in zip(value.shape, axes) if a != "layers")
        if len(per_layer) >= 2:
            for s in (value.shape, per_layer):
                shapes.add(tuple(d for d in s if d != 1))
    return shapes


def _min_matrix_bytes(params, itemsize):
    sizes = []
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata()["out_sharding"]
        dims = [d for d, a in zip(v.get_value().shape, axes) if a != "layers"]
        if len(dims) >= 2:
            sizes.append(math.prod(dims) * itemsize)
    return min(sizes)


def _compiled_step(mesh, decode_rules, algorithm="nash_md_pg", lora_cfg=None):
    """(the policy step compiled for `mesh` from abstract arguments, preference judge; the decoder's parameter
    tree). With `lora_cfg` the step of a LoRA stage: the state holds the adapters, the reference is the base."""
    rules = parallel.validate_rules(None, mesh)
    graphdef, policy = models.abstract_init(CFG, "lm", lora_cfg)
    ref, trained = policy, (models.lora.split(policy)[0] if lora_cfg else policy)
    pref_graphdef, pref = models.abstract_init(CFG, "preference")
    tx = state_lib.make_optimizer(cfg_lib.stage(algorithm, lr=1e-2, batch_size=B, steps=10, grad_clip=0.0))
    keeps = algorithms.get(algorithm).keeps
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0, keeps=keeps), trained)
    mut_sh = state_lib.state_shardings(abstract, parallel.param_shardings(trained, mesh, rules), tx, mesh)
    frozen_sh = step_lib.Frozen(ref=parallel.param_shardings(ref, mesh, rules),
                                judge=parallel.param_shardings(pref, mesh, rules))
    batch = {k: jax.ShapeDtypeStruct((B, DATA.prompt_len), jnp.int32) for k in ("prompt", "prompt_mask")}
    batch_sh = {k: parallel.batch_sharding(mesh, rules, 2, B) for k in batch}
    hp = step_lib.PolicyHParams(algorithm=algorithm, tau=0.1, beta=0.5, max_new_tokens=N_NEW,
                                decode_rules=decode_rules)
    fn = functools.partial(step_lib.policy_step, hp, graphdef, step_lib.Judge("preference", pref_graphdef), tx)
    with parallel.activate(mesh, rules):
        compiled = jax.jit(fn, in_shardings=(mut_sh, frozen_sh, batch_sh), donate_argnums=0).lower(
            abstract, step_lib.Frozen(ref=ref, judge=pref), batch).compile()
    return compiled, policy


def _decode_gathers(compiled, policy, itemsize):
    """(weight-shaped all-gathers, all-gathers of at least the smallest weight matrix's bytes) inside the
    decode loops."""
    shapes = _weight_shapes(policy)
    in_decode = [c for c in hlo.inventory(compiled) if c.kind == "all-gather" and c.inside(DECODE_LOOP)]
    dims = lambda c: tuple(d for d in hlo.shape_dims(c.shape)[0][1] if d != 1)
    weight_shaped = [c for c in in_decode if dims(c) in shapes]
    big = [c for c in in_decode if c.bytes >= _min_matrix_bytes(policy, itemsize)]
    return weight_shaped, big


def _check_before_after(devices, mesh_shape, itemsize):
    mesh = parallel.make_mesh(mesh_shape, devices=devices)
    before, policy = _compiled_step(mesh, None)
    after, _ = _compiled_step(mesh, parallel.DEFAULT_DECODE_RULES)
    w_before, _ = _decode_gathers(before, policy, itemsize)
    w_after, big_after = _decode_gathers(after, policy, itemsize)
    # Training layout: each layer's matrices are gathered inside the decode loop, once per layer and token
    # (the layer scan inside the decode loop), for the policy and for mu.
    assert len(w_before) >= 2 * 4, [c.shape for c in w_before]  # qkv, out, gate_up, down x (policy, mu)
    assert all(c.count >= N_NEW for c in w_before)  # at least once per token (per layer: the scanned blocks)
    assert w_after == [] and big_after == [], [(c.shape, c.op_name) for c in w_after + big_after]
    # The decode loop is found and still holds the (small, activation-sized) collectives of the row layout.
    assert any(c.inside(DECODE_LOOP) for c in hlo.inventory(after))
    return len(w_before), sum(c.total_bytes for c in w_before)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "fsdp": 4}], ids=["fsdp8", "data2_fsdp4"])
def test_no_weight_gathers_in_decode_loop_cpu(mesh_shape):
    _check_before_after(jax.devices()[:8], mesh_shape, itemsize=4)


@pytest.mark.parametrize("algorithm", ["nash_md_pg", "nash_ema_pg"])
def test_no_weight_gathers_in_the_lora_decode_loop(algorithm):
    """A LoRA stage's decode (mu = the base with adapters off; Nash-EMA-PG's EMA = a second adapter set on the
    base, both in pi's pass) under FSDP over 8 devices: no weight- or adapter-shaped all-gather in the loop."""
    mesh = parallel.make_mesh({"fsdp": 8}, devices=jax.devices()[:8])
    compiled, policy = _compiled_step(mesh, parallel.DEFAULT_DECODE_RULES, algorithm,
                                      models.LoRAConfig(rank=4, alpha=8.0))
    shaped, big = _decode_gathers(compiled, policy, itemsize=4)
    assert shaped == [] and big == [], [(c.shape, c.op_name) for c in shaped + big]
    assert any(c.inside(DECODE_LOOP) for c in hlo.inventory(compiled))


def _tpu_devices():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (libtpu 0.0.52: pip install -c constraints/py312.txt -e '.[tpu]')")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    except Exception as e:  # a libtpu that cannot describe the topology here
        pytest.skip(f"deviceless TPU topology v5e:2x2 unavailable: {type(e).__name__}: {e}")


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4}, {"data": 2, "fsdp": 2}], ids=["fsdp4", "data2_fsdp2"])
def test_no_weight_gathers_in_decode_loop_tpu_v5e(mesh_shape):
    # XLA:TPU moves the f32 weights' bf16 conversion before the gathers: 2-byte elements.
    _check_before_after(_tpu_devices(), mesh_shape, itemsize=2)


# The former TENSOR_DECODE_RULES (heads over ('fsdp', 'tensor'), else 'fsdp', else 'tensor'; batch over 'data'):
# with 2 KV heads on fsdp 4 the KV heads fall back to replicated while the batch stays on 'data' alone, and the
# compiled decode all-gathers each layer's KV cache at every token (as the 8B step did on v5p:2x2x4, fsdp 16).
OLD_TENSOR_RULES = (("batch", "data"), ("heads", ("fsdp", "tensor")), ("heads", "fsdp"), ("heads", "tensor"),
                    ("mlp", ("fsdp", "tensor")), ("mlp", "fsdp"), ("mlp", "tensor"), ("embed", None),
                    ("vocab", None), ("act_embed", None), ("length", None), ("kv", None), ("qkv", None),
                    ("layers", None))


def _kv_gathers(compiled):
    """All-gathers inside the decode loops whose result is a KV buffer: [..., rows, K, S, hd] (size-1 dims
    squeezed), S = prompt + new tokens (the cache of this short decode)."""
    kv = (CFG.n_kv_heads, DATA.prompt_len + N_NEW, CFG.head_dim)
    dims = lambda c: tuple(d for d in hlo.shape_dims(c.shape)[0][1] if d != 1)
    return [c for c in hlo.inventory(compiled)
            if c.kind == "all-gather" and c.inside(DECODE_LOOP) and dims(c)[-3:] == kv]


def test_kv_cache_stays_local_with_tensor_parallel_decode():
    """8 fake CPU devices: the tensor-parallel decode layout is chosen by head counts (`tensor_decode_rules`,
    what `config.decode_rules='tensor'` resolves to), and its compiled decode loop holds no KV-cache-sized and
    no weight-shaped all-gather, both where fsdp divides the KV heads (weights sharded over fsdp, batch over
    data) and where it does not (weights whole, batch over data x fsdp); the former rules gather the cache."""
    devices = jax.devices()[:8]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4}, devices=devices)
    before, policy = _compiled_step(mesh, OLD_TENSOR_RULES)
    gathered = _kv_gathers(before)
    assert gathered and all(c.count >= N_NEW for c in gathered), [(c.shape, c.count) for c in gathered]
    for shape in ({"data": 2, "fsdp": 4}, {"data": 4, "fsdp": 2}):
        mesh = parallel.make_mesh(shape, devices=devices)
        rules = parallel.tensor_decode_rules(mesh, CFG.n_kv_heads, CFG.d_ff)
        sharded = CFG.n_kv_heads % shape["fsdp"] == 0
        specs = jax.tree.leaves(parallel.param_specs(policy, mesh, rules),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert any("fsdp" in spec for spec in specs) == sharded  # tensor-parallel over fsdp where it divides
        after, _ = _compiled_step(mesh, rules)
        weights, big = _decode_gathers(after, policy, itemsize=4)
        assert _kv_gathers(after) == [] and weights == [], shape
        assert sum(c.total_bytes for c in hlo.inventory(after) if c.inside(DECODE_LOOP)) < sum(
            c.total_bytes for c in gathered)


# ------------------------------------------------------------------------------------------------ tokens


def _rollout_samples(n_devices, mesh_shape, decode_rules, dtype="float32"):
    cfg = dataclasses.replace(CFG, dtype=dtype)
    mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:n_devices])
    rules = parallel.validate_rules(None, mesh)
    graphdef, policy = models.init(cfg, "lm", 0)
    _, ref = models.init(cfg, "lm", 1)
    param_sh = parallel.param_shardings(policy, mesh, rules)
    tx = state_lib.make_optimizer(cfg_lib.stage("nash_md_pg", lr=1e-2, batch_size=B, steps=10, grad_clip=0.0))
    mut_sh = state_lib.state_shardings(jax.eval_shape(lambda p: state_lib.init_state(p, tx, 3), policy), param_sh,
                                       tx, mesh)
    mut = jax.jit(lambda p: state_lib.init_state(p, tx, 3), out_shardings=mut_sh)(policy)
    frozen = step_lib.Frozen(ref=jax.device_put(ref, param_sh))
    data = synthetic.prompt_dataset(DATA, "train")
    batch = {k: jax.device_put(v[:B], parallel.batch_sharding(mesh, rules, ndim=v.ndim, batch_size=B))
             for k, v in data.items() if k in ("prompt", "prompt_mask")}
    hp = step_lib.PolicyHParams(algorithm="nash_md_pg", tau=0.1, beta=0.5, max_new_tokens=N_NEW,
                                decode_rules=decode_rules)
    with parallel.activate(mesh, rules):
        _, samples = jax.jit(functools.partial(step_lib.rollout, hp, graphdef))(mut, frozen, batch)
    return jax.tree.map(np.asarray, samples)


def test_relayout_changes_no_token():
    """The same keys give the same y and y' (tokens and masks) with and without the re-layout, on one device
    (where the unmodified path, decode_rules=None, runs without any constraint) and on 8."""
    reference = _rollout_samples(1, {"data": 1}, None)
    assert reference["y"].shape == (B, N_NEW) and reference["y_mask"].sum() > 0
    assert not np.array_equal(reference["y"], reference["y2"])  # two different samples (beta = 0.5 mixture)
    for n, shape, rules in [(1, {"data": 1}, parallel.DEFAULT_DECODE_RULES),
                            (8, {"fsdp": 8}, None),
                            (8, {"fsdp": 8}, parallel.DEFAULT_DECODE_RULES),
                            (8, {"data": 2, "fsdp": 4}, parallel.DEFAULT_DECODE_RULES),
                            (8, {"data": 4, "fsdp": 2}, parallel.decode_rules_for(("fsdp",)))]:
        got = _rollout_samples(n, shape, rules)
        for k in ("y", "y_mask", "y2", "y2_mask"):
            np.testing.assert_array_equal(got[k], reference[k], err_msg=f"{k} on {shape} with rules={rules is not None}")


def test_relayout_changes_no_token_bf16_compute():
    """bfloat16 compute with float32 masters: the re-layout casts the matrices to bfloat16 before moving them
    (the model would cast them at use); the tokens are those of the unmodified path on one device."""
    reference = _rollout_samples(1, {"data": 1}, None, dtype="bfloat16")
    for n, shape in [(1, {"data": 1}), (8, {"fsdp": 8})]:
        got = _rollout_samples(n, shape, parallel.DEFAULT_DECODE_RULES, dtype="bfloat16")
        for k in ("y", "y_mask", "y2", "y2_mask"):
            np.testing.assert_array_equal(got[k], reference[k], err_msg=f"{k} on {shape}")


def test_decode_rules_specs_and_choice():
    """The decode rules lay no weight over 'fsdp' or 'data' (only 'tensor' may shard them), keep the batch over
    ('data', 'fsdp'); the tensor-parallel alternative is chosen when the replicated copy exceeds the budget."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, policy = models.abstract_init(CFG, "lm")
    specs = jax.tree.leaves(parallel.param_specs(policy, mesh, parallel.DEFAULT_DECODE_RULES),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    used = {a for spec in specs for part in spec for a in ((part,) if isinstance(part, str) else part or ())}
    assert used == {"tensor"}
    assert parallel.batch_sharding(mesh, parallel.DEFAULT_DECODE_RULES, 2, 8).spec[0] == ("data", "fsdp")
    parallel.validate_rules(parallel.TENSOR_DECODE_RULES, mesh)
    assert parallel.choose_decode_rules(2 * 2**30, mesh, budget_bytes=2**30) is parallel.DEFAULT_DECODE_RULES
    assert parallel.choose_decode_rules(4 * 2**30, mesh, budget_bytes=2**30) == parallel.TENSOR_DECODE_RULES
    # By head counts: 8 KV heads do not divide fsdp 16, so only 'tensor' (4) may shard the heads; 12 GiB on
    # tensor 4 fit 4 GiB; 20 GiB fit nowhere (one line, naming the field); 16 KV heads may use fsdp (16).
    sizes = {"data": 1, "fsdp": 16, "tensor": 4}
    assert parallel.choose_decode_rules(12 * 2**30, sizes, 4 * 2**30, n_kv_heads=8) is parallel.DEFAULT_DECODE_RULES
    with pytest.raises(ValueError, match=r"^decode_rules: .*n_kv_heads=8"):
        parallel.choose_decode_rules(20 * 2**30, sizes, 4 * 2**30, n_kv_heads=8)
    assert parallel.choose_decode_rules(20 * 2**30, sizes, 4 * 2**30, n_kv_heads=16) == parallel.decode_rules_for(
        ("fsdp",))
    assert parallel.tensor_decode_rules({"data": 1, "fsdp": 16, "tensor": 1}, 8) is parallel.DEFAULT_DECODE_RULES
    rules = parallel.tensor_decode_rules({"data": 2, "fsdp": 8, "tensor": 1}, 8, 14336)
    assert dict(rules)["heads"] == "fsdp" and rules[0] == ("batch", ("data", "tensor"))
    # config.decode_rules='tensor' resolves by the config's model (configs/tiny.py: 2 KV heads, d_ff 64).
    import importlib.util as iu
    from nash_lm.train import config as train_cfg
    spec = iu.spec_from_file_location("tiny_job", __file__.replace("tests/test_decode_layout.py", "configs/tiny.py"))
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.decode_rules = "tensor"
    for shape, heads in (({"data": 4, "fsdp": 2}, ("fsdp",)), ({"data": 2, "fsdp": 4}, ("tensor",))):
        got = train_cfg.decode_rules(c, parallel.make_mesh(shape, devices=jax.devices()[:8]))
        assert dict(got)["heads"] in (heads, heads[0]), (shape, got)
