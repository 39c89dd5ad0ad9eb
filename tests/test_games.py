"""nash_lm.games against independent computations: MINPACK, HiGHS, closed forms, explicit best responses,
Munos et al.'s Theorem 1, and the [checked] regression values recorded in nlhf_math.md's appendix."""
import numpy as np
import pytest
from scipy import optimize

from nash_lm import games
from nash_lm.games import instances as I


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _minpack_equilibrium(P, mu, tau):
    """Independent solver: MINPACK's hybrid method on θ = log μ + (P − ½) softmax(θ)/τ, from θ = log μ."""
    A, lm = P - 0.5, np.log(mu)

    def F(th):
        return th - lm - A @ _softmax(th) / tau

    def J(th):
        p = _softmax(th)
        return np.eye(len(mu)) - (A * p[None] - np.outer(A @ p, p)) / tau

    sol = optimize.root(F, lm, jac=J, method="hybr", options={"xtol": 1e-14})
    assert np.abs(F(sol.x)).max() < 1e-9
    return _softmax(sol.x)


@pytest.mark.parametrize("n,X", [(7, 3), (50, 4), (200, 16)])
@pytest.mark.parametrize("tau", [1.0, 0.1, 0.01])
def test_equilibrium_matches_minpack(n, X, tau):
    g = I.random_game(n, X, seed=n + X)
    ours = games.nash_equilibrium(g.P, g.mu, tau)
    assert ours.shape == (X, n)
    ref = np.stack([_minpack_equilibrium(g.P[x], g.mu[x], tau) for x in range(X)])
    assert np.abs(ours - ref).max() < 1e-9
    assert games.duality_gap(g.P, g.mu, tau, ours) < 1e-12


def _hand_lp(P):
    """HiGHS on the dual LP (the min player's): min v s.t. P π2 <= v, π2 in the simplex."""
    n = P.shape[0]
    res = optimize.linprog(np.r_[np.zeros(n), 1.0], A_ub=np.hstack([P, -np.ones((n, 1))]), b_ub=np.zeros(n),
                           A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * n + [(None, None)],
                           method="highs-ipm")
    return res.x[:n], res.x[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unregularized_equilibrium_is_certified_and_matches_lp(seed):
    g = I.random_game(9, seed=seed)
    pi = games.nash_equilibrium(g.P, g.mu, 0.0)
    # Certificate: no action beats pi on average, so the unregularized gap is 0 and the value is 1/2.
    assert games.duality_gap(g.P, g.mu, 0.0, pi) < 1e-9
    # Random games have a unique equilibrium, so the min player's LP (solved separately) gives the same policy.
    dual, value = _hand_lp(g.P)
    assert value == pytest.approx(0.5, abs=1e-9)
    np.testing.assert_allclose(pi, dual, atol=1e-7)
    # ... and the regularized equilibrium tends to it as tau -> 0.
    assert np.abs(games.nash_equilibrium(g.P, g.mu, 1e-4) - pi).max() < 5e-3


@pytest.mark.parametrize("eps", [-0.2, 0.0, 0.1, 0.3])
def test_three_raters_closed_form(eps):
    g = I.three_raters(eps)
    np.testing.assert_allclose(games.nash_equilibrium(g.P, g.mu, 0.0),
                               [1 / 3 + eps / 2, 1 / 3 + eps / 2, 1 / 3 - eps], atol=1e-9)


def test_instances_closed_forms():
    d = I.dice()
    np.testing.assert_allclose(d.P, [[0.5, 5 / 9, 4 / 9], [4 / 9, 0.5, 5 / 9], [5 / 9, 4 / 9, 0.5]], atol=1e-15)
    e = I.elo()
    assert e.P[1, 0] == pytest.approx(0.9) and e.P[2, 0] == pytest.approx(2 / 3) and e.P[1, 2] == pytest.approx(9 / 11)
    for g in (I.rock_paper_scissors(), I.cyclic_tournament(7), d):
        np.testing.assert_allclose(games.nash_equilibrium(g.P, g.mu, 0.0), np.full(len(g.mu), 1 / len(g.mu)),
                                   atol=1e-9)
    r = I.random_game(6, seed=4)
    assert np.all(r.P >= 0) and np.all(r.P <= 1)
    np.testing.assert_allclose(r.P + r.P.T, 1.0, atol=1e-15)


def test_elo_preference_beats_reward_policy():
    # Munos et al. App. A: P(pi_P > pi_R) = 50/99 for pi_R = (2/3, 1/3, 0), pi_P = (0, 0, 1).
    e = I.elo()
    assert np.array([0, 0, 1.0]) @ e.P @ np.array([2 / 3, 1 / 3, 0]) == pytest.approx(50 / 99, abs=1e-14)


def _explicit_best_response_value(P, mu, tau, pi):
    """max_π1 π1ᵀPπ − τ KL(π1‖μ), by BFGS over softmax logits (no closed form used)."""
    def neg(z):
        p = _softmax(z)
        return -(p @ P @ pi - tau * np.sum(p * np.log(p / mu)))

    best = min((optimize.minimize(neg, z0, method="BFGS", options={"gtol": 1e-12}) for z0 in
                (np.log(mu), np.zeros(len(mu)))), key=lambda r: r.fun)
    return -best.fun


@pytest.mark.parametrize("tau", [0.2, 0.05])
def test_closed_form_gap_equals_explicit_best_responses(tau):
    g = I.random_game(5, seed=11)
    rng = np.random.default_rng(0)
    for _ in range(3):
        pi = rng.dirichlet(np.ones(5))
        kl = np.sum(pi * np.log(pi / g.mu))
        # max_π1 J(π1, π) and min_π2 J(π, π2) = 1 − max_π2 J(π2, π), each from its explicit best response.
        best = _explicit_best_response_value(g.P, g.mu, tau, pi) + tau * kl
        gap = best - (1.0 - best)
        assert games.duality_gap(g.P, g.mu, tau, pi) == pytest.approx(gap, abs=1e-8)
        br = games.best_response(g.P, g.mu, tau, pi)
        assert games.payoff(g.P, g.mu, tau, br, pi) == pytest.approx(best, abs=1e-8)
        assert games.payoff(g.P, g.mu, tau, pi, br) + games.payoff(g.P, g.mu, tau, br, pi) == pytest.approx(1.0)


def test_contexts_and_weights():
    g = I.random_game(6, contexts=3, seed=5)
    rho = np.array([0.5, 0.3, 0.2])
    pi = games.nash_equilibrium(g.P, g.mu, 0.1, rho=rho)
    for x in range(3):
        np.testing.assert_allclose(pi[x], games.nash_equilibrium(g.P[x], g.mu[x], 0.1), atol=1e-13)
    q = np.full((3, 6), 1 / 6)
    per = [games.duality_gap(g.P[x], g.mu[x], 0.1, q[x]) for x in range(3)]
    assert games.duality_gap(g.P, g.mu, 0.1, q, rho=rho) == pytest.approx(rho @ per, rel=1e-12)


@pytest.mark.parametrize("inst,tau", [("rps", 0.1), ("rps", 0.01), ("dice", 0.05), ("random", 0.05)])
def test_nash_md_theorem_1_every_step(inst, tau):
    g = {"rps": I.rock_paper_scissors(), "dice": I.dice(mu=(0.6, 0.3, 0.1)), "random": I.random_game(6)}[inst]
    T = 3000
    res = games.run("nash_md", g.P, g.mu, tau, T)
    kl = np.r_[games.kl_divergence(res.nash, g.mu), res.metrics["kl_to_nash"]]
    # The metric is an independent recomputation from the iterates.
    by_hand = np.sum(res.nash * (np.log(res.nash) - np.log(res.iterates)), axis=-1)
    np.testing.assert_allclose(kl[1:], by_hand, rtol=1e-9, atol=1e-15)
    eta = 2.0 / (tau * (np.arange(T) + 2.0))
    assert np.all(kl[1:] <= (1 - eta * tau) * kl[:-1] + 2 * eta ** 2 + 1e-15)
    assert np.all(kl[1:] <= 8.0 / (tau ** 2 * (np.arange(1, T + 1) + 1)))


def test_checked_regression_values_from_the_math_doc():
    rps = I.rock_paper_scissors()
    kl = games.run("nash_md", rps.P, rps.mu, 0.1, 10000, keep_iterates=False).metrics["kl_to_nash"]
    np.testing.assert_allclose(kl[[99, 999, 9999]], [2.0e-5, 8.8e-7, 1.0e-8], rtol=0.03)

    def rate(k):
        idx = np.where((k > 1e-12) & (k < 1e-3))[0]
        return np.exp(np.polyfit(idx, np.log(k[idx]), 1)[0])

    omd = games.run("omd", rps.P, rps.mu, 0.1, 2000, eta=1.0, keep_iterates=False).metrics["kl_to_nash"]
    assert rate(omd) == pytest.approx(0.885, abs=2e-3)
    eg = games.run("extragradient", rps.P, rps.mu, 0.01, 3000, eta=1.0, keep_iterates=False).metrics["kl_to_nash"]
    assert rate(eg) == pytest.approx(0.904, abs=2e-3)
    d = I.dice()
    m = games.run("mwu", d.P, d.mu, 0.0, 5000, eta=0.1, pi0=[0.6, 0.3, 0.1], keep_iterates=False).metrics
    np.testing.assert_allclose(m["kl_to_nash"][[0, 999, 4999]], [0.2405, 0.2421, 0.2486], atol=6e-5)
    np.testing.assert_allclose(m["gap_avg"][[0, 999, 4999]], [0.033, 0.038, 0.004], atol=6e-4)


@pytest.mark.parametrize("eta", [1.0, 4.0])
def test_constant_step_nash_md_mixture_is_equilibrium_at_higher_temperature(eta):
    g, tau = I.random_game(6, seed=0), 0.05
    res = games.run("nash_md_const", g.P, g.mu, tau, 6000, eta=eta, keep_iterates=False)
    b = eta * tau
    mix = res.policy ** (1 - b) * g.mu ** b
    mix /= mix.sum()
    np.testing.assert_allclose(mix, games.nash_equilibrium(g.P, g.mu, tau / (1 - b)), atol=1e-12)
    assert games.duality_gap(g.P, g.mu, tau, res.policy) > 1e-6  # biased for the original game


def test_bradley_terry_reductions():
    r, tau = np.array([0.0, 0.3, -0.2, 0.5]), 0.1
    mu = np.array([0.1, 0.2, 0.3, 0.4])
    a = I.affine_bradley_terry(r, c=2.0, mu=mu)
    expected = mu * np.exp(r / (2.0 * tau))
    np.testing.assert_allclose(games.nash_equilibrium(a.P, a.mu, tau), expected / expected.sum(), atol=1e-12)
    logistic = I.bradley_terry(r, mu=mu)
    pi = games.nash_equilibrium(logistic.P, logistic.mu, tau)
    naive = mu * np.exp(r / tau)
    assert np.abs(pi - naive / naive.sum()).max() > 1e-3  # not KL-regularized reward maximisation
    assert np.argmax(games.nash_equilibrium(logistic.P, logistic.mu, 1e-4)) == np.argmax(r)  # Condorcet winner


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_gradient_flow_stationary_points(beta):
    """Calandriello et al. Prop. 5.2: the mixture of Nash-MD-PG(β)'s and IPO-MD(β)'s stationary point is the
    equilibrium at temperature τ/(1−β); β = 0 (self-play, online IPO) gives π*_τ itself."""
    g, tau = I.random_game(5, seed=2), 0.2
    pg = games.run("nash_md_pg", g.P, g.mu, tau, 20000, beta=beta, lr=5.0, keep_iterates=False).policy
    ipo = games.run("ipo_md", g.P, g.mu, tau, 20000, beta=beta, lr=0.05, keep_iterates=False).policy
    if beta == 1.0:  # best response to μ: π ∝ μ exp(Pμ/τ)
        target = games.best_response(g.P, g.mu, tau, g.mu)
        np.testing.assert_allclose(pg, target, atol=1e-9)
        np.testing.assert_allclose(ipo, target, atol=1e-9)
        return
    for pi in (pg, ipo):
        mix = pi ** (1 - beta) * g.mu ** beta
        mix /= mix.sum()
        np.testing.assert_allclose(mix, games.nash_equilibrium(g.P, g.mu, tau / (1 - beta)), atol=1e-9)


def test_every_algorithm_runs_and_reports_consistent_metrics():
    g = I.rock_paper_scissors()
    for name in games.ALGORITHMS:
        res = games.run(name, g.P, g.mu, 0.1, 50)
        assert res.iterates.shape == (50, 3)
        np.testing.assert_allclose(res.iterates.sum(-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(res.average, res.iterates.mean(0), atol=1e-13)
        np.testing.assert_allclose(res.metrics["gap_avg"][-1], games.duality_gap(g.P, g.mu, 0.1, res.average),
                                   atol=1e-13)
    # The extragradient and optimistic methods converge in the last iterate where OMD (same step) does not.
    eg = games.run("extragradient", g.P, g.mu, 0.01, 1000, eta=1.0, keep_iterates=False)
    omd = games.run("omd", g.P, g.mu, 0.01, 1000, eta=1.0, keep_iterates=False)
    assert eg.metrics["gap_last"][-1] < 1e-10 < omd.metrics["gap_last"][-1]


@pytest.mark.parametrize("call,field", [
    (lambda: games.nash_equilibrium([[0.5, 0.9], [0.2, 0.5]], [0.5, 0.5], 0.1), "P: not antisymmetric"),
    (lambda: games.nash_equilibrium([[0.5, 1.5], [-0.5, 0.5]], [0.5, 0.5], 0.1), "P: entries must lie"),
    (lambda: games.nash_equilibrium([[0.5, 0.5], [0.5, 0.5]], [0.6, 0.6], 0.1), "mu: each distribution"),
    (lambda: games.nash_equilibrium([[0.5, 0.5], [0.5, 0.5]], [1.0, 0.0], 0.1), "mu: has zero entries"),
    (lambda: games.nash_equilibrium([[0.5, 0.5], [0.5, 0.5]], [0.2, 0.3, 0.5], 0.1), "mu: has 3 actions"),
    (lambda: games.nash_equilibrium([[0.5, 0.5], [0.5, 0.5]], [0.5, 0.5], -1), "tau: must be"),
    (lambda: games.nash_equilibrium(np.full((2, 2, 2), 0.5), np.full((3, 2), 0.5), 0.1), "mu: 3 contexts"),
    (lambda: games.duality_gap([[0.5, 0.5], [0.5, 0.5]], [0.5, 0.5], 0.1, [0.7, 0.7]), "pi: each row"),
    (lambda: games.run("nash_mdd", [[0.5]], [1.0], 0.1, 5), "name: unknown algorithm 'nash_mdd'; known: ["),
    (lambda: games.run("omd", [[0.5]], [1.0], 0.1, 5, etaa=1), "hyper: unknown"),
    (lambda: games.run("nash_md", [[0.5]], [1.0], 0.0, 5), "tau: Nash-MD's schedule"),
    (lambda: games.run("nash_md_pg", [[0.5]], [1.0], 0.1, 5, beta=1.5), "beta: must lie in [0, 1]"),
    (lambda: games.run("omd", [[0.5]], [1.0], 0.1, 0), "steps: must be"),
])
def test_bad_input_names_the_argument(call, field):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(field), str(e.value)
