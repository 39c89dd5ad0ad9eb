"""Offline estimators (nash_lm.learning.pessimism): uncertainty-set oracles against scipy, pessimistic
solutions against closed forms (2 actions) and an independent scipy reduction (one uncertain entry), and all
three methods against games.nash_equilibrium as the data become exact."""
import numpy as np
import pytest
from scipy import optimize

from nash_lm import games, learning
from nash_lm.learning.pessimism import BonusSet, VersionSpace, pessimistic_equilibrium


def _random_P(rng, n):
    L = np.tril(rng.uniform(size=(n, n)), -1)
    P = L + np.triu(1 - L.T, 1)
    np.fill_diagonal(P, 0.5)
    return P


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_version_space_oracle_matches_scipy():
    rng = np.random.default_rng(0)
    n = 4
    P_hat = _random_P(rng, n)
    P_hat[0, 1], P_hat[1, 0] = 0.02, 0.98  # near the box
    N = np.array([[0, 5, 0, 30], [5, 0, 12, np.inf], [0, 12, 0, 3], [30, np.inf, 3, 0]], dtype=float)
    vs = VersionSpace(P_hat, N, beta=1.5)
    a, b = np.triu_indices(n, 1)
    for trial in range(5):
        G = rng.normal(size=(1, 1, n, n))
        D = vs.lmo(G)[0, 0]
        g = G[0, 0, a, b] - G[0, 0, b, a]
        free = ~np.isinf(N[a, b])
        cons = [{"type": "ineq", "fun": lambda d: vs.r2 - np.sum(N[a, b][free] * d[free] ** 2)}]
        bounds = [(-P_hat[i, j], 1 - P_hat[i, j]) if f else (0.0, 0.0) for i, j, f in zip(a, b, free)]
        ref = optimize.minimize(lambda d: g @ d, np.zeros(a.size), jac=lambda d: g, method="SLSQP",
                                bounds=bounds, constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
        ours = D[a, b]
        assert g @ ours <= ref.fun + 1e-8
        assert np.sum(N[a, b][free] * ours[free] ** 2) <= vs.r2 * (1 + 1e-9)
        assert np.all(P_hat[a, b] + ours >= -1e-12) and np.all(P_hat[a, b] + ours <= 1 + 1e-12)
        np.testing.assert_allclose(D, -D.T, atol=0)
        assert np.all(ours[~free] == 0)


def test_bonus_is_the_minimum_over_the_theta_ellipsoid():
    rng = np.random.default_rng(1)
    psi = rng.normal(size=(4, 2))
    phi = np.concatenate([learning.bt_features(psi), learning.skew_features(psi)], -1)
    A = rng.normal(size=(3, 3))
    Sigma, beta = A @ A.T + np.eye(3), 0.7
    bs = BonusSet(np.full((4, 4), 0.5), phi, Sigma, beta)
    pi1, pi2 = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
    G = (pi1[:, None] * pi2[None, :])[None, None]
    v = np.einsum("ab,xabd->d", G[0, 0], phi)
    ref = optimize.minimize(lambda d: d @ v, np.zeros(3), jac=lambda d: v, method="SLSQP",
                            constraints=[{"type": "ineq", "fun": lambda d: beta ** 2 - d @ Sigma @ d}],
                            options={"ftol": 1e-14})
    assert bs.bonus(G)[0] == pytest.approx(-ref.fun, rel=1e-6)
    assert np.sum(G * bs.lmo(G)) == pytest.approx(ref.fun, rel=1e-9)


def _two_action_closed_form(mu, tau, d_lo, d_hi):
    """Derived: for P(1>2) = ½ + d with d ∈ [d_lo, d_hi], J = ½ + d(q − s) − τKL(q) + τKL(s); the pessimistic max
    player is q = τ log(Z_hi/Z_lo)/(d_hi − d_lo), Z_d = μ1 e^{d/τ} + μ2 (the mean of q_d over the interval)."""
    Z = lambda d: mu[0] * np.exp(d / tau) + mu[1]
    return tau * np.log(Z(d_hi) / Z(d_lo)) / (d_hi - d_lo)


@pytest.mark.parametrize("p_hat,N,beta", [(0.62, 50, 1.3), (0.95, 20, 1.0), (0.5, 0, 1.0)])
def test_version_space_two_actions_closed_form(p_hat, N, beta):
    mu, tau = np.array([0.3, 0.7]), 0.1
    P_hat = np.array([[0.5, p_hat], [1 - p_hat, 0.5]])
    counts = np.array([[0.0, N], [N, 0.0]])
    r = beta / np.sqrt(2 * N) if N > 0 else np.inf
    d_lo, d_hi = max(0.0, p_hat - r) - 0.5, min(1.0, p_hat + r) - 0.5
    q = _two_action_closed_form(mu, tau, d_lo, d_hi)
    res = pessimistic_equilibrium(VersionSpace(P_hat, counts, beta), mu, tau)
    assert res.pi[0, 0] == pytest.approx(q, abs=1e-8)
    assert res.upper - res.value < 1e-10


def test_bonus_two_actions_closed_form():
    """Tabular one-hot features (d = 1): bonus β|q − s|/√(λ + N), i.e. d ∈ d̂ ± β/√(λ + N) without the box."""
    mu, tau, beta, lam = np.array([0.6, 0.4]), 0.05, 0.8, 1.0
    rng = np.random.default_rng(2)
    data = learning.sample_dataset(np.array([[0.5, 0.7], [0.3, 0.5]]),
                                   learning.product_behaviour([1.0], [0.5, 0.5]), 60, rng)
    cls = learning.LinearClass(learning.tabular_features(1, 2), ridge=1e-9, design_lambda=lam)
    fit = cls.fit(data)
    N = fit.N[0, 0, 1]
    d_hat = fit.P_hat[0, 0, 1] - 0.5
    width = beta / np.sqrt(lam + N)
    q = _two_action_closed_form(mu, tau, d_hat - width, d_hat + width)
    res = pessimistic_equilibrium(BonusSet(fit.P_hat, cls.phi, fit.Sigma, beta), mu, tau)
    assert res.pi[0, 0] == pytest.approx(q, abs=1e-8)
    pi = learning.offline_policy("bonus", data, mu, tau, beta=beta, ridge=1e-9, design_lambda=lam)
    assert pi[0, 0] == pytest.approx(q, abs=1e-7)


def test_single_uncertain_entry_matches_scipy_reduction():
    """Three actions, only P(0>1) uncertain. The inner minimum is concave in p, so it sits at an end of the
    interval: the solution is argmax_π min(F_lo, F_hi) − τKL, computed here by scipy (1-D dual over the mixing
    weight, BFGS inside) without the package's solver."""
    rng = np.random.default_rng(3)
    n, tau = 3, 0.2
    P_hat = _random_P(rng, n)
    mu = np.array([0.5, 0.3, 0.2])
    N = np.full((n, n), np.inf)
    N[0, 1] = N[1, 0] = 30.0
    beta = 1.2
    r = beta / np.sqrt(60.0)
    ends = []
    for p in (max(0, P_hat[0, 1] - r), min(1, P_hat[0, 1] + r)):
        Q = P_hat.copy()
        Q[0, 1], Q[1, 0] = p, 1 - p
        ends.append(Q)

    def F(Q, pi):  # min_π2 πᵀQπ2 + τKL(π2‖μ) − τKL(π‖μ)
        return -tau * np.log(np.sum(mu * np.exp(-(Q.T @ pi) / tau))) - tau * np.sum(pi * np.log(pi / mu))

    def inner(lam):
        obj = lambda z: -(lam * F(ends[0], _softmax(z)) + (1 - lam) * F(ends[1], _softmax(z)))
        res = optimize.minimize(obj, np.zeros(n), method="BFGS", options={"gtol": 1e-12})
        return -res.fun, _softmax(res.x)

    lam = optimize.minimize_scalar(lambda l: inner(l)[0], bounds=(0, 1), method="bounded",
                                   options={"xatol": 1e-10}).x
    ref = inner(lam)[1]
    ref_val = min(F(ends[0], ref), F(ends[1], ref))
    res = pessimistic_equilibrium(VersionSpace(P_hat, N, beta), mu, tau)
    ours = res.pi[0]
    # The package's value is f(π̂) evaluated by the reduction's formula, and it is at least as good as scipy's.
    assert res.value == pytest.approx(min(F(ends[0], ours), F(ends[1], ours)), abs=1e-12)
    assert ref_val - 1e-10 <= res.value <= ref_val + 1e-8
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_pessimistic_value_is_a_lower_bound_when_the_truth_is_in_the_set():
    rng = np.random.default_rng(4)
    n, tau = 4, 0.1
    P = _random_P(rng, n)
    mu = np.full(n, 1 / n)
    data = learning.sample_dataset(P, learning.product_behaviour([1.0], mu), 400, rng)
    fit = learning.TabularClass(1, n).fit(data)
    a, b = np.triu_indices(n, 1)
    beta = np.sqrt(2 * np.sum(fit.N[0, a, b] * (fit.P_hat[0, a, b] - P[a, b]) ** 2)) * 1.01  # P* ∈ P̃
    res = pessimistic_equilibrium(VersionSpace(fit.P_hat, fit.N, beta), mu, tau)
    true_value = 0.5 - 0.5 * games.duality_gap(P, mu, tau, res.pi[0])  # J(π̂, †)
    assert res.value <= true_value + 1e-10
    # and the pessimistic value of the plug-in policy is no better than that of π̂ (π̂ maximises it)
    plug = learning.plugin_policy(fit.P_hat, mu, tau)
    f_plug = pessimistic_equilibrium(VersionSpace(fit.P_hat, fit.N, beta), mu, tau, max_iter=1,
                                     pi_init=plug).value
    assert f_plug <= res.value + 1e-10


def test_zero_radius_is_the_plugin_equilibrium():
    rng = np.random.default_rng(5)
    n, tau = 5, 0.1
    P_hat = _random_P(rng, n)
    mu = rng.dirichlet(np.ones(n))
    N = np.full((n, n), 10.0)
    ne = games.nash_equilibrium(P_hat, mu, tau)
    res = pessimistic_equilibrium(VersionSpace(P_hat, N, 0.0), mu, tau)
    np.testing.assert_allclose(res.pi[0], ne, atol=1e-6)
    bs = BonusSet(P_hat, learning.tabular_features(1, n), np.eye(10), 0.0)
    np.testing.assert_allclose(pessimistic_equilibrium(bs, mu, tau).pi[0], ne, atol=1e-6)


def test_all_offline_methods_reach_the_equilibrium_as_n_grows():
    rng = np.random.default_rng(6)
    n, tau = 4, 0.1
    P = 0.15 + 0.7 * _random_P(rng, n)  # entries in [0.15, 0.85]
    np.fill_diagonal(P, 0.5)
    mu = np.array([0.4, 0.3, 0.2, 0.1])
    ne = games.nash_equilibrium(P, mu, tau)
    # Exact data (n → ∞): counts so large the confidence sets are points.
    N = np.full((n, n), 1e14)
    exact = learning.Dataset.empty(1, n)
    assert np.abs(pessimistic_equilibrium(VersionSpace(P, N, 1.0), mu, tau).pi[0] - ne).max() < 1e-5
    Sigma = np.diag(np.full(6, 1e14))
    bs = BonusSet(P, learning.tabular_features(1, n), Sigma, 1.0)
    assert np.abs(pessimistic_equilibrium(bs, mu, tau).pi[0] - ne).max() < 1e-5
    assert exact.size == 0
    # Sampled data: the half duality gap of every method falls as n grows, to ~1e-4 at n = 2e5.
    D = learning.product_behaviour([1.0], np.full(n, 1 / n))
    gaps = {}
    for size in (300, 200_000):
        data = learning.sample_dataset(P, D, size, np.random.default_rng(size))
        for m in ("plugin", "version_space", "bonus"):
            pi = learning.offline_policy(m, data, mu, tau)
            gaps[m, size] = 0.5 * games.duality_gap(P, mu, tau, pi[0])
    for m in ("plugin", "version_space", "bonus"):
        assert gaps[m, 200_000] < 1e-4, gaps
        assert gaps[m, 200_000] < gaps[m, 300] / 10, gaps


def test_bad_inputs_name_the_field():
    data = learning.Dataset.empty(1, 3)
    with pytest.raises(ValueError, match="method"):
        learning.offline_policy("nope", data, np.full(3, 1 / 3), 0.1)
    with pytest.raises(ValueError, match="tau"):
        pessimistic_equilibrium(VersionSpace(np.full((3, 3), 0.5), np.zeros((3, 3)), 1.0), np.full(3, 1 / 3), 0.0)
    with pytest.raises(ValueError, match="beta"):
        VersionSpace(np.full((3, 3), 0.5), np.zeros((3, 3)), -1.0)
