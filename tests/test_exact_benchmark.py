"""The exact benchmark against independent computations: the population-of-raters preference against hand
counts and explicit loops, the Bradley-Terry projection against the scores of a Bradley-Terry preference and RLHF's
optimum against its closed-form value, and the job's JSON against numpy recomputations from that file alone."""
import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
from scipy.special import expit

from nash_lm.games import population as pop
from nash_lm.tasks import exact_benchmark as eb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# Population of raters


def test_persona_preference_is_exactly_antisymmetric_and_the_share_of_personas():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(4, 30)).astype(float)  # K = 4 with ties: P takes values in {0, 1/8, ...}
    P = pop.persona_preference(scores, "order")
    assert np.array_equal(P + P.T, np.ones_like(P))  # exact, not to a tolerance
    for a, b in [(0, 1), (3, 17), (29, 2)]:
        share = sum(1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0 for s in scores) / 4
        assert P[a, b] == share
    Pbt = pop.persona_preference(rng.normal(size=(3, 20)), "bt", scale=2.0)
    assert np.abs(Pbt + Pbt.T - 1).max() < 1e-15
    with pytest.raises(ValueError, match="kind"):
        pop.persona_preference(scores, "borda")


def test_cycle_rate_equals_hand_counts():
    # Condorcet's three voters on a, b, c (orders a>b>c, b>c>a, c>a>b) and a response d that all rank last:
    # {a, b, c} is the one cyclic triple among the four triples.
    ranks = np.array([[3, 2, 1, 0], [1, 3, 2, 0], [2, 1, 3, 0]], float)  # rank of (a, b, c, d), higher = better
    P = pop.persona_preference(ranks, "order")
    assert P[0, 1] == P[1, 2] == P[2, 0] == 2 / 3 and P[3, :3].max() == 0
    assert pop.cycle_rate(P) == 0.25
    assert pop.cycle_rate(P, [0, 1, 2]) == 1.0 and pop.cycle_rate(P, [0, 1, 3]) == 0.0
    # a random population on a fixed sample, against an explicit loop over the triples in both orientations
    rng = np.random.default_rng(3)
    P = pop.persona_preference(rng.normal(size=(5, 60)), "order")
    sample = rng.choice(60, size=25, replace=False)
    beats = lambda a, b: P[a, b] > 0.5
    count = total = 0
    for a, b, c in itertools.combinations(sorted(sample), 3):
        total += 1
        count += (beats(a, b) and beats(b, c) and beats(c, a)) or (beats(b, a) and beats(c, b) and beats(a, c))
    assert 0 < count < total
    assert pop.cycle_rate(P, sample) == count / total
    # a Bradley-Terry preference has no cycles
    assert pop.cycle_rate(pop.bradley_terry_preference(rng.normal(size=40))) == 0.0


# ----------------------------------------------------------------------------------------------------------
# RLHF's exact counterpart


def test_bt_projection_recovers_bradley_terry_scores_under_any_sampler():
    rng = np.random.default_rng(1)
    s = rng.normal(size=12) * 1.5
    P = pop.bradley_terry_preference(s)
    for w in (np.full(12, 1 / 12), rng.dirichlet(np.ones(12) * 0.5)):
        r = pop.bt_projection(P, w)
        np.testing.assert_allclose(r, s - s.mean(), atol=1e-8)
    # a population of raters is not Bradley-Terry: its projection depends on the sampler (Munos et al., Prop. 2)
    Pp = pop.persona_preference(rng.normal(size=(3, 12)), "order")
    r1, r2 = pop.bt_projection(Pp, np.full(12, 1 / 12)), pop.bt_projection(Pp, rng.dirichlet(np.ones(12)))
    assert np.abs(r1 - r2).max() > 1e-2
    # the projection is the maximum of the expected log-likelihood: the gradient vanishes there
    w = rng.dirichlet(np.ones(12))
    r = pop.bt_projection(Pp, w)
    grad = (w[:, None] * w[None, :] * (Pp - expit(r[:, None] - r[None, :]))).sum(1)
    assert np.abs(grad).max() < 1e-12


def test_bt_fit_from_sampled_pairs_converges_to_the_scores():
    rng = np.random.default_rng(2)
    s = np.array([0.0, 1.0, -0.5, 2.0, 0.3])
    counts = pop.sample_pair_counts(pop.bradley_terry_preference(s), np.full(5, 0.2), 200_000, rng)
    assert counts.sum() == 200_000
    r = pop.bt_fit(counts)
    assert np.abs(r - (s - s.mean())).max() < 0.03  # ~8,000 comparisons per pair: standard error ~0.02


def test_rlhf_policy_attains_the_closed_form_optimum():
    rng = np.random.default_rng(4)
    mu, r, c = rng.dirichlet(np.ones(7)), rng.normal(size=7), 0.3
    pi = pop.rlhf_policy(mu, r, c)
    value = lambda p: p @ r - c * np.sum(p * np.log(p / mu))
    assert abs(value(pi) - c * math.log(np.sum(mu * np.exp(r / c)))) < 1e-12  # the Gibbs variational formula
    for _ in range(20):
        q = rng.dirichlet(np.ones(7))
        assert value(q) < value(pi)


# ----------------------------------------------------------------------------------------------------------
# The job's JSON


def _config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import exact_benchmark as cfg_module
    finally:
        sys.path.pop(0)
    c = cfg_module.get_config()
    c.results_dir = c.figures_dir = ""
    c.cycle_sample = 8
    c.rlhf.n_pairs = 300
    c.rlhf.c_over_tau = (1.0, 4.0)
    c.beta_curve.betas = (0.0, 0.5)
    c.fixed_point.max_iter = 20_000
    del c.sizes["large"]
    c.sizes.small.update(dict(V=2, L=3, contexts=2, steps=40, taus=(0.3,), seeds=(0,),
                              structures=("persona_orders", "rps", "random"),
                              algorithms=("nash_md", "extragradient", "nash_md_pg", "nash_md_pg_token")))
    return c


def _P_from_json(pref):
    """P [X, N, N] from a stored definition, by explicit loops (independent of the package)."""
    if pref["kind"] == "persona_orders":
        out = []
        for ranks in pref["ranks"]:
            n = len(ranks[0])
            out.append([[sum(1.0 if r[a] > r[b] else 0.5 if r[a] == r[b] else 0.0 for r in ranks) / len(ranks)
                         for b in range(n)] for a in range(n)])
        return np.array(out)
    if pref["kind"] == "lift":
        return np.array([[[pref["P_game"][a][b] for b in acts] for a in acts] for acts in pref["actions"]])
    assert pref["kind"] == "random"
    return np.array(pref["P"])


def _gap(P, mu, tau, pi):
    """max_pi1 J(pi1, pi) - min_pi2 J(pi, pi2) with the best responses written out (J(a, b) = 1 - J(b, a))."""
    def J(p1, p2):
        return p1 @ P @ p2 - tau * np.sum(p1 * np.log(p1 / mu)) + tau * np.sum(p2 * np.log(p2 / mu))
    br = mu * np.exp((P @ pi) / tau)
    br /= br.sum()
    return J(br, pi) - (1.0 - J(br, pi))


def test_json_numbers_follow_from_the_stored_distributions_and_game(tmp_path):
    config = _config()
    wd = str(tmp_path / "bench")
    eb.run(config, wd)
    with open(os.path.join(wd, "exact_benchmark.json")) as f:
        result = json.load(f)
    assert len(result["cells"]) == 3
    for cell in result["cells"]:
        game, tau = cell["game"], cell["tau"]
        mu, P = np.array(game["mu"]), _P_from_json(game["preference"])
        assert P.shape == (2, 8, 8)
        if game["P"] is not None:
            np.testing.assert_array_equal(np.array(game["P"]), P)
        np.testing.assert_allclose(mu.sum(1), 1.0, atol=1e-12)
        star = np.array(game["pi_star"])
        for x in range(2):  # pi* is the fixed point of its own best response
            br = mu[x] * np.exp(P[x] @ star[x] / tau)
            np.testing.assert_allclose(star[x], br / br.sum(), atol=1e-10)
        names = cell["head_to_head"]["names"]
        pols = {n: np.array(cell["policies"][n]["pi"]) for n in names[:-2]}
        pols.update(pi_star=star, mu=mu)
        assert {"nash_md", "extragradient", "nash_md_pg[beta=0]", "nash_md_pg[beta=0.5]",
                "nash_md_pg_token[beta=0.5]", "rlhf_exact[c=4tau]", "rlhf_pairs[c=1tau]",
                "stationary_token[beta=0.5]"} <= set(pols)
        for n, entry in cell["policies"].items():
            pi = pols[n]
            np.testing.assert_allclose(pi.sum(1), 1.0, atol=1e-12)
            gap = np.mean([_gap(P[x], mu[x], tau, pi[x]) for x in range(2)])
            assert abs(entry["duality_gap"] - gap) < 1e-10, (n, entry["duality_gap"], gap)
            gap0 = np.mean([2 * (P[x] @ pi[x]).max() - 1 for x in range(2)])
            assert abs(entry["duality_gap_unregularised"] - gap0) < 1e-12
            kl = np.mean([np.sum(star[x] * np.log(star[x] / pi[x])) for x in range(2)])
            assert abs(entry["kl_pi_star_vs_pi"] - kl) < 1e-10
        H = np.array(cell["head_to_head"]["matrix"])
        for a, b in itertools.product(names, repeat=2):
            h = np.mean([pols[a][x] @ P[x] @ pols[b][x] for x in range(2)])
            assert abs(H[names.index(a), names.index(b)] - h) < 1e-12
        np.testing.assert_allclose(H + H.T, 1.0, atol=1e-12)
        # RLHF's policies follow from the stored rewards
        r = np.array(cell["rlhf"]["reward_exact"])
        z = mu * np.exp(r / (4.0 * tau))
        np.testing.assert_allclose(pols["rlhf_exact[c=4tau]"], z / z.sum(1, keepdims=True), rtol=1e-10)
        # the cycle rate of the stored sample, by an explicit count
        counts = []
        for x, sample in enumerate(game["cycle_rate"]["sample"]):
            trip = list(itertools.combinations(sorted(sample), 3))
            cyc = sum((P[x, a, b] > .5 and P[x, b, c] > .5 and P[x, c, a] > .5)
                      or (P[x, b, a] > .5 and P[x, c, b] > .5 and P[x, a, c] > .5) for a, b, c in trip)
            counts.append(cyc / len(trip))
        assert game["cycle_rate"]["rate"] == pytest.approx(np.mean(counts), abs=1e-15)
    # resume: a deleted cell is recomputed bit for bit; the others are read back
    cells_dir = os.path.join(wd, "cells")
    victim = sorted(os.listdir(cells_dir))[0]
    with open(os.path.join(cells_dir, victim)) as f:
        before = json.load(f)
    os.remove(os.path.join(cells_dir, victim))
    eb.run(config, wd)
    with open(os.path.join(cells_dir, victim)) as f:
        after = json.load(f)
    before.pop("wall_s"), after.pop("wall_s")
    for p in list(before["policies"].values()) + list(after["policies"].values()):
        p.pop("train_s", None)
    assert before == after
    assert os.path.exists(os.path.join(wd, "report.md")) and os.path.exists(os.path.join(wd, "beta_curve.png"))
    # a workdir written by another response space is refused, not mixed in
    other = _config()
    other.sizes.small.L = 2
    with pytest.raises(ValueError, match="workdir: .* use a fresh --workdir"):
        eb.run(other, wd)


def test_bad_config_names_the_field():
    c = _config()
    c.sizes.small.structures = ("persona_orders", "borda")
    with pytest.raises(ValueError, match=r"config.sizes.small.structures: unknown 'borda'"):
        eb.validate(c)
    c = _config()
    c.hyper.omd = dict(eta=-1.0)
    with pytest.raises(ValueError, match=r"config.hyper.omd.eta"):
        eb.validate(c)
    c = _config()
    c.sizes.small.algorithms = ("nash_md_const",)
    c.sizes.small.taus = (0.3, 2.0)  # eta * tau = 2 > 1 for nash_md_const's eta = 1 at the second tau
    with pytest.raises(ValueError, match=r"config.hyper.nash_md_const \(tau = 2.0\): eta"):
        eb.validate(c)


def test_compiled_stationary_points_match_the_numpy_iteration_and_prop_5_2():
    from nash_lm import games
    from nash_lm.tasks import token_game as tg

    game = tg.lift("rps", 2, 3, contexts=2, seed=2, mu_scale=1.0)
    tau, beta = 0.5, 0.25
    for mix in ("token", "sequence"):
        ours = eb.stationary_point(game.P, game.mu_table, 2, 3, tau, beta, mix, damping=0.5)
        ref = tg.mixture_fixed_point(game, tau, beta, mix, damping=0.5)
        assert ours["residual"] < 1e-11
        np.testing.assert_allclose(ours["pi"], ref["pi"], atol=1e-10)
    # Calandriello et al. Prop. 5.2: the sequence mixture of the stationary point is pi*_{tau/(1-beta)}
    target = games.nash_equilibrium(game.P, game.mu, tau / (1 - beta))
    np.testing.assert_allclose(ours["opponent"], target, atol=1e-9)


def test_ipo_fit_population_optimum_is_the_best_response_to_mu_and_matches_scipy():
    """Offline IPO on a tabular policy: on the population of pairs from mu weighted by P, the fit is the closed
    form g = (P(y > mu) - 1/2)/tau + const (IPO's optimum, the tau-regularised best response to mu); on sampled
    counts it is the minimiser of the IPO loss that scipy finds from scratch."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    n, tau = 7, 0.3
    P = pop.persona_preference(rng.normal(size=(3, n)), "order")
    mu = rng.dirichlet(np.ones(n))
    g = pop.ipo_fit(mu[:, None] * mu[None, :] * P, tau)
    closed = (P @ mu - 0.5) / tau
    np.testing.assert_allclose(g - g.mean(), closed - closed.mean(), atol=1e-10)
    pi = pop.rlhf_policy(mu, g, 1.0)
    br = mu * np.exp(P @ mu / tau)
    np.testing.assert_allclose(pi, br / br.sum(), atol=1e-12)

    C = pop.sample_pair_counts(P, mu, 300, rng)
    C[:, 6] = C[6, :] = 0.0  # a response never compared stays at 0
    loss = lambda x: np.sum(C * (x[:, None] - x[None, :] - 1 / (2 * tau)) ** 2)
    ref = minimize(loss, np.zeros(n), method="BFGS", options={"gtol": 1e-10}).x
    got = pop.ipo_fit(C, tau)
    assert got[6] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(got[:6] - got[:6].mean(), ref[:6] - ref[:6].mean(), atol=1e-6)
    assert loss(got) <= loss(ref) + 1e-9
