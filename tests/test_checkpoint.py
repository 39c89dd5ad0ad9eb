"""Checkpoints: the train state (with AdamW moments and EMA) round-trips through orbax onto another mesh shape;
keep-N; params-only export; the parameter hash ignores placement but sees every bit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 3, keeps=("ema",)), params)
    sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
    state = jax.jit(lambda p: state_lib.init_state(p, tx, 3, keeps=("ema",)), out_shardings=sh)(params)
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
    abstract_b = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 3, keeps=("ema",)), _params())
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


def test_model_train_state_restores_onto_another_mesh_shape(tmp_path):
    """A real NNX model's train state written on a data=8 mesh restores onto fsdp=4 x tensor=2 (FSDP/TP
    shardings from the logical rules), bit for bit, through the loop's abstract-state path."""
    from nash_lm import models, parallel
    from nash_lm.train import config as cfg_lib
    from nash_lm.train.inputs import abstract_params

    cfg = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
    tx = state_lib.make_optimizer(cfg_lib.stage("nash_ema_pg", lr=1e-2))

    def build(mesh_cfg):
        mesh = parallel.make_mesh(mesh_cfg)
        rules = parallel.validate_rules(None, mesh)
        _, abstract_policy, initialise = abstract_params(cfg, "lm", 0, mesh, rules)
        param_sh = jax.tree.map(lambda a: a.sharding, abstract_policy)
        abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0, keeps=("ema",)), abstract_policy)
        sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
        make = jax.jit(lambda p: state_lib.init_state(p, tx, 0, keeps=("ema",)), out_shardings=sh)
        return make, initialise, ck.abstract(abstract, sh), param_sh

    make_a, init_a, _, _ = build({"data": 8})
    state = make_a(init_a())
    mngr = ck.Checkpointer(str(tmp_path / "ckpt"), keep=1)
    mngr.save(5, state, {"batches": 5}, {})
    mngr.wait()

    _, _, abstract_b, param_sh_b = build({"data": 1, "fsdp": 4, "tensor": 2})
    restored, _, _ = mngr.restore(5, abstract_b)
    mngr.close()
    assert ck.params_sha256(restored) == ck.params_sha256(state)
    specs = {str(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored.policy))}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    for got, want in zip(jax.tree.leaves(restored.ema), jax.tree.leaves(param_sh_b)):
        assert got.sharding == want


def test_restore_latest_falls_back_past_unreadable_checkpoints(tmp_path):
    """Steps 1-3 saved; 3 truncated -> 2 is restored (bit for bit), 3 moved aside to '3.unreadable' and no longer
    listed; every data file cut -> ValueError naming the directory, nothing moved."""
    import os

    mesh = _mesh((8,), ("data",))
    state, sh, _ = _train_state(mesh, lambda x: P())
    mngr = ck.Checkpointer(str(tmp_path / "ckpt"), keep=3)
    saved = {}
    for step in (1, 2, 3):
        state = state.replace(step=state.step + 1)
        saved[step] = ck.params_sha256(state)
        mngr.save(step, state, {"batches": step}, {"step": step})
    mngr.wait()

    def cut(step):  # every data file of the state, the process's and the merged ones
        for d in ("ocdbt.process_0/d", "d"):
            for f in (tmp_path / "ckpt" / str(step) / "state" / d).iterdir():
                os.truncate(f, f.stat().st_size // 2)

    cut(3)
    step, restored, data, meta = mngr.restore_latest(ck.abstract(state, sh), "test")
    assert (step, data, meta) == (2, {"batches": 2}, {"step": 2})
    assert ck.params_sha256(restored) == saved[2]
    assert (tmp_path / "ckpt" / "3.unreadable").is_dir() and mngr.all_steps() == [1, 2]
    cut(2)
    cut(1)
    with pytest.raises(ValueError, match=r"test: no checkpoint in .*ckpt can be restored \(2: .*; 1: .*\)"):
        mngr.restore_latest(ck.abstract(state, sh), "test")
    assert mngr.all_steps() == [1, 2] and not (tmp_path / "ckpt" / "2.unreadable").exists()
    mngr.close()
    assert ck.Checkpointer(str(tmp_path / "empty"), keep=1).restore_latest(ck.abstract(state, sh), "t") is None

