"""The compiled Nash-MD-PG step: one HLO module that samples y and y', scores the pair with the preference head
and updates policy, optimizer and EMA, with donation of the mutable state and never of the reference; plus the
sampler/scorer log-prob agreement and the EMA recursion in closed form."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nash_lm import models, parallel, sampling
from nash_lm.data import synthetic
from nash_lm.train import algorithms
from nash_lm.train import config as cfg_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

CFG = models.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
DATA = synthetic.SyntheticConfig(vocab_size=32, prompt_len=6, response_len=6, n_examples=16, seed=0)
B = 4


def _setup(algorithm, judge=None, tx=None, **hp):
    mesh = parallel.make_mesh({"data": 2}, devices=jax.devices()[:2])
    rules = parallel.validate_rules(None, mesh)
    graphdef, policy = models.init(CFG, "lm", 0)
    _, ref = models.init(CFG, "lm", 1)  # a reference different from the policy: the mixture is not trivial
    pref_graphdef, pref = models.init(CFG, "preference", 2)
    param_sh = parallel.param_shardings(policy, mesh, rules)
    stage = cfg_lib.stage(algorithm, lr=1e-2, batch_size=B, steps=10, grad_clip=0.0)
    tx = tx or state_lib.make_optimizer(stage)
    keeps = algorithms.get(algorithm).keeps
    abstract = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0, keeps=keeps), policy)
    mut_sh = state_lib.state_shardings(abstract, param_sh, tx, mesh)
    mut = jax.jit(lambda p: state_lib.init_state(p, tx, 0, keeps=keeps), out_shardings=mut_sh)(policy)
    ref = jax.device_put(ref, param_sh)
    pref = jax.device_put(pref, parallel.param_shardings(pref, mesh, rules))
    frozen = step_lib.Frozen(ref=ref, judge=pref)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    data = synthetic.prompt_dataset(DATA, "train")
    batch = {k: jax.device_put(v[:B], parallel.batch_sharding(mesh, rules, ndim=v.ndim, batch_size=B))
             for k, v in data.items()}
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    hparams = step_lib.PolicyHParams(algorithm=algorithm, max_new_tokens=6, **hp)
    judge = judge or step_lib.Judge("preference", pref_graphdef)
    fn = functools.partial(step_lib.policy_step, hparams, graphdef, judge, tx)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(mut_sh, frozen_sh, batch_sh), out_shardings=(mut_sh, replicated),
                     donate_argnums=0)
    return dict(mesh=mesh, rules=rules, graphdef=graphdef, mut=mut, frozen=frozen, batch=batch, jitted=jitted,
                judge=judge)


@pytest.fixture(scope="module")
def nash_md():
    return _setup("nash_md_pg", tau=0.1, beta=0.5)


def test_one_compiled_computation_per_step(nash_md):
    s = nash_md
    with parallel.activate(s["mesh"], s["rules"]):
        hlo = s["jitted"].lower(s["mut"], s["frozen"], s["batch"]).compile().as_text()
    assert hlo.count("HloModule ") == 1
    # Sampling (one decode loop for y and y'), scoring with the preference head, log-probs, gradient, optimizer:
    # all inside the one module (named scopes survive as op_name metadata).
    for scope in ("sample_y_y2/", "judge/", "ref_logprobs/", "policy_grad/", "optimizer_update/"):
        assert f"/{scope}" in hlo, scope
    assert hlo.count(" while(") >= 1
    assert "callback" not in hlo  # no host callbacks

    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        mut = s["mut"]
        with parallel.activate(s["mesh"], s["rules"]):
            mut, metrics = s["jitted"](mut, s["frozen"], s["batch"])  # first call compiles (cached executable)
            jax.block_until_ready(mut)
            compiles.clear()
            old_policy_leaf = jax.tree.leaves(mut.policy)[0]
            ref_leaf = jax.tree.leaves(s["frozen"].ref)[0]
            with jax.transfer_guard("disallow"):  # no host round trip inside the step
                mut2, metrics2 = s["jitted"](mut, s["frozen"], s["batch"])
                jax.block_until_ready(mut2)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert s["jitted"]._cache_size() == 1
    # Donation: the mutable state's buffers were consumed; the reference was not.
    assert old_policy_leaf.is_deleted()
    assert not ref_leaf.is_deleted()
    m = jax.device_get(metrics2)
    assert bool(m["finite"]) and 0.0 <= float(m["pref_mean"]) <= 1.0
    assert int(mut2.step) == 2
    s["mut"] = mut2


def test_reference_stays_frozen_and_policy_moves(nash_md):
    s = nash_md
    ref_before = [np.asarray(x).copy() for x in jax.tree.leaves(s["frozen"].ref)]
    mut = s["mut"]
    with parallel.activate(s["mesh"], s["rules"]):
        for _ in range(3):
            mut, _ = s["jitted"](mut, s["frozen"], s["batch"])
    for a, b in zip(ref_before, jax.tree.leaves(s["frozen"].ref)):
        np.testing.assert_array_equal(a, np.asarray(b))
    tokens = s["batch"]["prompt"]
    mask = s["batch"]["prompt_mask"]
    logits = jax.jit(functools.partial(models.lm_logits, s["graphdef"]))
    pol, ref = logits(mut.policy, tokens, mask), logits(s["frozen"].ref, tokens, mask)
    assert float(jnp.max(jnp.abs(pol - ref))) > 1e-3
    s["mut"] = mut


def test_sampler_and_scorer_log_probs_agree():
    """The teacher-forced log-probs the loss uses equal the sampler's log pi_T of the tokens it drew (at a
    temperature other than 1, where both sides must apply it)."""
    temperature = 0.7
    graphdef, params = models.init(CFG, "lm", 5)
    data = synthetic.prompt_dataset(DATA, "eval")
    prompt, pmask = jnp.asarray(data["prompt"][:8]), jnp.asarray(data["prompt_mask"][:8])
    out = jax.jit(functools.partial(
        sampling.sample, graphdef, max_new_tokens=6, eos_id=synthetic.EOS_ID, pad_id=synthetic.PAD_ID,
        temperature=temperature))(params, prompt, pmask, jax.random.PRNGKey(3))
    mask = out.mask.astype(jnp.float32)
    logp, _ = jax.jit(functools.partial(step_lib.response_logprobs, graphdef, temperature=temperature))(
        params, prompt, pmask, out.tokens, mask)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(out.logp_policy) * np.asarray(mask), atol=2e-5)
    assert float(mask.sum()) > 8


def test_ema_recursion_closed_form_with_an_in_jit_oracle():
    """Nash-EMA-PG judged by a JAX preference oracle traced into the step (the model-free variant):
    theta_bar_1 = d theta_bar_0 + (1 - d) theta_1."""
    oracle = step_lib.Judge("oracle", fn=synthetic.synthetic_preference)
    s = _setup("nash_ema_pg", judge=oracle, tau=0.1, ema_decay=0.75)
    ema0 = [np.asarray(x).copy() for x in jax.tree.leaves(s["mut"].ema)]
    with parallel.activate(s["mesh"], s["rules"]):
        mut, metrics = s["jitted"](s["mut"], s["frozen"], s["batch"])
    assert 0.0 < float(metrics["pref_mean"]) < 1.0 and bool(metrics["finite"])
    policy1 = [np.asarray(x) for x in jax.tree.leaves(mut.policy)]
    ema1 = [np.asarray(x) for x in jax.tree.leaves(mut.ema)]
    for e0, p1, e1 in zip(ema0, policy1, ema1):
        np.testing.assert_allclose(e1, 0.75 * e0 + 0.25 * p1, rtol=1e-6, atol=1e-7)
    assert any(np.max(np.abs(p1 - e0)) > 0 for e0, p1 in zip(ema0, policy1))


def test_sft_prompt_loss_against_a_numpy_reference():
    """NLL(response) + w NLL(prompt): per-token means over real targets only (left padding and the first prompt
    token excluded), checked against a per-position loop in numpy; uniform logits give (1 + w) log V."""
    w = 0.7
    stage = cfg_lib.stage("sft", lr=0.0, batch_size=B, steps=1, prompt_loss_weight=w)
    tx = state_lib.make_optimizer(stage)
    data = synthetic.sft_dataset(DATA, "train")
    batch = {k: jnp.asarray(v[:B]) for k, v in data.items()}
    batch["prompt_mask"] = batch["prompt_mask"].at[0, :3].set(0.0)  # a left-padded row
    batch["prompt"] = batch["prompt"].at[0, :3].set(synthetic.PAD_ID)
    graphdef, params = models.init(CFG, "lm", 3)
    step = jax.jit(functools.partial(step_lib.sft_step, graphdef, tx, w))
    _, metrics = step(state_lib.init_state(params, tx, 0), step_lib.Frozen(), batch)

    tokens = np.concatenate([batch["prompt"], batch["response"]], 1)
    mask = np.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
    logits = np.asarray(models.lm_logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p_len = batch["prompt"].shape[1]
    prompt_terms, response_terms = [], []
    for b in range(B):
        for t in range(1, tokens.shape[1]):
            if t < p_len and mask[b, t] and mask[b, t - 1]:
                prompt_terms.append(-logp[b, t - 1, tokens[b, t]])
            elif t >= p_len and mask[b, t]:
                response_terms.append(-logp[b, t - 1, tokens[b, t]])
    real = np.asarray(batch["prompt_mask"]).sum(1)  # left padding: the real tokens are contiguous
    assert len(prompt_terms) == int(np.maximum(real - 1, 0).sum()) and real[0] <= p_len - 3
    np.testing.assert_allclose(float(metrics["prompt_nll_per_token"]), np.mean(prompt_terms), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["nll_per_token"]), np.mean(response_terms), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(response_terms) + w * np.mean(prompt_terms),
                               rtol=2e-5)

    zeros = jax.tree.map(jnp.zeros_like, params)  # every logit 0: the uniform distribution over V tokens
    _, metrics = step(state_lib.init_state(zeros, tx, 0), step_lib.Frozen(), batch)
    np.testing.assert_allclose(float(metrics["loss"]), (1 + w) * np.log(CFG.vocab_size), rtol=1e-6)


def test_egpo_step_is_the_extragradient_of_the_online_ipo_loss():
    """EGPO (docs: nlhf_math.md, EGPO): theta' = theta_t - lr grad L_IPO(theta_t; pairs from pi_t), then
    theta_{t+1} = theta_t - lr grad L_IPO(theta_t; pairs from pi_theta'), with AdamW as the step and one optimizer
    state (the provisional step's is discarded). Plain SGD here, so that the update is the formula itself; rebuilt
    from the sampler, the IPO loss and optax alone."""
    import optax

    from nash_lm.train.algorithms.ipo import ipo_loss

    tx = optax.sgd(0.5)
    s = _setup("egpo", tx=tx, tau=1.0)
    mut, ref, pref, batch, gd = s["mut"], s["frozen"].ref, s["frozen"].judge, s["batch"], s["graphdef"]
    policy0 = jax.tree.map(np.asarray, mut.policy)
    opt0, rng0 = jax.tree.map(np.asarray, mut.opt_state), np.asarray(mut.rng)
    with parallel.activate(s["mesh"], s["rules"]):
        got, metrics = s["jitted"](mut, s["frozen"], batch)
    prompt, pmask = np.asarray(batch["prompt"]), np.asarray(batch["prompt_mask"])
    kw = dict(max_new_tokens=6, eos_id=synthetic.EOS_ID, pad_id=synthetic.PAD_ID, temperature=1.0)

    def pairs(params, rng):
        rng, k1, k2 = jax.random.split(rng, 3)
        y, y2 = sampling.sample_pair(gd, params, prompt, pmask, (k1, k2), **kw)
        p = models.preference_prob(s["judge"].graphdef, pref, prompt, pmask, y.tokens,
                                   y.mask.astype(jnp.float32), y2.tokens, y2.mask.astype(jnp.float32))
        return rng, (y.tokens, y.mask.astype(jnp.float32), y2.tokens, y2.mask.astype(jnp.float32), p)

    def loss(params, sample):
        y, ym, y2, y2m, p = sample
        lp = lambda prm, r, m: step_lib.response_logprobs(gd, prm, prompt, pmask, r, m)[0]
        return ipo_loss(lp(params, y, ym), lp(ref, y, ym), ym, lp(params, y2, y2m), lp(ref, y2, y2m), y2m,
                               p, 1.0)[0]

    rng, first = pairs(policy0, rng0)
    updates, _ = tx.update(jax.grad(loss)(policy0, first), opt0, policy0)
    provisional = optax.apply_updates(policy0, updates)
    rng, second = pairs(provisional, rng)
    updates, _ = tx.update(jax.grad(loss)(policy0, second), opt0, policy0)
    want = optax.apply_updates(policy0, updates)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got.policy)):  # float32 sums in another order: an
        a = np.asarray(a)  # absolute tolerance relative to the tensor (one element in 1,024 was 3e-5 off relatively)
        np.testing.assert_allclose(a, np.asarray(b), rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(a).max())))
    np.testing.assert_array_equal(np.asarray(got.rng), np.asarray(rng))
    # the lookahead matters: the step from the first pairs (online IPO) lands elsewhere
    updates, _ = tx.update(jax.grad(loss)(policy0, first), opt0, policy0)
    plain = optax.apply_updates(policy0, updates)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(want))) > 1e-4
