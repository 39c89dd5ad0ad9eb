"""beta / tau schedules and the missing-EOS penalty of the policy stages.

Schedules against their closed forms; a scheduled step at step k against the constant-hyper-parameter step at the
scheduled value (same keys: same samples, same update); the penalty against the step whose oracle applies it by
hand; and the config errors (one line naming the field)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nash_lm import models, parallel
from nash_lm.data import synthetic
from nash_lm.train import config as cfg_lib
from nash_lm.train import schedules
from nash_lm.train import spec as spec_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

CFG = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
DATA = synthetic.SyntheticConfig(vocab_size=32, prompt_len=6, response_len=6, n_examples=16, seed=0)
B = 4


@pytest.mark.parametrize("text,expected", [
    ("", lambda s: 0.5),
    ("linear:0.1", lambda s: 0.5 + (0.1 - 0.5) * s / 10),
    ("cosine:0.1", lambda s: 0.1 + (0.5 - 0.1) * 0.5 * (1 + math.cos(math.pi * s / 10))),
    ("steps:3=0.25,7=0.05", lambda s: 0.5 if s < 3 else (0.25 if s < 7 else 0.05)),
])
def test_schedule_values_closed_form(text, expected):
    sched = schedules.parse(text, "f", 0.0, 1.0, 11)
    got = [float(schedules.value(sched, 0.5, jnp.int32(s), 11)) for s in range(11)]
    np.testing.assert_allclose(got, [expected(s) for s in range(11)], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text,msg", [
    ("linear", "expected ''"), ("quadratic:0.1", "expected ''"), ("linear:x", "expected a number"),
    ("linear:1.5", "outside [0.0, 1.0]"), ("steps:5=0.1,3=0.2", "must increase"), ("steps:11=0.1", "must increase"),
    ("steps:a=0.1", "STEP=VALUE"),
])
def test_schedule_errors(text, msg):
    with pytest.raises(ValueError, match=r"^f: ") as e:
        schedules.parse(text, "f", 0.0, 1.0, 11)
    assert msg in str(e.value) and "\n" not in str(e.value)


def _config(**stage):
    c = cfg_lib.stage("nash_md_pg", ref="sft", judge="pm", steps=4, batch_size=8, max_new_tokens=6, **stage)
    from configs import tiny

    cfg = tiny.get_config()
    cfg.stages.nash_md = c
    cfg.pipeline = "sft,pm,nash_md"
    return cfg


@pytest.mark.parametrize("fields,msg", [
    (dict(beta_schedule="linear:2"), "config.stages.nash_md.beta_schedule: value 2.0 outside [0.0, 1.0]"),
    (dict(tau_schedule="steps:9=0.1"), "config.stages.nash_md.tau_schedule: steps must increase"),
    (dict(missing_eos_penalty=-1.0), "config.stages.nash_md.missing_eos_penalty: must be >= 0"),
])
def test_config_errors_name_the_field(tmp_path, fields, msg):
    with pytest.raises(ValueError) as e:
        spec_lib.resolve(_config(**fields), str(tmp_path / "w"))
    assert str(e.value).startswith(msg), str(e.value)


def test_ipo_tau_schedule_must_stay_positive(tmp_path):
    cfg = _config()
    cfg.stages.nash_md = cfg_lib.stage("online_ipo", ref="sft", judge="pm", steps=4, batch_size=8,
                                       max_new_tokens=6, tau_schedule="linear:0")
    with pytest.raises(ValueError, match=r"^config.stages.nash_md.tau_schedule: reaches 0"):
        spec_lib.resolve(cfg, str(tmp_path / "w"))


def _step_setup(algorithm, judge_fn, adapters=False, **hp):
    """A jitted policy step at a given step; `adapters`: rank-2 LoRA on a base whose adapters-off model is mu
    (B drawn nonzero, so that pi differs from mu and the one-pass mixture decode has work to do)."""
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    if adapters:
        graphdef, full = models.init(CFG, "lm", 0, lora_cfg=models.LoRAConfig(rank=2, alpha=4.0))
        trained, base = models.lora.split(full)
        leaves, treedef = jax.tree.flatten(trained)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        policy = jax.tree.unflatten(treedef, [x + 1.0 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
        ref = models.lora.join(jax.tree.map(jnp.zeros_like, trained), base)
    else:
        graphdef, policy = models.init(CFG, "lm", 0)
        _, ref = models.init(CFG, "lm", 1)
    stage = cfg_lib.stage(algorithm, lr=1e-2, batch_size=B, steps=10, grad_clip=0.0)
    tx = state_lib.make_optimizer(stage)
    data = synthetic.prompt_dataset(DATA, "train")
    batch = {k: jnp.asarray(v[:B]) for k, v in data.items()}
    hparams = step_lib.PolicyHParams(algorithm=algorithm, max_new_tokens=6, steps=10, **hp)
    fn = jax.jit(functools.partial(step_lib.policy_step, hparams, graphdef, step_lib.Judge("oracle", fn=judge_fn),
                                   tx))

    def run(step):
        mut = state_lib.init_state(policy, tx, 0).replace(step=jnp.int32(step))
        with parallel.activate(mesh, None):
            return fn(mut, step_lib.Frozen(ref=ref), batch)

    return run


def _oracle(prompt, prompt_mask, y, y_mask, y2, y2_mask):
    """A JAX preference oracle: more EOS-free tokens of y than of y2 is better (smooth, antisymmetric)."""
    del prompt, prompt_mask
    return jax.nn.sigmoid(0.3 * (jnp.sum(y * y_mask, -1) % 7 - jnp.sum(y2 * y2_mask, -1) % 7))


def _close(a, b):
    (ma, ka), (mb, kb) = a, b
    for x, y in zip(jax.tree.leaves(ma.policy), jax.tree.leaves(mb.policy)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(ka["loss"]), float(kb["loss"]), rtol=1e-5, atol=1e-7)


def test_scheduled_step_equals_the_constant_step_at_the_scheduled_values():
    # beta 0.6 -> 0.1 linearly over 10 steps: 0.35 at step 5 (float32 of 0.6 + (0.1 - 0.6) * 5 / 9); tau by steps
    step = 5
    beta = float(np.float32(0.6) + (np.float32(0.1) - np.float32(0.6)) * (np.float32(step) / np.float32(9)))
    scheduled = _step_setup("nash_md_pg", _oracle, tau=0.3, beta=0.6, tau_schedule=schedules.parse(
        "steps:4=0.05", "t", 0, 1, 10), beta_schedule=schedules.parse("linear:0.1", "b", 0, 1, 10))(step)
    constant = _step_setup("nash_md_pg", _oracle, tau=0.05, beta=beta)(step)
    _close(scheduled, constant)
    assert float(scheduled[1]["beta"]) == pytest.approx(beta, abs=1e-7)
    assert float(scheduled[1]["tau"]) == pytest.approx(0.05, abs=1e-7)
    # the same with adapters (mu = the base, adapters off on mu's rows of the one-pass mixture decode)
    lora_scheduled = _step_setup("nash_md_pg", _oracle, True, tau=0.3, beta=0.6, beta_schedule=schedules.parse(
        "linear:0.1", "b", 0, 1, 10))(step)
    _close(lora_scheduled, _step_setup("nash_md_pg", _oracle, True, tau=0.3, beta=beta)(step))
    unscheduled = _step_setup("nash_md_pg", _oracle, True, tau=0.3, beta=0.6)(step)  # beta matters here
    assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(lora_scheduled[0].policy), jax.tree.leaves(unscheduled[0].policy))) > 1e-4
    before = _step_setup("nash_md_pg", _oracle, tau=0.3, beta=0.6, tau_schedule=schedules.parse(
        "steps:4=0.05", "t", 0, 1, 10))(3)  # before step 4 the stage's own tau
    _close(before, _step_setup("nash_md_pg", _oracle, tau=0.3, beta=0.6)(3))


def test_missing_eos_indicator():
    eos = synthetic.EOS_ID
    tokens = jnp.array([[5, eos, 0], [5, 6, 7], [5, 6, eos], [eos, 0, 0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(step_lib.missing_eos(tokens, mask, eos)), [0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("algorithm", ["nash_md_pg", "online_ipo"])
def test_missing_eos_penalty_is_the_oracle_penalised_by_hand(algorithm):
    c, eos = 0.3, synthetic.EOS_ID
    no_eos = lambda t, m: 1.0 - jnp.any((t == eos) & (m > 0), -1).astype(jnp.float32)

    def by_hand(prompt, prompt_mask, y, y_mask, y2, y2_mask):
        return _oracle(prompt, prompt_mask, y, y_mask, y2, y2_mask) - c * no_eos(y, y_mask) + c * no_eos(y2, y2_mask)

    tau = 0.1 if algorithm == "nash_md_pg" else 1.0
    penalised = _step_setup(algorithm, _oracle, tau=tau, beta=0.5, missing_eos_penalty=c)(0)
    _close(penalised, _step_setup(algorithm, by_hand, tau=tau, beta=0.5)(0))
    plain = _step_setup(algorithm, _oracle, tau=tau, beta=0.5)(0)
    rate = float(penalised[1]["missing_eos_rate"])
    assert 0 < rate  # the untrained 6-token completions often lack EOS: the penalty changes the update
    assert not np.allclose(np.asarray(jax.tree.leaves(penalised[0].policy)[0]),
                           np.asarray(jax.tree.leaves(plain[0].policy)[0]))


def test_penalised_preference_stays_antisymmetric():
    hp = step_lib.PolicyHParams(algorithm="nash_md_pg", tau=0.1, missing_eos_penalty=0.2)
    eos = synthetic.EOS_ID
    y, ym = jnp.array([[5, 6], [5, eos]]), jnp.ones((2, 2))
    y2, y2m = jnp.array([[5, eos], [7, 8]]), jnp.ones((2, 2))
    p = jnp.array([0.7, 0.4])
    fwd = step_lib.penalize_missing_eos(hp, p, dict(y=y, y_mask=ym, y2=y2, y2_mask=y2m))
    rev = step_lib.penalize_missing_eos(hp, 1 - p, dict(y=y2, y_mask=y2m, y2=y, y2_mask=ym))
    np.testing.assert_allclose(np.asarray(fwd), [0.5, 0.6], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fwd + rev), 1.0, rtol=1e-6)


def test_a_jobs_own_tokenizer_sets_the_policy_stages_eos_and_pad(tmp_path):
    """A job handing over its own token data (the docstring jobs) names its tokenizer: the policy stages stop at
    and penalise the absence of that tokenizer's EOS, not the synthetic data's (ids 2 / 0)."""
    import os
    import sys
    import types

    from nash_lm.train import compile as compile_lib
    from nash_lm.train.pipeline import Pipeline

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import tiny

    config = tiny.get_config()
    config.pipeline = "sft,pm,nash_md"
    with Pipeline(config, str(tmp_path / "wd"), data={}) as pipe:
        hp = compile_lib.policy_hparams(pipe.spec.stages["nash_md"], pipe.spec)
        assert (hp.eos_id, hp.pad_id) == (synthetic.EOS_ID, synthetic.PAD_ID)
        pipe.use_tokenizer(types.SimpleNamespace(eos_id=17, pad_id=5))
        hp = compile_lib.policy_hparams(pipe.spec.stages["nash_md"], pipe.spec)
        assert (hp.eos_id, hp.pad_id) == (17, 5)
    tokens = jnp.asarray([[4, 17, 5], [4, 2, 0]])
    np.testing.assert_array_equal(np.asarray(step_lib.missing_eos(tokens, jnp.ones_like(tokens), hp.eos_id)), [0, 1])
    assert not os.path.exists(tmp_path / "wd" / "stages")
