"""Token-level games against brute force: explicit per-sequence products and per-prefix normalisers written as
plain Python loops, the closed forms of nash_lm.games, and Calandriello et al.'s Prop. 5.2 as an independent
prediction of the sequence-mixture fixed point."""
import itertools
import math

import numpy as np
import pytest

from nash_lm import games
from nash_lm.tasks import token_game as tg

V, L = 3, 3


def _random_table(seed, scale=1.5):
    return np.random.default_rng(seed).normal(size=(tg.n_prefixes(V, L), V)) * scale


def _brute_prob(table, y):
    """pi(y) by an explicit loop over positions, finding the prefix row by a dictionary of all prefixes."""
    rows = {}
    for n in range(L):
        for p in itertools.product(range(V), repeat=n):
            rows[p] = len(rows)
    prob = 1.0
    for n in range(L):
        z = table[rows[tuple(y[:n])]]
        e = [math.exp(v) for v in z]
        prob *= e[y[n]] / sum(e)
    return prob


def test_enumeration():
    seqs = tg.all_sequences(V, L)
    assert seqs.shape == (27, 3) and len({tuple(s) for s in seqs}) == 27
    assert list(seqs[5]) == [0, 1, 2] and list(seqs[-1]) == [2, 2, 2]
    assert tg.n_prefixes(V, L) == 1 + 3 + 9
    assert tg.n_prefixes(4, 5) == 1 + 4 + 16 + 64 + 256


def test_sequence_logprobs_match_brute_force_and_invert():
    table = _random_table(0)
    logp = tg.sequence_logprobs(table, V, L)
    brute = [_brute_prob(table, y) for y in tg.all_sequences(V, L)]
    np.testing.assert_allclose(np.exp(logp), brute, rtol=1e-12)
    assert abs(np.exp(logp).sum() - 1) < 1e-12
    back = tg.conditionals(logp, V, L)
    z = table - np.log(np.exp(table).sum(-1, keepdims=True))
    np.testing.assert_allclose(back, z, atol=1e-12)
    # an arbitrary distribution over sequences is representable
    q = np.random.default_rng(1).dirichlet(np.ones(27))
    np.testing.assert_allclose(np.exp(tg.sequence_logprobs(tg.conditionals(np.log(q), V, L), V, L)), q, rtol=1e-10)


def test_token_mixture_by_explicit_normalisers():
    pi_t, mu_t = _random_table(2), _random_table(3)
    beta = 0.3
    tok = tg.token_mixture(pi_t, mu_t, beta, V, L)
    assert abs(np.exp(tok).sum() - 1) < 1e-12
    lp, lm = tg.sequence_logprobs(pi_t, V, L), tg.sequence_logprobs(mu_t, V, L)
    # log pi~(y) = (1-b) log pi(y) + b log mu(y) - sum_n log C(y_<n), C = sum_v pi(v|.)^(1-b) mu(v|.)^b
    seqs = tg.all_sequences(V, L)
    rows = tg.prefix_rows(V, L)
    P = np.exp(pi_t) / np.exp(pi_t).sum(-1, keepdims=True)
    M = np.exp(mu_t) / np.exp(mu_t).sum(-1, keepdims=True)
    for i, y in enumerate(seqs):
        logC = sum(math.log(sum(P[rows[i, n], v] ** (1 - beta) * M[rows[i, n], v] ** beta for v in range(V)))
                   for n in range(L))
        assert abs(tok[i] - ((1 - beta) * lp[i] + beta * lm[i] - logC)) < 1e-12
    seq = tg.sequence_mixture(lp, lm, beta)
    gap = tg.mixture_gap(pi_t, mu_t, beta, V, L)
    assert gap["kl_token_vs_sequence"] > 1e-4  # generic policies: the two mixtures differ
    p, q = np.exp(tok), np.exp(seq)
    assert abs(gap["kl_token_vs_sequence"] - float(np.sum(p * np.log(p / q)))) < 1e-12
    assert abs(gap["tv"] - 0.5 * float(np.abs(p - q).sum())) < 1e-12


def test_token_mixture_equals_sequence_mixture_when_normaliser_is_prefix_independent():
    rng = np.random.default_rng(4)
    # i.i.d. tokens: the same next-token distribution after every prefix, so C(prefix) is a constant
    pi_t = np.tile(rng.normal(size=V), (tg.n_prefixes(V, L), 1))
    mu_t = np.tile(rng.normal(size=V), (tg.n_prefixes(V, L), 1))
    for beta in (0.0, 0.125, 0.5, 1.0):
        gap = tg.mixture_gap(pi_t, mu_t, beta, V, L)
        assert gap["kl_token_vs_sequence"] < 1e-13 and gap["tv"] < 1e-13
    # beta in {0, 1} gives equality for any policies
    for beta in (0.0, 1.0):
        assert tg.mixture_gap(_random_table(5), _random_table(6), beta, V, L)["tv"] < 1e-13


def test_lifted_preference_is_a_game_and_non_transitive():
    game = tg.lift("rps", V, L, contexts=2, seed=0)
    Pg = games.instances.make("rps").P
    seqs = tg.all_sequences(V, L)
    for x in range(2):
        for i, j in [(0, 1), (4, 20), (26, 13)]:
            a, b = (seqs[i].sum() + x) % 3, (seqs[j].sum() + x) % 3
            assert game.P[x, i, j] == Pg[a, b]
    np.testing.assert_allclose(game.P + np.swapaxes(game.P, 1, 2), 1.0)
    np.testing.assert_allclose(game.mu.sum(-1), 1.0)
    # a cycle of three sequences, each strictly preferred to the next
    i, j, k = 0, 1, 2  # token sums 0, 1, 2 -> rock, paper, scissors
    assert game.P[0, j, i] == 1 and game.P[0, k, j] == 1 and game.P[0, i, k] == 1
    ident = tg.lift("random", 2, 3, mapping="identity", seed=1)
    assert ident.P.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="identity"):
        tg.lift("rps", 2, 3, mapping="identity")


def test_duality_gap_and_equilibrium():
    game = tg.lift("dice", V, L, contexts=2, seed=3)
    tau = 0.05
    pi_star = tg.equilibrium(game, tau)
    assert tg.duality_gap(game, tau, pi_star) < 1e-10
    # the closed form written out directly
    def gap(pi):
        out = 0.0
        for x in range(2):
            v = game.P[x] @ pi[x]
            lse = np.log(np.sum(game.mu[x] * np.exp(v / tau)))
            kl = np.sum(pi[x] * np.log(pi[x] / game.mu[x]))
            out += 0.5 * (2 * (tau * lse + tau * kl) - 1)
        return out
    assert abs(tg.duality_gap(game, tau, game.mu) - gap(game.mu)) < 1e-10
    assert gap(game.mu) > 1e-3


def test_sequence_mixture_fixed_point_matches_prop_5_2_and_token_one_differs():
    game = tg.lift("rps", 2, 3, contexts=1, seed=2, mu_scale=1.0)
    tau, beta = 0.5, 0.25
    seq = tg.mixture_fixed_point(game, tau, beta, "sequence")
    assert seq["residual"] < 1e-10
    target = games.nash_equilibrium(game.P[0], game.mu[0], tau / (1 - beta))
    np.testing.assert_allclose(seq["opponent"][0], target, atol=1e-9)
    tok = tg.mixture_fixed_point(game, tau, beta, "token")
    assert tok["residual"] < 1e-10
    # the token-level opponent is not pi*_{tau/(1-beta)}: the two mixtures lead to different equilibria
    assert np.abs(tok["pi"] - seq["pi"]).sum() > 1e-6
    # beta = 0 (self-play): both are the regularised equilibrium pi*_tau
    sp = tg.mixture_fixed_point(game, tau, 0.0, "token")
    np.testing.assert_allclose(sp["pi"][0], games.nash_equilibrium(game.P[0], game.mu[0], tau), atol=1e-9)


def test_model_table_reads_a_causal_model():
    # a "model" whose logits at position t depend only on tokens <= t: logits = table row of that prefix
    table = _random_table(7)
    prompt_len, vocab, ids = 2, 6, [3, 4, 5]
    seqs = tg.all_sequences(V, L)
    rows = tg.prefix_rows(V, L)
    logits = np.full((27, prompt_len + L, vocab), -1.0)
    for i in range(27):
        for n in range(L):
            logits[i, prompt_len - 1 + n, ids] = table[rows[i, n]]
    got = tg.model_table(logits, V, L, prompt_len, ids)
    np.testing.assert_allclose(np.exp(tg.sequence_logprobs(got, V, L)),
                               np.exp(tg.sequence_logprobs(table, V, L)), rtol=1e-12)
