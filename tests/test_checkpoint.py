"""Checkpoints: the train state (with AdamW moments and EMA) round-trips through orbax onto another mesh shape;
keep-N; params-only export; the parameter hash ignores placement but sees every bit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nash_lm.train import checkpoint as ck
from nash_lm.train import state as state_lib


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"layer": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
            "embed": jax.random.normal(k2, (32, 8))}


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _train_state(mesh, param_spec):
    params = _params()
    tx = optax.adamw(1e-2)
    param_sh = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x)), params)
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 3, ema=True), params)
    sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
    state = jax.jit(lambda p: state_lib.init_state(p, tx, 3, ema=True), out_shardings=sh)(params)
    # Take two optimizer steps so the moments and the count are non-trivial.
    for _ in range(2):
        grads = jax.tree.map(jnp.ones_like, state.policy)
        updates, opt = tx.update(grads, state.opt_state, state.policy)
        state = state.replace(step=state.step + 1, policy=optax.apply_updates(state.policy, updates), opt_state=opt)
    return state, sh, tx


def test_state_roundtrip_onto_another_mesh(tmp_path):
    mesh_a = _mesh((8,), ("data",))
    state, sh_a, tx = _train_state(mesh_a, lambda x: P("data") if x.shape[0] % 8 == 0 else P())
    # Adam moments share the parameter shardings; the count is replicated.
    mu = state.opt_state[0].mu
    assert mu["layer"]["kernel"].sharding == state.policy["layer"]["kernel"].sharding
    assert state.opt_state[0].count.sharding.spec == P()

    mngr = ck.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3):
        mngr.save(step, state, {"batches": step}, {"fingerprint": "abc"})
    mngr.wait()
    assert mngr.all_steps() == [2, 3]

    mesh_b = _mesh((2, 4), ("fsdp", "tensor"))
    spec_b = lambda x: P("fsdp", "tensor") if x.ndim == 2 and x.shape[1] % 4 == 0 else P()
    param_sh_b = jax.tree.map(lambda x: NamedSharding(mesh_b, spec_b(x)), _params())
    abstract_b = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 3, ema=True), _params())
    sh_b = state_lib.state_shardings(abstract_b, param_sh_b, tx, mesh_b)
    restored, data, meta = mngr.restore(3, ck.abstract(abstract_b, sh_b))
    mngr.close()
    assert data == {"batches": 3} and meta == {"fingerprint": "abc"}
    assert restored.policy["layer"]["kernel"].sharding == param_sh_b["layer"]["kernel"]
    assert restored.opt_state[0].nu["embed"].sharding == param_sh_b["embed"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ck.params_sha256(restored) == ck.params_sha256(state)


def test_export_and_hash(tmp_path):
    params = _params()
    ck.export_params(str(tmp_path / "export"), {"policy": params})
    back = ck.load_params(str(tmp_path / "export"), {"policy": ck.abstract(params)})["policy"]
    assert ck.params_sha256(back) == ck.params_sha256(params)
    bumped = jax.tree.map(lambda x: x, params)
    bumped["layer"]["bias"] = params["layer"]["bias"].at[3].set(np.float32(1e-30))
    assert ck.params_sha256(bumped) != ck.params_sha256(params)
