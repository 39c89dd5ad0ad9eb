"""ONPO as a stage: configs/tiny.py's `onpo` stage validates, its bad fields are one-line errors naming the field,
and its compiled policy step runs on the tiny model with the extra trees following the half-step schedule
(the predictor takes the policy after the first half of a round, the anchor after the second). The loss's
exact minimisers are checked against `nash_lm.games`' `optimistic` in tests/test_algorithms_exact.py."""
import functools
import runpy

import jax
import numpy as np
import pytest

from nash_lm import models, parallel
from nash_lm.data import synthetic
from nash_lm.train import algorithms, spec
from nash_lm.train import config as cfg_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

TINY = runpy.run_path(__file__.replace("tests/test_onpo.py", "configs/tiny.py"))["get_config"]


def _resolve(tmp_path, **fields):
    config = TINY()
    config.pipeline = "sft,pm,onpo"
    for k, v in fields.items():
        config.stages.onpo[k] = v
    return spec.resolve(config, str(tmp_path / "run"))


def test_the_tiny_stage_resolves(tmp_path):
    run = _resolve(tmp_path)
    assert run.stages["onpo"].algorithm.name == "onpo"
    assert not (tmp_path / "run").exists()  # validation writes nothing


@pytest.mark.parametrize("fields,match", [
    (dict(eta_inv=0.05), r"^config\.stages\.onpo\.eta_inv: must be >= tau = 0\.1 "),
    (dict(half_every=0), r"^config\.stages\.onpo\.half_every: must be >= 1 "),
    (dict(tau=0.0), r"^config\.stages\.onpo\.tau: must be > 0 for ONPO"),
    (dict(tau_schedule="linear:0.2"), r"^config\.stages\.onpo\.tau_schedule: ONPO takes a constant tau"),
])
def test_bad_fields_are_one_line_errors_naming_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match) as err:
        _resolve(tmp_path, **fields)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


CFG = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
DATA = synthetic.SyntheticConfig(vocab_size=32, prompt_len=6, response_len=6, n_examples=16, seed=0)
B = 4


def test_compiled_steps_train_and_refresh_predictor_then_anchor():
    """Four compiled steps with half_every = 1, judged by the in-jit synthetic oracle: after step 1 (the predictor
    half) the predictor is the policy and the anchor pi_0; after step 2 (the policy half) the anchor is the
    policy and the predictor still pi_bar_1; steps 3 and 4 repeat the pattern from the new round."""
    mesh = parallel.make_mesh({"data": 2}, devices=jax.devices()[:2])
    rules = parallel.validate_rules(None, mesh)
    graphdef, policy = models.init(CFG, "lm", 0)
    _, ref = models.init(CFG, "lm", 1)
    param_sh = parallel.param_shardings(policy, mesh, rules)
    tx = state_lib.make_optimizer(cfg_lib.stage("onpo", lr=1e-2, batch_size=B, steps=4, grad_clip=0.0))
    keeps = algorithms.get("onpo").keeps
    assert keeps == ("anchor", "predictor")
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0, keeps=keeps), policy)
    mut_sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
    mut = jax.jit(lambda p: state_lib.init_state(p, tx, 0, keeps=keeps), out_shardings=mut_sh)(policy)
    frozen = step_lib.Frozen(ref=jax.device_put(ref, param_sh))
    data = synthetic.prompt_dataset(DATA, "train")
    batch = {k: jax.device_put(v[:B], parallel.batch_sharding(mesh, rules, ndim=v.ndim, batch_size=B))
             for k, v in data.items()}
    hp = step_lib.PolicyHParams(algorithm="onpo", tau=0.1, max_new_tokens=6,
                                own=(("eta_inv", 1.0), ("half_every", 1)))
    judge = step_lib.Judge("oracle", fn=synthetic.synthetic_preference)
    fn = jax.jit(functools.partial(step_lib.policy_step, hp, graphdef, judge, tx))

    leaves = lambda tree: [np.asarray(x).copy() for x in jax.tree.leaves(tree)]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))
    policies = [leaves(mut.policy)]
    with parallel.activate(mesh, rules):
        for step in range(1, 5):
            mut, metrics = fn(mut, frozen, batch)
            assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
            assert 0.0 < float(metrics["pref_mean"]) < 1.0
            policies.append(leaves(mut.policy))
            anchor, predictor = leaves(mut.anchor), leaves(mut.predictor)
            last_odd, last_even = policies[step - (step % 2 == 0)], policies[step - step % 2]
            assert same(predictor, last_odd), step  # refreshed after each predictor half (odd steps)
            assert same(anchor, last_even), step  # refreshed after each policy half (even steps)
    assert not same(policies[1], policies[0]) and not same(policies[2], policies[1])
