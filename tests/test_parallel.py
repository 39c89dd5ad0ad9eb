"""Tests of nash_lm.parallel on 8 fake CPU devices: mesh and rule validation, the one sharding tree,
2×2×2-mesh results equal to single-device results (forward, preference, sampler), and per-device parameter
bytes from the compiled memory analysis under FSDP."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nash_lm import models, parallel, sampling
from nash_lm.models import ModelConfig

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, max_len=24)


def test_eight_devices():
    assert len(jax.devices()) == 8


# -------------------------------------------------------------------------------------- mesh / rules


def test_make_mesh_shapes_and_autofill():
    m = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert m.axis_names == ("data", "fsdp", "tensor") and tuple(m.axis_sizes) == (2, 2, 2)
    m = parallel.make_mesh([("data", 2), ("fsdp", -1)])
    assert tuple(m.axis_sizes) == (2, 4, 1)
    import ml_collections
    m = parallel.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": -1}))
    assert tuple(m.axis_sizes) == (1, 1, 8)


@pytest.mark.parametrize("mesh_cfg,pattern", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, r"^mesh: product of axes 2x2x1=4 does not equal the device count 8$"),
    ({"data": -1, "fsdp": -1}, r"^mesh.fsdp=-1: only one axis"),
    ({"data": 3, "fsdp": -1}, r"^mesh.fsdp=-1: the other axes' product 3 does not divide"),
    ({"model": 8}, r"^mesh.model: unknown mesh axis"),
    ({"data": 0, "fsdp": 8}, r"^mesh.data=0: must be"),
])
def test_mesh_errors_name_the_field(mesh_cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        parallel.make_mesh(mesh_cfg)


def test_rule_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"^rules\[1\] \('mlp'\): unknown mesh axis 'model'"):
        parallel.validate_rules([("embed", "fsdp"), ("mlp", "model")])
    with pytest.raises(ValueError, match=r"^rules\[0\]: unknown logical axis 'hidden'"):
        parallel.validate_rules([("hidden", "tensor")])
    with pytest.raises(ValueError, match=r"^rules\[0\]="):
        parallel.validate_rules(["embed"])
    mesh = parallel.make_mesh({"fsdp": -1})
    with pytest.raises(ValueError, match=r"unknown mesh axis 'replica'"):
        parallel.param_shardings(models.abstract_init(CFG)[1], mesh, [("embed", ("replica", "fsdp"))])


def test_logical_to_spec_priorities_divisibility_and_reuse():
    rules = parallel.validate_rules(parallel.DEFAULT_RULES)
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.logical_to_spec(("batch", "length", "act_embed"), rules, sizes, (8, 3, 4)) == P(("data", "fsdp"))
    assert parallel.logical_to_spec(("batch",), rules, sizes, (2,)) == P("data")  # falls back: 2 % 4 != 0
    assert parallel.logical_to_spec(("batch",), rules, sizes, (3,)) == P()  # nothing divides 3
    assert parallel.logical_to_spec(("embed", "mlp"), rules, sizes, (4, 6)) == P("fsdp", "tensor")
    # A mesh axis is used at most once per array: vocab and heads both want 'tensor'.
    assert parallel.logical_to_spec(("heads", "vocab"), rules, sizes, (2, 2)) == P("tensor")


# ---------------------------------------------------------------------------- equality on a 2x2x2 mesh


@pytest.fixture(scope="module")
def mesh222():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    return mesh, parallel.validate_rules(None, mesh)


def _batch(b=8, t=6, v=16, seed=0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, v, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        mask[i, : i % 3] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_one_sharding_tree_for_policy_ref_ema(mesh222):
    mesh, rules = mesh222
    g, pol = models.init(CFG, "lm", seed=0)
    _, ref = models.init(CFG, "lm", seed=1)
    sh = parallel.param_shardings(pol, mesh, rules)
    sh_abstract = parallel.param_shardings(models.abstract_init(CFG)[1], mesh, rules)
    assert jax.tree.structure(sh) == jax.tree.structure(sh_abstract) == jax.tree.structure(ref)
    assert jax.tree.leaves(sh) == jax.tree.leaves(sh_abstract)
    specs = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    assert specs["['embed'].value"] == P("tensor", "fsdp")
    assert specs["['blocks'][0]['attn']['qkv'].value"] == P("fsdp", "tensor")
    assert specs["['blocks'][0]['mlp']['down'].value"] == P("tensor", "fsdp")
    ema = jax.tree.map(lambda a, b: 0.5 * (a + b), pol, ref)
    for tree in (pol, ref, ema):
        placed = jax.device_put(tree, sh)
        assert all(x.sharding == s for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(sh)))
    lines = parallel.describe_shardings(pol, sh)
    assert len(lines) == len(jax.tree.leaves(pol)) and "blocks/0/attn/qkv" in lines[1] + lines[0] + "".join(lines)


def test_forward_preference_and_sampler_on_2x2x2_equal_single_device(mesh222):
    mesh, rules = mesh222
    g, pol = models.init(CFG, "lm", seed=0)
    _, ref = models.init(CFG, "lm", seed=1)
    gp, pref = models.init(CFG, "preference", seed=2)
    tokens, mask = _batch()
    prompts, pmask = _batch(t=5, seed=1)
    y, ym = _batch(t=4, seed=2)
    y2, y2m = _batch(t=4, seed=3)

    def run_all(pol, ref, pref, tokens, mask, prompts, pmask, rng):
        logits = models.lm_logits(g, pol, tokens, mask)
        prob = models.preference_prob(gp, pref, prompts, pmask, y, ym, y2, y2m)
        s = sampling.sample(g, pol, prompts, pmask, rng, max_new_tokens=6, eos_id=3, pad_id=0,
                            temperature=0.9, mix_params=ref, beta=0.35)
        return logits, prob, s

    rng = jax.random.key(11)
    single = jax.jit(run_all)(pol, ref, pref, tokens, mask, prompts, pmask, rng)

    sh = parallel.param_shardings(pol, mesh, rules)
    sh_pref = parallel.param_shardings(pref, mesh, rules)
    data_sh = parallel.batch_sharding(mesh, rules, ndim=2, batch_size=8)
    assert data_sh.spec == P(("data", "fsdp"))
    with parallel.activate(mesh, rules):
        fn = jax.jit(run_all, in_shardings=(sh, sh, sh_pref, data_sh, data_sh, data_sh, data_sh, None))
        args = (jax.device_put(pol, sh), jax.device_put(ref, sh), jax.device_put(pref, sh_pref),
                *parallel.shard_batch((tokens, mask, prompts, pmask), mesh, rules), rng)
        hlo = fn.lower(*args).as_text()
        sharded = fn(*args)
    assert "sharding_constraint" in hlo or "custom_call_target=\"Sharding\"" in hlo or "mhlo.sharding" in hlo
    assert len(sharded[0].sharding.device_set) == 8
    print("2x2x2 vs single device: logits max |diff| %.2e, preference %.2e, sampler logp %.2e, tokens equal %s" % (
        np.abs(np.asarray(sharded[0]) - np.asarray(single[0])).max(),
        np.abs(np.asarray(sharded[1]) - np.asarray(single[1])).max(),
        max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(sharded[2][2:], single[2][2:])),
        bool(np.array_equal(np.asarray(sharded[2].tokens), np.asarray(single[2].tokens)))))
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(single[1]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sharded[2].tokens), np.asarray(single[2].tokens))
    np.testing.assert_array_equal(np.asarray(sharded[2].mask), np.asarray(single[2].mask))
    for a, b in zip(sharded[2][2:], single[2][2:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --------------------------------------------------------------------------------- memory under FSDP


def test_compiled_per_device_parameter_bytes_under_fsdp():
    cfg = dataclasses.replace(CFG, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=True)
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = parallel.validate_rules(None, mesh)
    g, abstract = models.abstract_init(cfg)
    sh = parallel.param_shardings(abstract, mesh, rules)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    tokens = jax.ShapeDtypeStruct((8, 8), jnp.int32)
    data_sh = parallel.batch_sharding(mesh, rules, 2, 8)

    def compiled_arg_bytes(param_sh):
        with parallel.activate(mesh, rules):
            fn = jax.jit(lambda p, t, m: models.lm_logits(g, p, t, m), in_shardings=(param_sh, data_sh, data_sh))
            mem = fn.lower(abstract, tokens, tokens).compile().memory_analysis()
        return mem.argument_size_in_bytes

    data_bytes = 2 * 8 * 8 * 4 // 8
    per_device = compiled_arg_bytes(sh) - data_bytes
    replicated = compiled_arg_bytes(jax.tree.map(lambda s: NamedSharding(mesh, P()), sh)) - data_bytes
    print(f"total parameter bytes {total}, per device: fsdp {per_device}, replicated {replicated}")
    assert replicated == total
    assert abs(per_device - total / 8) <= 0.02 * total / 8


def test_init_directly_into_shardings(mesh222):
    mesh, rules = mesh222
    g, ref_params = models.init(CFG, "lm", seed=5)
    sh = parallel.param_shardings(models.abstract_init(CFG)[1], mesh, rules)
    _, params = models.init(CFG, "lm", seed=5, shardings=sh)
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), jax.tree.leaves(sh)):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_billion_parameter_config_shards_evenly_under_fsdp():
    """Shapes only (nothing allocated): the ~1B config's per-device parameter bytes on fsdp=8 are total/8."""
    cfg = ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                      max_len=2048, dtype="bfloat16", scan_layers=True, remat=True)
    mesh = parallel.make_mesh({"fsdp": -1})
    _, abstract = models.abstract_init(cfg)
    sh = parallel.param_shardings(abstract, mesh)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    per_device = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                     for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(sh)))
    print(f"1B config: {total / 2**30:.2f} GiB of f32 parameters, {per_device / 2**20:.1f} MiB per device")
    assert per_device == total // 8
