"""Loss functions against independent computations on an enumerable token-level game.

The case: a tabular autoregressive softmax policy over vocabulary {0, 1, 2} where token 2 is EOS, responses of at
most 3 tokens (15 distinct responses), a random antisymmetric preference matrix over responses, a tabular mu.
The exact regularized objective is written directly over the 15 responses (no per-token decomposition), and its
gradient is taken with jax.grad; every loss is checked against it (exact expectation by enumeration, and a
statistical test of the sample mean with a fixed seed). TRL's Nash-MD loss is written here from its published
formula (trl 1.13.0: beta * sum_t sg(logpi_t - logmu_t) * logpi_t - (p - 1/2) * sum_t logpi_t) to show that it is
biased on the same case.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nash_lm.train.algorithms.ipo import ipo_loss
from nash_lm.train.algorithms.nash_md_pg import nash_md_pg_loss
from nash_lm.train.algorithms.rlhf import rlhf_pg_loss
from nash_lm.train.losses import bradley_terry_loss, preference_ce_loss, reward_to_go, sft_loss

V, L, EOS = 3, 3, 2
OFFSET = [0, 1, 4]  # prefix table offsets for prefixes of length 0, 1, 2
N_PREFIX = 13


def _responses():
    """All responses: stop at EOS or after L tokens; padded with 0, with masks."""
    out = []
    for n in range(1, L + 1):
        for toks in itertools.product(range(V), repeat=n):
            if any(t == EOS for t in toks[:-1]):
                continue
            if n < L and toks[-1] != EOS:
                continue
            out.append((list(toks) + [0] * (L - n), [1.0] * n + [0.0] * (L - n)))
    toks = np.array([t for t, _ in out], np.int32)
    mask = np.array([m for _, m in out], np.float32)
    return toks, mask


TOKS, MASK = _responses()
NY = len(TOKS)


def _prefix_index(toks):
    idx, val = [], 0
    for n in range(L):
        idx.append(OFFSET[n] + val)
        val = val * V + int(toks[n])
    return idx


PREFIX_IDX = np.array([_prefix_index(t) for t in TOKS], np.int32)  # [NY, L]


def token_logp(table, toks, prefix_idx):
    """log softmax(table[prefix])[token] per position: `[..., L]`."""
    logits = table[prefix_idx]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[..., None], -1)[..., 0]


def seq_logprob(table):
    """log pi(y) of all NY responses under a tabular policy."""
    return jnp.sum(token_logp(table, jnp.asarray(TOKS), jnp.asarray(PREFIX_IDX)) * MASK, -1)


def mixture_table(table_a, table_b, beta):
    """Token-level geometric mixture: per prefix, log_softmax((1-beta) log pi_a + beta log pi_b)."""
    return jax.nn.log_softmax((1 - beta) * jax.nn.log_softmax(table_a, -1) + beta * jax.nn.log_softmax(table_b, -1), -1)


@pytest.fixture(scope="module")
def game():
    rng = np.random.default_rng(7)
    theta = jnp.asarray(rng.normal(size=(N_PREFIX, V)) * 1.2, jnp.float32)
    mu = jnp.asarray(rng.normal(size=(N_PREFIX, V)) * 1.5, jnp.float32)
    upper = rng.uniform(size=(NY, NY))
    pref = np.triu(upper, 1) + np.tril(1.0 - upper.T, -1)
    np.fill_diagonal(pref, 0.5)
    assert np.allclose(pref + pref.T, 1.0)
    return theta, mu, jnp.asarray(pref, jnp.float32)


def test_enumeration_is_a_distribution(game):
    theta, mu, _ = game
    assert NY == 15
    np.testing.assert_allclose(jnp.sum(jnp.exp(seq_logprob(theta))), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(jnp.exp(seq_logprob(mixture_table(theta, mu, 0.3)))), 1.0, rtol=1e-6)


def exact_regularized_objective(theta, mu, pref, opponent_probs, tau):
    """P_tau(pi_theta > pi') up to a theta-free constant, written over whole responses."""
    logp = seq_logprob(theta)
    p = jnp.exp(logp)
    return p @ (pref @ opponent_probs) - tau * jnp.sum(p * (logp - seq_logprob(mu)))


def _per_pair_grad(loss_fn, theta, mu, i, j, pref_ij):
    """Gradient estimate (minus the loss gradient) for one pair of response indices."""

    def f(th):
        logp = token_logp(th, jnp.asarray(TOKS)[i][None], jnp.asarray(PREFIX_IDX)[i][None])
        ref = token_logp(mu, jnp.asarray(TOKS)[i][None], jnp.asarray(PREFIX_IDX)[i][None])
        return loss_fn(logp, ref, jnp.asarray(MASK)[i][None], pref_ij[None])

    return -jax.grad(f)(theta)


def ours(tau):
    return lambda logp, ref, mask, p: nash_md_pg_loss(logp, ref, mask, p, tau)[0]


def trl(tau):
    """TRL 1.13.0's Nash-MD loss (its `beta` is the paper's tau), written from the published formula."""

    def loss(logp, ref, mask, p):
        kl_term = jnp.sum(jax.lax.stop_gradient(logp - ref) * logp * mask, -1)
        score_term = (p - 0.5) * jnp.sum(logp * mask, -1)
        return jnp.mean(tau * kl_term - score_term)

    return loss


def _expected_estimate(loss_fn, theta, mu, pref, opponent_probs):
    """E_{y ~ pi_theta, y' ~ pi'}[g(y, y')] by exact enumeration of all pairs."""
    p_y = jnp.exp(seq_logprob(theta))
    ii, jj = np.meshgrid(np.arange(NY), np.arange(NY), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    grads = jax.vmap(lambda i, j: _per_pair_grad(loss_fn, theta, mu, i, j, pref[i, j]))(ii, jj)
    w = p_y[ii] * opponent_probs[jj]
    return jnp.tensordot(w, grads, axes=1)


TAU = 0.7
BETA = 0.5


def test_nash_md_pg_expectation_is_the_exact_gradient(game):
    theta, mu, pref = game
    opp = jnp.exp(seq_logprob(mixture_table(theta, mu, BETA)))
    exact = jax.grad(exact_regularized_objective)(theta, mu, pref, opp, TAU)
    np.testing.assert_allclose(_expected_estimate(ours(TAU), theta, mu, pref, opp), exact, atol=2e-5)


def test_trl_estimator_is_biased_and_agrees_without_kl(game):
    theta, mu, pref = game
    opp = jnp.exp(seq_logprob(mixture_table(theta, mu, BETA)))
    exact = jax.grad(exact_regularized_objective)(theta, mu, pref, opp, TAU)
    trl_mean = _expected_estimate(trl(TAU), theta, mu, pref, opp)
    assert float(jnp.linalg.norm(trl_mean - exact)) > 0.2 * float(jnp.linalg.norm(exact))
    # With tau = 0 there is no KL term and both estimators are the same function of the samples.
    for i, j in [(0, 3), (5, 11), (14, 2)]:
        np.testing.assert_allclose(
            _per_pair_grad(ours(0.0), theta, mu, i, j, pref[i, j]),
            _per_pair_grad(trl(0.0), theta, mu, i, j, pref[i, j]), atol=1e-6)


def _sample(table, key, n):
    """Ancestral sampling of n responses from a tabular (log-)policy; returns response indices."""
    keys = jax.random.split(key, L)
    toks = np.zeros((n, L), np.int32)
    alive = np.ones(n, bool)
    val = np.zeros(n, np.int64)
    for pos in range(L):
        logits = np.asarray(table)[OFFSET[pos] + val]
        draw = np.asarray(jax.random.categorical(keys[pos], jnp.asarray(logits), axis=-1))
        toks[:, pos] = np.where(alive, draw, 0)
        val = val * V + toks[:, pos]
        alive = alive & (draw != EOS)
    lookup = {tuple(t): k for k, t in enumerate(TOKS)}
    return np.array([lookup[tuple(t)] for t in toks])


@pytest.mark.parametrize("name,expect_unbiased", [("ours", True), ("trl", False)])
def test_nash_md_pg_sample_mean_statistical(game, name, expect_unbiased):
    """Sample mean over 20k sampled pairs vs the exact gradient, in standard errors (fixed seed)."""
    theta, mu, pref = game
    mix = mixture_table(theta, mu, BETA)
    exact = np.asarray(jax.grad(exact_regularized_objective)(theta, mu, pref, jnp.exp(seq_logprob(mix)), TAU))
    n = 20000
    k1, k2 = jax.random.split(jax.random.PRNGKey(123))
    y, y2 = _sample(theta, k1, n), _sample(mix, k2, n)
    loss_fn = ours(TAU) if name == "ours" else trl(TAU)
    grads = np.asarray(jax.vmap(lambda i, j: _per_pair_grad(loss_fn, theta, mu, i, j, pref[i, j]))(y, y2))
    grads = grads.reshape(n, -1)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(n)
    live = se > 1e-6  # unreachable prefixes have zero gradient in every sample
    z = (mean[live] - exact.ravel()[live]) / se[live]
    if expect_unbiased:
        assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))
        # Whole-vector check: the squared z-scores sum like a chi-square with `live` degrees of freedom
        # (correlations between the coordinates aside); 3 sigma upper bound.
        k = int(live.sum())
        assert np.sum(z**2) < k + 3 * np.sqrt(2 * k) + 10
    else:
        assert np.max(np.abs(z)) > 10, np.max(np.abs(z))


def test_best_response_and_self_play_opponents(game):
    """beta = 1 plays against mu, beta = 0 against pi_theta: the token-level mixture reduces to them exactly."""
    theta, mu, _ = game
    np.testing.assert_allclose(mixture_table(theta, mu, 1.0), jax.nn.log_softmax(mu, -1), atol=1e-6)
    np.testing.assert_allclose(mixture_table(theta, mu, 0.0), jax.nn.log_softmax(theta, -1), atol=1e-6)


def test_reward_to_go_masks():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(reward_to_go(x, m), [[6.0, 5.0, 3.0, 0.0]])


def test_rlhf_expectation_is_the_exact_gradient(game):
    """Batch of two i.i.d. samples with the leave-one-out baseline: E[g] = grad(E r - tau KL) exactly."""
    theta, mu, _ = game
    reward = jnp.asarray(np.random.default_rng(3).normal(size=NY), jnp.float32)

    def exact_obj(th):
        logp = seq_logprob(th)
        p = jnp.exp(logp)
        return p @ reward - TAU * jnp.sum(p * (logp - seq_logprob(mu)))

    def batch_grad(i, j):
        idx = jnp.stack([i, j])

        def f(th):
            logp = token_logp(th, jnp.asarray(TOKS)[idx], jnp.asarray(PREFIX_IDX)[idx])
            ref = token_logp(mu, jnp.asarray(TOKS)[idx], jnp.asarray(PREFIX_IDX)[idx])
            return rlhf_pg_loss(logp, ref, jnp.asarray(MASK)[idx], reward[idx], TAU)[0]

        return -jax.grad(f)(theta)

    p_y = jnp.exp(seq_logprob(theta))
    ii, jj = (a.ravel() for a in np.meshgrid(np.arange(NY), np.arange(NY), indexing="ij"))
    expected = jnp.tensordot(p_y[ii] * p_y[jj], jax.vmap(batch_grad)(ii, jj), axes=1)
    np.testing.assert_allclose(expected, jax.grad(exact_obj)(theta), atol=2e-5)


def _ipo_pair_grad(theta, mu, i, j, p_ij, tau):
    def f(th):
        a = lambda k, t: token_logp(t, jnp.asarray(TOKS)[k][None], jnp.asarray(PREFIX_IDX)[k][None])
        m = lambda k: jnp.asarray(MASK)[k][None]
        return ipo_loss(a(i, th), a(i, mu), m(i), a(j, th), a(j, mu), m(j), p_ij[None], tau)[0]

    return jax.grad(f)(theta)


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_ipo_expected_gradient_closed_form(game, beta):
    """E_{y,y' ~ pi_s}[grad L_IPO] = (4/tau) * ( E_s[grad log pi (tau r - P(y > pi_s) + 1/2)] - tau E_s[grad log pi] E_s[r] )

    where pi_s is the sampling policy (pi_theta for online IPO, the token-level mixture for IPO-MD) and
    r = log(pi_theta/mu). Derivation: grad L = 2 grad h (h - (2p - 1)/(2 tau)), expanded with P antisymmetric.
    For online IPO the second term vanishes and the expectation is -(4/tau) grad P_tau(pi_theta > sg pi_theta).
    """
    theta, mu, pref = game
    tau = 0.5
    sampler = mixture_table(theta, mu, beta) if beta else theta
    ps = jnp.exp(seq_logprob(sampler))
    ii, jj = (a.ravel() for a in np.meshgrid(np.arange(NY), np.arange(NY), indexing="ij"))
    grads = jax.vmap(lambda i, j: _ipo_pair_grad(theta, mu, i, j, pref[i, j], tau))(ii, jj)
    expected = jnp.tensordot(ps[ii] * ps[jj], grads, axes=1)

    score = jax.jacobian(seq_logprob)(theta)  # [NY, prefix, V]
    r = seq_logprob(theta) - seq_logprob(mu)
    win = pref @ ps
    term1 = jnp.tensordot(ps * (tau * r - win + 0.5), score, axes=1)
    term2 = tau * jnp.tensordot(ps, score, axes=1) * jnp.sum(ps * r)
    np.testing.assert_allclose(expected, (4.0 / tau) * (term1 - term2), atol=5e-5)
    if beta == 0.0:
        sp = jax.grad(exact_regularized_objective)(theta, mu, pref, ps, tau)
        np.testing.assert_allclose(expected, -(4.0 / tau) * sp, atol=5e-5)


def test_preference_and_reward_losses_closed_form():
    prob = jnp.array([0.9, 0.2, 0.6, 0.5])
    label = jnp.array([1.0, 0.0, 0.25, 1.0])
    loss, m = preference_ce_loss(prob, label)
    expected = -np.mean([np.log(0.9), np.log(0.8), 0.25 * np.log(0.6) + 0.75 * np.log(0.4), np.log(0.5)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # decided pairs: all four; correct: 0.9 vs 1 yes, 0.2 vs 0 yes, 0.6 vs 0.25 no, 0.5 vs 1 no
    np.testing.assert_allclose(m["accuracy"], 0.5)

    r1, r2 = jnp.array([2.0, -1.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
    lab = jnp.array([1.0, 0.3, 0.5])
    loss, m = bradley_terry_loss(r1, r2, lab)
    sig = lambda t: 1 / (1 + np.exp(-t))
    expected = -np.mean([np.log(sig(2.0)), 0.3 * np.log(sig(-2.0)) + 0.7 * np.log(sig(2.0)), np.log(0.5)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 1.0)  # pair 3 (label 1/2) is excluded


def test_sft_loss_is_token_mean_nll():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = sft_loss(logp, mask)
    np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.25) + np.log(0.1)) / 3, rtol=1e-6)
