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
