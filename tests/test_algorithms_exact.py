"""The language-model losses of the loss-minimising algorithms against their exact counterparts, by enumeration.

On a softmax-table policy pi_theta = softmax(theta) over n one-token responses, each algorithm's loss (the
function its stage runs, on `[B, 1]` log-probs) is averaged exactly over every response pair (or response)
weighted by its sampling probability, minimised over theta in float64 (BFGS), and the minimiser compared with
the one-step update of its counterpart in `nash_lm.games` or the paper's closed form.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from nash_lm.games import algorithms as games
from nash_lm.games import instances

N = 5


def _game(seed=0):
    g = instances.random_game(N, seed=seed)
    rng = np.random.default_rng(seed + 100)
    pi_t = rng.dirichlet(np.full(N, 2.0))  # the current policy pi_t (full support)
    return g.P, g.mu, pi_t


def _pairs(weights_y, weights_y2):
    """Every pair (y, y') with its probability under the product of the two distributions."""
    y, y2 = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    return y.ravel(), y2.ravel(), (weights_y[:, None] * weights_y2[None, :]).ravel()


def _minimise(expected_loss, theta0=None):
    """argmin over theta of `expected_loss(theta)` (float64 BFGS), as a policy."""
    with jax.enable_x64(True):
        f = jax.jit(jax.value_and_grad(expected_loss))
        fun = lambda th: tuple(np.asarray(v, np.float64) for v in f(jnp.asarray(th)))
        res = optimize.minimize(fun, np.zeros(N) if theta0 is None else theta0, jac=True, method="BFGS",
                                options=dict(gtol=1e-12, maxiter=10_000))
    theta = res.x
    return np.exp(theta - np.logaddexp.reduce(theta))


def _one_step(name, P, mu, tau, pi_t, **hyper):
    return games.run(name, P, mu, tau, steps=1, pi0=pi_t, keep_iterates=False, **hyper).policy


def _col(x):
    return jnp.asarray(x)[:, None]  # [B] -> [B, 1]: one-token responses


@pytest.mark.parametrize("tau,eta_inv", [(0.1, 1.0), (0.5, 2.0), (0.3, 0.3)])
def test_inpo_loss_minimiser_is_the_games_inpo_step(tau, eta_inv):
    """The exact expected INPO loss over pairs y, y' ~ pi_t with soft labels P(y > y') is minimised by the
    OMD step pi_{t+1} ∝ mu^(tau/eta_inv) pi_t^(1 - tau/eta_inv) exp(P pi_t / eta_inv) (`games`' 'inpo')."""
    from nash_lm.train.algorithms.inpo import inpo_loss

    P, mu, pi_t = _game()
    y, y2, w = _pairs(pi_t, pi_t)
    ones = np.ones((len(y), 1))

    def expected(theta):
        lp = jax.nn.log_softmax(theta)
        d = {"ref_y": _col(np.log(mu)[y]), "ref_y2": _col(np.log(mu)[y2]),
             "anchor_y": _col(np.log(pi_t)[y]), "anchor_y2": _col(np.log(pi_t)[y2]),
             "y_mask": jnp.asarray(ones), "y2_mask": jnp.asarray(ones), "judged": jnp.asarray(P[y, y2])}
        # the stage's loss is a batch mean: one pair per call, weighted by its probability
        per_pair = jax.vmap(lambda i: inpo_loss({"y": lp[y][i][None, None], "y2": lp[y2][i][None, None]},
                                                jax.tree.map(lambda a: a[i][None], d), tau, eta_inv)[0])(
            jnp.arange(len(y)))
        return jnp.sum(jnp.asarray(w) * per_pair)

    got = _minimise(expected)
    want = _one_step("inpo", P, mu, tau, pi_t, eta_inv=eta_inv)
    np.testing.assert_allclose(got, want, atol=1e-8)
    assert np.abs(want - pi_t).max() > 1e-2  # the step moves the policy


def _offline_minimiser(name, P, mu, pi_d, tau, labels="soft"):
    """The minimiser of the exact expected loss of offline algorithm `name` on pairs y, y' ~ pi_d, labelled with
    P(y > y') (soft) or its Bernoulli draw (hard: the expectation over the draw, enumerated)."""
    from nash_lm.train import algorithms
    from nash_lm.train.step import PolicyHParams

    alg = algorithms.get(name)
    hp = PolicyHParams(algorithm=alg, tau=tau, own=(("labels", labels),))
    y, y2, w = _pairs(pi_d, pi_d)
    if labels == "soft":
        label, w_label = P[y, y2], w
    else:  # a hard label is 1 with probability P(y > y'), else 0
        y, y2 = np.concatenate([y, y]), np.concatenate([y2, y2])
        label = np.concatenate([np.ones(len(w)), np.zeros(len(w))])
        w_label = np.concatenate([w * P[y[:len(w)], y2[:len(w)]], w * (1.0 - P[y[:len(w)], y2[:len(w)]])])
    ones = jnp.ones((len(y), 1))
    d = {"ref_y": _col(np.log(mu)[y]), "ref_y2": _col(np.log(mu)[y2]), "y_mask": ones, "y2_mask": ones,
         "judged": jnp.asarray(label)}

    def expected(theta):
        lp = jax.nn.log_softmax(theta)
        per_pair = jax.vmap(lambda i: alg.loss(hp, {"y": lp[y][i][None, None], "y2": lp[y2][i][None, None]},
                                               jax.tree.map(lambda a: a[i][None], d))[0])(jnp.arange(len(y)))
        return jnp.sum(jnp.asarray(w_label) * per_pair)

    return _minimise(expected)


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_dpo_minimiser_is_the_kl_regularised_reward_maximiser_under_bradley_terry(labels):
    """DPO on pairs from any full-support pi_D labelled by a Bradley-Terry preference sigmoid(r(y) - r(y')) is
    minimised by pi ∝ mu exp(r / tau) (Rafailov et al.'s closed form; DPO's beta = tau)."""
    rewards = np.array([0.0, 1.0, -0.5, 2.0, 0.3])
    g = instances.bradley_terry(rewards)
    _, mu, pi_d = _game(3)
    tau = 0.7
    got = _offline_minimiser("dpo", g.P, mu, pi_d, tau, labels)
    want = mu * np.exp(rewards / tau)
    np.testing.assert_allclose(got, want / want.sum(), atol=1e-7)


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_offline_ipo_minimiser_is_azar_et_al_closed_form(labels):
    """Offline IPO on pairs y, y' ~ pi_D with labels P(y > y') (any preference, here a random one) is minimised by
    pi ∝ mu exp(P(y > pi_D) / tau) (Azar et al. 2023): the regularised best response to pi_D."""
    P, mu, pi_d = _game(4)
    tau = 0.5
    got = _offline_minimiser("offline_ipo", P, mu, pi_d, tau, labels)
    want = mu * np.exp(P @ pi_d / tau)
    np.testing.assert_allclose(got, want / want.sum(), atol=1e-8)


@pytest.mark.parametrize("eta,alpha", [(1.0, 0.1), (0.5, 2.0)])
def test_mpo_loss_minimiser_is_the_games_mpo_step(eta, alpha):
    """The exact expected MPO loss (INPO's loss with the magnet in mu's place, tau = alpha, eta_inv =
    (1 + eta alpha)/eta) over pairs y, y' ~ pi_t is minimised by the magnetic mirror-descent step
    pi_{t+1} ∝ (pi_t m^(eta alpha))^(1/(1 + eta alpha)) exp(eta P pi_t / (1 + eta alpha)) (`games`' 'mpo', whose
    magnet starts at its mu)."""
    from nash_lm.train.algorithms import mpo
    from nash_lm.train.step import PolicyHParams

    P, magnet, pi_t = _game(1)
    y, y2, w = _pairs(pi_t, pi_t)
    ones = np.ones((len(y), 1))
    hp = PolicyHParams(algorithm=mpo.ALGORITHMS[0], tau=0.0, own=(("alpha", alpha), ("eta", eta)))

    def expected(theta):
        lp = jax.nn.log_softmax(theta)
        d = {"magnet_y": _col(np.log(magnet)[y]), "magnet_y2": _col(np.log(magnet)[y2]),
             "anchor_y": _col(np.log(pi_t)[y]), "anchor_y2": _col(np.log(pi_t)[y2]),
             "y_mask": jnp.asarray(ones), "y2_mask": jnp.asarray(ones), "judged": jnp.asarray(P[y, y2])}
        per_pair = jax.vmap(lambda i: mpo.ALGORITHMS[0].loss(
            hp, {"y": lp[y][i][None, None], "y2": lp[y2][i][None, None]}, jax.tree.map(lambda a: a[i][None], d))[0])(
            jnp.arange(len(y)))
        return jnp.sum(jnp.asarray(w) * per_pair)

    got = _minimise(expected)
    want = _one_step("mpo", P, magnet, 0.0, pi_t, eta=eta, alpha=alpha, reset_every=10)
    np.testing.assert_allclose(got, want, atol=1e-8)
    assert np.abs(want - pi_t).max() > 1e-2


def _sppo_minimiser(P, pi_t, eta, k):
    """The minimiser of SPPO's exact expected loss with K = k responses per prompt from pi_t: every K-tuple
    enumerated with its probability, each judged pairwise as the stage does."""
    import itertools

    from nash_lm.train.algorithms import sppo
    from nash_lm.train.step import PolicyHParams

    hp = PolicyHParams(algorithm=sppo.ALGORITHMS[0], tau=0.0, own=(("eta", eta), ("samples", k)))
    names = sppo.responses(hp)
    tuples = np.array(list(itertools.product(range(N), repeat=k)))  # [T, k]
    w = np.prod(pi_t[tuples], axis=-1)
    judged = np.stack([P[tuples[:, names.index(a)], tuples[:, names.index(b)]] for a, b in sppo.pairs(hp)], -1)
    d = {"judged": jnp.asarray(judged)}
    for i, r in enumerate(names):
        d[f"anchor_{r}"], d[f"{r}_mask"] = _col(np.log(pi_t)[tuples[:, i]]), jnp.ones((len(tuples), 1))

    def expected(theta):
        lp = jax.nn.log_softmax(theta)
        per = jax.vmap(lambda j: sppo.ALGORITHMS[0].loss(
            hp, {r: lp[tuples[:, i]][j][None, None] for i, r in enumerate(names)},
            jax.tree.map(lambda a: a[j][None], d))[0])(jnp.arange(len(tuples)))
        return jnp.sum(jnp.asarray(w) * per)

    return _minimise(expected, np.log(pi_t))


@pytest.mark.parametrize("k", [2, 3])
def test_sppo_loss_minimiser_is_the_multiplicative_weights_step_to_third_order(k):
    """With K responses from pi_t and leave-one-out win rates, the exact expected SPPO loss is minimised by the
    fit of log(pi/pi_t) to eta (P(y > pi_t) - 1/2) over the simplex: it satisfies that constrained fit's
    optimality condition pi_t(y) (log(pi/pi_t)(y) - eta (P(y > pi_t) - 1/2)) = lambda pi(y) (one lambda for all
    y), and equals the multiplicative-weights step pi_t exp(eta P pi_t)/Z (`games`' 'mwu', SPPO's closed form)
    up to the paper's log Z ≈ eta/2 approximation. Both differ from log pi_t + eta (P(y > pi_t) - 1/2) by a shift of
    order eta^2 that normalisation makes agree at leading order, so their gap is O(eta^3): an eighth when eta
    halves (measured 1.2e-4 at eta 0.4, 1.5e-5 at 0.2, K = 2)."""
    P, _, pi_t = _game(2)
    win = P @ pi_t  # P(y > pi_t)
    gaps = []
    for eta in (0.4, 0.2):
        got = _sppo_minimiser(P, pi_t, eta, k)
        residual = pi_t * (np.log(got / pi_t) - eta * (win - 0.5))
        lam = residual / got
        np.testing.assert_allclose(lam, lam.mean(), rtol=1e-3)  # a wrong point misses by O(1) relative
        mwu = _one_step("mwu", P, pi_t, 0.0, pi_t, eta=eta)
        gaps.append(np.abs(np.log(got) - np.log(mwu)).max())
        assert gaps[-1] < eta ** 3
    assert 6.0 < gaps[0] / gaps[1] < 10.0, gaps


@pytest.mark.parametrize("tau,eta_inv", [(0.1, 1.0), (0.5, 2.0)])
def test_onpo_round_is_the_games_optimistic_step(tau, eta_inv):
    """A round of ONPO is two minimisations of INPO's loss anchored at pi_t: on pairs from the predictor pi_bar_t
    (giving pi_bar_{t+1}), then on pairs from that minimiser (giving pi_{t+1}). From a state with
    pi_bar_t != pi_t, the two exact minimisers equal the predictor and the policy of one step of `games`'
    `optimistic` (eta = 1/eta_inv) run from that state."""
    from nash_lm.train.algorithms import onpo
    from nash_lm.train.step import PolicyHParams

    alg = onpo.ALGORITHMS[0]
    P, mu, pi_t = _game(5)
    pred_t = np.random.default_rng(7).dirichlet(np.full(N, 2.0))  # the predictor pi_bar_t, not pi_t
    hp = PolicyHParams(algorithm=alg, tau=tau, own=(("eta_inv", eta_inv), ("half_every", 1)))

    def half_step(opponent):
        y, y2, w = _pairs(opponent, opponent)
        ones = jnp.ones((len(y), 1))
        d = {"ref_y": _col(np.log(mu)[y]), "ref_y2": _col(np.log(mu)[y2]),
             "anchor_y": _col(np.log(pi_t)[y]), "anchor_y2": _col(np.log(pi_t)[y2]),
             "y_mask": ones, "y2_mask": ones, "judged": jnp.asarray(P[y, y2])}

        def expected(theta):
            lp = jax.nn.log_softmax(theta)
            per_pair = jax.vmap(lambda i: alg.loss(hp, {"y": lp[y][i][None, None], "y2": lp[y2][i][None, None]},
                                                   jax.tree.map(lambda a: a[i][None], d))[0])(jnp.arange(len(y)))
            return jnp.sum(jnp.asarray(w) * per_pair)

        return _minimise(expected, np.log(pi_t))

    pred_next = half_step(pred_t)
    pi_next = half_step(pred_next)

    with jax.enable_x64(True):
        log = lambda p: jnp.log(jnp.asarray(p))[None]  # one context
        g = games.Arrays(jnp.asarray(P - 0.5)[None], log(mu), jnp.asarray(tau, jnp.float64))
        want = games.ALGORITHMS["optimistic"].step({"logp": log(pi_t), "pred": log(pred_t)}, 0, g,
                                                   {"eta": 1.0 / eta_inv})
        want_pred, want_pi = np.exp(np.asarray(want["pred"]))[0], np.exp(np.asarray(want["logp"]))[0]
    np.testing.assert_allclose(pred_next, want_pred, atol=1e-8)
    np.testing.assert_allclose(pi_next, want_pi, atol=1e-8)
    # the optimistic step is not INPO's: the opponent matters (pi_bar_t differs from pi_t), and the round moves
    inpo_step = _one_step("inpo", P, mu, tau, pi_t, eta_inv=eta_inv)
    assert np.abs(want_pred - inpo_step).max() > 1e-3 and np.abs(want_pi - pi_t).max() > 1e-2
