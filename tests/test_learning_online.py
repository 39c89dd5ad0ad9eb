"""Online learning (nash_lm.learning.online): the uncertainty Γ against its tabular closed form, the enhancer
against brute-force search over the simplex, and a short end-to-end run."""
import itertools

import numpy as np
import pytest

from nash_lm import games, learning
from nash_lm.learning.online import enhancer_policy, uncertainty


def _gamma_tabular(pi1, pi2, N, lam):
    a, b = np.triu_indices(len(pi1), 1)
    v = pi1[a] * pi2[b] - pi1[b] * pi2[a]
    return np.sqrt(np.sum(v ** 2 / (lam + N[a, b])))


def test_uncertainty_closed_form_and_zero_on_self_play():
    rng = np.random.default_rng(0)
    n, lam = 4, 2.0
    N = rng.integers(0, 50, size=(n, n)).astype(float)
    N = np.triu(N, 1) + np.triu(N, 1).T
    a, b = np.triu_indices(n, 1)
    Sigma = np.diag(lam + N[a, b])  # design matrix of the one-hot features with these pair counts
    phi = learning.tabular_features(1, n)
    pi1, pi2 = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(n))
    assert uncertainty(phi, Sigma, pi1, pi2) == pytest.approx(_gamma_tabular(pi1, pi2, N, lam), rel=1e-12)
    assert uncertainty(phi, Sigma, pi1, pi1) == pytest.approx(0.0, abs=1e-15)


def test_enhancer_is_feasible_and_beats_grid_search():
    n, lam, tau, beta = 3, 1.0, 0.2, 0.5
    N = np.array([[0, 40, 2], [40, 0, 10], [2, 10, 0]], dtype=float)
    a, b = np.triu_indices(n, 1)
    Sigma = np.diag(lam + N[a, b])
    phi = learning.tabular_features(1, n)
    pi1 = np.array([0.5, 0.3, 0.2])
    pi2 = enhancer_policy(phi, Sigma, pi1, tau, beta)[0]
    kl = lambda p: np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) / pi1), 0.0))
    g = _gamma_tabular(pi1, pi2, N, lam)
    assert tau * kl(pi2) <= beta * g + 1e-8  # in the plausible set
    best = 0.0
    for i, j in itertools.product(range(201), repeat=2):
        if i + j > 200:
            continue
        p = np.array([i, j, 200 - i - j]) / 200
        gp = _gamma_tabular(pi1, p, N, lam)
        if tau * kl(p) <= beta * gp:
            best = max(best, gp)
    assert best > 0
    assert g >= best - 1e-6, (g, best)


def test_enhancer_falls_back_to_self_play_when_certain():
    n = 3
    phi = learning.tabular_features(1, n)
    pi1 = np.array([0.2, 0.3, 0.5])
    pi2 = enhancer_policy(phi, 1e12 * np.eye(3), pi1, tau=0.1, beta=1.0)[0]
    assert np.abs(pi2 - pi1).max() < 1e-3


def test_online_runs_reduce_the_gap():
    rng = np.random.default_rng(1)
    n, tau = 4, 0.1
    L = np.tril(0.3 + 0.4 * rng.uniform(size=(n, n)), -1)
    P = L + np.triu(1 - L.T, 1)
    P[0, 1:], P[1:, 0] = 0.85, 0.15  # a hidden winner that μ rarely plays
    np.fill_diagonal(P, 0.5)
    mu = np.array([0.05, 0.15, 0.3, 0.5])
    for strategy in ("enhancer", "symmetric", "uniform"):
        rec = learning.run_online(P, mu, tau, strategy, batches=6, batch_size=400, beta=0.5,
                                  rng=np.random.default_rng(2))
        assert [r["labels"] for r in rec] == [400 * t for t in range(7)]
        assert rec[0]["half_gap"] == pytest.approx(0.5 * games.duality_gap(P, mu, tau, mu), abs=1e-12)
        assert rec[-1]["half_gap"] < rec[0]["half_gap"] / 5, (strategy, rec)
    with pytest.raises(ValueError, match="strategy"):
        learning.run_online(P, mu, tau, "greedy", batches=1, batch_size=1, rng=rng)
