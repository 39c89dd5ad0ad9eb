"""Gradient accumulation over microbatches (`PolicyHParams.microbatches`) gives the update of the unsplit batch
(parameters to 16 float32 ulps of each tensor's scale, with plain SGD so that the optimizer does not amplify rounding), for Nash-MD-PG and online
IPO on a batch sharded over two devices; and bfloat16 storage of the frozen reference and judge
(`models.cast_storage`) halves their per-chip argument bytes in `memory_analysis()` of the compiled step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nash_lm import models, parallel
from nash_lm.data import synthetic
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

CFG = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
DATA = synthetic.SyntheticConfig(vocab_size=32, prompt_len=6, response_len=6, n_examples=16, seed=0)
B = 8


def _setup(algorithm, mesh_shape=None, frozen_dtype=None):
    mesh = parallel.make_mesh(mesh_shape or {"data": 2}, devices=jax.devices()[:2 if mesh_shape is None else 8])
    rules = parallel.validate_rules(None, mesh)
    graphdef, policy = models.init(CFG, "lm", 0)
    _, ref = models.init(CFG, "lm", 1)
    pref_graphdef, pref = models.init(CFG, "preference", 2)
    if frozen_dtype is not None:
        ref, pref = models.cast_storage(ref, frozen_dtype), models.cast_storage(pref, frozen_dtype)
    tx = optax.sgd(0.5)
    param_sh = parallel.param_shardings(policy, mesh, rules)
    mut_sh = state_lib.state_shardings(jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0), policy), param_sh,
                                       tx, mesh)
    mut = jax.jit(lambda p: state_lib.init_state(p, tx, 0), out_shardings=mut_sh)(policy)
    frozen = step_lib.Frozen(ref=jax.device_put(ref, parallel.param_shardings(ref, mesh, rules)),
                             judge=jax.device_put(pref, parallel.param_shardings(pref, mesh, rules)))
    data = synthetic.prompt_dataset(DATA, "train")
    batch = {k: jax.device_put(v[:B], parallel.batch_sharding(mesh, rules, ndim=v.ndim, batch_size=B))
             for k, v in data.items()}
    return dict(mesh=mesh, rules=rules, graphdef=graphdef, judge=step_lib.Judge("preference", pref_graphdef),
                tx=tx, mut=mut, frozen=frozen, batch=batch)


def _step(s, algorithm, microbatches):
    hp = step_lib.PolicyHParams(algorithm=algorithm, tau=0.1, beta=0.5, max_new_tokens=6, microbatches=microbatches)
    fn = functools.partial(step_lib.policy_step, hp, s["graphdef"], s["judge"], s["tx"])
    with parallel.activate(s["mesh"], s["rules"]):
        new, metrics = jax.jit(fn)(s["mut"], s["frozen"], s["batch"])
    return jax.tree.map(np.asarray, new.policy), jax.device_get(metrics)


@pytest.mark.parametrize("algorithm,splits", [("nash_md_pg", (2, 4)), ("online_ipo", (4,))])
def test_microbatches_match_the_full_batch(algorithm, splits):
    s = _setup(algorithm)
    full, m_full = _step(s, algorithm, 1)
    start = jax.tree.map(np.asarray, s["mut"].policy)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(start)))
    assert moved > 1e-3  # the update is not trivially zero
    for m in splits:
        got, m_got = _step(s, algorithm, m)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(full)):
            # float32 rounding of a sum split differently: 16 ulps of the tensor's largest entry (the one SGD step
            # of lr 0.5 moves entries by up to ~10, so an absolute 1e-6 would ask for less than one ulp there)
            np.testing.assert_allclose(a, b, atol=16 * float(np.spacing(np.float32(np.abs(b).max()))), rtol=0)
        for k in ("loss", "kl", "pref_mean"):
            np.testing.assert_allclose(m_got[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_microbatches_must_divide_the_batch():
    s = _setup("nash_md_pg")
    with pytest.raises(ValueError, match="microbatches=3"):
        _step(s, "nash_md_pg", 3)
    hp = step_lib.PolicyHParams(algorithm="rlhf", tau=0.1, max_new_tokens=6, microbatches=2)
    samples = {"y": s["batch"]["prompt"], "y_mask": s["batch"]["prompt_mask"].astype(jnp.float32)}
    with pytest.raises(ValueError, match="rlhf loss couples the examples"):  # leave-one-out baseline (traced)
        jax.eval_shape(functools.partial(step_lib.update, hp, s["graphdef"], s["tx"]), s["mut"], s["frozen"],
                       s["batch"], samples, jnp.zeros((B,)), s["mut"].rng)


def _argument_bytes(s):
    hp = step_lib.PolicyHParams(algorithm="nash_md_pg", tau=0.1, beta=0.5, max_new_tokens=6)
    fn = functools.partial(step_lib.policy_step, hp, s["graphdef"], s["judge"], s["tx"])
    with parallel.activate(s["mesh"], s["rules"]):
        compiled = jax.jit(fn).lower(s["mut"], s["frozen"], s["batch"]).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_bf16_frozen_storage_halves_their_bytes():
    """Per-chip argument bytes of the compiled step on an fsdp=8 mesh, frozen trees in float32 vs bfloat16: the
    difference is half of the frozen trees' float32 matrix bytes per chip (the vectors stay float32)."""
    f32 = _setup("nash_md_pg", {"fsdp": 8})
    bf16 = _setup("nash_md_pg", {"fsdp": 8}, frozen_dtype="bfloat16")
    leaves = jax.tree.leaves(f32["frozen"])
    low = jax.tree.leaves(bf16["frozen"])
    assert any(x.dtype == jnp.bfloat16 for x in low) and any(x.dtype == jnp.float32 for x in low)  # vectors stay
    per_chip = lambda x: x.addressable_shards[0].data.nbytes
    saved = sum(per_chip(a) - per_chip(b) for a, b in zip(leaves, low))
    matrix_f32 = sum(per_chip(a) for a, b in zip(leaves, low) if b.dtype == jnp.bfloat16)
    assert saved == matrix_f32 // 2
    before, after = _argument_bytes(f32), _argument_bytes(bf16)
    assert before - after == saved, (before, after, saved)
    # The reference's log-probs stay float32 (the loss inputs): the step still runs and is finite.
    _, metrics = _step(bf16, "nash_md_pg", 1)
    assert bool(metrics["finite"])
