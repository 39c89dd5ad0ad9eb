"""The KL-regularized preference game: validation, exact equilibrium and exact duality gap.

A game is a preference tensor P of shape [n, n] or [X, n, n] (P + Pᵀ = 1, entries in [0, 1]), a reference
policy μ of shape [n] or [X, n], context weights ρ of shape [X] (uniform by default) and τ ≥ 0. The payoff
of the max player is

    J(π1, π2) = E_{x~ρ} [ π1ᵀ P π2 − τ KL(π1‖μ) + τ KL(π2‖μ) ],

a symmetric constant-sum game (J(π1, π2) + J(π2, π1) = 1) whose equilibrium is unique for τ > 0.

Everything here runs in float64 (`jax.enable_x64`) and is vectorised over contexts. Internally the engine works
with the antisymmetric payoff A = P − ½ (A = −Aᵀ), which gives the same policies and better-conditioned logits.

- `nash_equilibrium(P, mu, tau, rho=None)`: τ > 0 by globalised Newton on the fixed point
  θ = log μ + A softmax(θ) / τ; τ = 0 by linear programming (scipy HiGHS), one LP per context.
- `duality_gap(P, mu, tau, pi, rho=None)`: the closed form
  DG_τ(π) = 2 [τ log Σ_y μ(y) exp((Pπ)(y)/τ) + τ KL(π‖μ)] − 1   (τ = 0: 2 max_y (Pπ)(y) − 1).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

ANTISYMMETRY_TOL = 1e-9
SIMPLEX_TOL = 1e-9


class CheckedGame(NamedTuple):
    """A validated game in canonical float64 NumPy form: P [X, n, n], mu [X, n], rho [X], tau.

    `squeeze` remembers whether the caller passed a single context ([n, n] and [n]), so that results can be
    returned in the caller's shape.
    """

    P: np.ndarray
    mu: np.ndarray
    rho: np.ndarray
    tau: float
    squeeze: bool = False

    @property
    def A(self) -> np.ndarray:
        return self.P - 0.5

    @property
    def n(self) -> int:
        return self.P.shape[-1]

    def unbatch(self, x):
        """Returns a per-context array [X, ...] in the caller's shape ([...] if they gave one context)."""
        return x[0] if self.squeeze else x


def check_game(P, mu, tau, rho=None) -> CheckedGame:
    """Validates and canonicalises a game; raises ValueError naming the argument and what is wrong."""
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau: expected a number, got {tau!r}") from None
    if not np.isfinite(tau) or tau < 0:
        raise ValueError(f"tau: must be a finite number >= 0, got {tau}")
    P = np.asarray(P, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if P.ndim not in (2, 3) or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"P: expected shape [n, n] or [X, n, n], got {list(P.shape)}")
    if mu.ndim not in (1, 2):
        raise ValueError(f"mu: expected shape [n] or [X, n], got {list(mu.shape)}")
    n = P.shape[-1]
    if mu.shape[-1] != n:
        raise ValueError(f"mu: has {mu.shape[-1]} actions but P has {n}")
    squeeze = P.ndim == 2 and mu.ndim == 1
    P3 = P if P.ndim == 3 else P[None]
    mu2 = mu if mu.ndim == 2 else mu[None]
    X = max(P3.shape[0], mu2.shape[0])
    if P3.shape[0] not in (1, X) or mu2.shape[0] not in (1, X):
        raise ValueError(f"mu: {mu2.shape[0]} contexts but P has {P3.shape[0]}")
    P3 = np.broadcast_to(P3, (X, n, n)).copy()
    mu2 = np.broadcast_to(mu2, (X, n)).copy()
    if not np.all(np.isfinite(P3)):
        raise ValueError("P: contains NaN or Inf")
    if P3.min() < 0 or P3.max() > 1:
        raise ValueError(f"P: entries must lie in [0, 1], found range [{P3.min():.6g}, {P3.max():.6g}]")
    asym = np.abs(P3 + np.swapaxes(P3, -1, -2) - 1).max()
    if asym > ANTISYMMETRY_TOL:
        raise ValueError(f"P: not antisymmetric, max |P + P^T - 1| = {asym:.3g}")
    if not np.all(np.isfinite(mu2)) or mu2.min() < 0:
        raise ValueError("mu: entries must be finite and >= 0")
    sums = mu2.sum(-1)
    if np.abs(sums - 1).max() > SIMPLEX_TOL:
        raise ValueError(f"mu: each distribution must sum to 1, found sums in [{sums.min():.12g}, {sums.max():.12g}]")
    if tau > 0 and mu2.min() == 0:
        raise ValueError("mu: has zero entries, which the KL regularizer (tau > 0) does not allow")
    if rho is None:
        rho = np.full(X, 1.0 / X)
    else:
        rho = np.asarray(rho, dtype=np.float64).reshape(-1)
        if rho.shape[0] != X:
            raise ValueError(f"rho: expected {X} context weights, got {rho.shape[0]}")
        if rho.min() < 0 or abs(rho.sum() - 1) > SIMPLEX_TOL:
            raise ValueError("rho: context weights must be >= 0 and sum to 1")
    return CheckedGame(P3, mu2, rho, tau, squeeze)


def check_policy(game: CheckedGame, pi, name: str = "pi") -> np.ndarray:
    """A policy in the game's canonical shape [X, n]; raises ValueError if it is not a distribution."""
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape[-1] != game.n or pi.ndim not in (1, 2):
        raise ValueError(f"{name}: expected shape [n] or [X, n] with n = {game.n}, got {list(pi.shape)}")
    pi = np.broadcast_to(pi if pi.ndim == 2 else pi[None], game.mu.shape)
    if not np.all(np.isfinite(pi)) or pi.min() < 0 or np.abs(pi.sum(-1) - 1).max() > SIMPLEX_TOL:
        raise ValueError(f"{name}: each row must be a probability distribution")
    return pi


# ----------------------------------------------------------------------------------------------------------
# Pure JAX kernels on canonical arrays (call under jax.enable_x64).


def kl(p, q):
    """KL(p‖q) along the last axis, with 0 log 0 = 0."""
    return jnp.sum(jax.scipy.special.xlogy(p, p) - jax.scipy.special.xlogy(p, q), axis=-1)


def payoff_vector(A, pi):
    """(A π)(y) per context: the advantage of action y against π, in [−½, ½]."""
    return jnp.einsum("xij,xj->xi", A, pi)


def gap_per_context(A, mu, tau, pi):
    """DG_τ(π) per context (closed form); τ may be a traced value, including 0.

    With A = P − ½, (Pπ) = (Aπ) + ½ and the ½ cancels the −1 of the closed form.
    """
    v = payoff_vector(A, pi)
    safe_tau = jnp.where(tau > 0, tau, 1.0)
    regularized = 2.0 * safe_tau * (jax.nn.logsumexp(jnp.log(mu) + v / safe_tau, axis=-1) + kl(pi, mu))
    return jnp.where(tau > 0, regularized, 2.0 * v.max(-1))


def _newton_one_context(A, log_mu, tau, tol, max_iter):
    """Globalised Newton for F(θ) = θ − log μ − A softmax(θ)/τ = 0 in one context.

    The Jacobian J = I − (A/τ)(diag π − ππᵀ) is never singular (A skew, diag π − ππᵀ PSD, so the eigenvalues
    of the second term are imaginary), hence the Newton direction is a descent direction of ½‖F‖² and an
    Armijo backtracking search converges from any start.
    """
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)

    def probs(theta):
        # Entries below 1e-200 are flushed to zero: they do not move the fixed point at any printable precision,
        # and subnormal floats inside the matvec and the LU would make the CPU ~100x slower.
        p = jax.nn.softmax(theta)
        return jnp.where(p > 1e-200, p, 0.0)

    def residual(theta):
        return theta - log_mu - A @ probs(theta) / tau

    def newton_step(carry):
        theta, f, it = carry
        pi = probs(theta)
        jac = eye - (A * pi[None, :] - jnp.outer(A @ pi, pi)) / tau
        d = -jnp.linalg.solve(jac, f)
        f2 = f @ f

        def shrink(c):
            t, _, _ = c
            t = t * 0.5
            f_new = residual(theta + t * d)
            return t, f_new, f_new @ f_new

        def not_enough(c):
            t, _, f_new2 = c
            return (f_new2 > (1.0 - 1e-4 * t) * f2) & (t > 1e-12)

        f_full = residual(theta + d)
        t, f_new, _ = jax.lax.while_loop(not_enough, shrink, (jnp.asarray(1.0, A.dtype), f_full, f_full @ f_full))
        return theta + t * d, f_new, it + 1

    def keep_going(carry):
        _, f, it = carry
        return (jnp.max(jnp.abs(f)) > tol) & (it < max_iter)

    theta0 = log_mu
    theta, f, it = jax.lax.while_loop(keep_going, newton_step, (theta0, residual(theta0), 0))
    return jax.nn.softmax(theta), jnp.max(jnp.abs(f)), it


@jax.jit
def _regularized_equilibrium(A, log_mu, tau):
    # The residual lives on the scale of θ ~ 1/τ; ask for 1e-13 relative to that scale.
    tol = 1e-13 * jnp.maximum(1.0, 1.0 / tau)
    # lax.map, not vmap: each context converges in its own number of steps, and an unbatched LU is much faster
    # than XLA's batched, pivoting one on CPU.
    return jax.lax.map(lambda args: _newton_one_context(*args, tau, tol, 500), (A, log_mu))


def _lp_equilibrium(P: np.ndarray) -> np.ndarray:
    """An equilibrium of the unregularized game max_π min_y' (πᵀP)(y') by LP (HiGHS), one per context."""
    X, n, _ = P.shape
    out = np.empty((X, n))
    c = np.zeros(n + 1)
    c[-1] = -1.0  # maximise v
    a_eq = np.ones((1, n + 1))
    a_eq[0, -1] = 0.0
    bounds = [(0, None)] * n + [(None, None)]
    for x in range(X):
        a_ub = np.hstack([-P[x].T, np.ones((n, 1))])  # v − Σ_y π(y) P(y, y') ≤ 0 for every y'
        res = optimize.linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0], bounds=bounds,
                               method="highs")
        if res.status != 0:
            raise RuntimeError(f"LP for context {x} failed: {res.message}")
        pi = np.clip(res.x[:n], 0, None)
        out[x] = pi / pi.sum()
    return out


def solve(game: CheckedGame) -> np.ndarray:
    """The equilibrium of a validated game, canonical shape [X, n]."""
    if game.tau == 0:
        return _lp_equilibrium(game.P)
    with jax.enable_x64(True):
        pi, res, _ = _regularized_equilibrium(jnp.asarray(game.A), jnp.log(jnp.asarray(game.mu)), game.tau)
        pi, res = np.asarray(pi), np.asarray(res)
    if not np.all(np.isfinite(pi)) or res.max() > 1e-8 * max(1.0, 1.0 / game.tau):
        raise RuntimeError(f"Newton did not converge (residual {res.max():.3g}, tau={game.tau})")
    return pi


# ----------------------------------------------------------------------------------------------------------
# Public API.


def nash_equilibrium(P, mu, tau, rho=None) -> np.ndarray:
    """The equilibrium policy of the τ-regularized preference game (shape of mu: [n] or [X, n]).

    τ > 0: the unique regularized equilibrium π*_τ ∝ μ exp(Pπ*_τ/τ), to ~1e-12.
    τ = 0: an equilibrium of the unregularized game by linear programming (a vertex of the equilibrium set
    when it is not unique).
    """
    game = check_game(P, mu, tau, rho)
    return game.unbatch(solve(game))


def duality_gap(P, mu, tau, pi, rho=None) -> float:
    """The exact duality gap max_π1 J(π1, π) − min_π2 J(π, π2) of policy π (ρ-weighted over contexts).

    It is ≥ 0 and zero exactly at the equilibrium; Ye et al.'s ε criterion J(π*, π*) − J(π, †) is half of it.
    """
    game = check_game(P, mu, tau, rho)
    pi = check_policy(game, pi)
    with jax.enable_x64(True):
        g = gap_per_context(jnp.asarray(game.A), jnp.asarray(game.mu), game.tau, jnp.asarray(pi))
        return float(jnp.dot(jnp.asarray(game.rho), g))


def best_response(P, mu, tau, pi, rho=None) -> np.ndarray:
    """The max player's best response to π: ∝ μ exp(Pπ/τ) for τ > 0, a uniform mix of the argmax set for τ = 0."""
    game = check_game(P, mu, tau, rho)
    pi = check_policy(game, pi)
    v = np.einsum("xij,xj->xi", game.P, pi)
    if game.tau > 0:
        z = np.log(game.mu) + v / game.tau
        br = np.exp(z - z.max(-1, keepdims=True))
    else:
        br = (v >= v.max(-1, keepdims=True) - 1e-12).astype(np.float64)
    return game.unbatch(br / br.sum(-1, keepdims=True))


def payoff(P, mu, tau, pi1, pi2, rho=None) -> float:
    """J(π1, π2) = E_ρ[π1ᵀ P π2 − τ KL(π1‖μ) + τ KL(π2‖μ)], the max player's regularized payoff."""
    game = check_game(P, mu, tau, rho)
    pi1, pi2 = check_policy(game, pi1, "pi1"), check_policy(game, pi2, "pi2")
    with jax.enable_x64(True):
        mu = jnp.asarray(game.mu)
        per = jnp.einsum("xi,xij,xj->x", jnp.asarray(pi1), jnp.asarray(game.P), jnp.asarray(pi2))
        per = per - game.tau * kl(jnp.asarray(pi1), mu) + game.tau * kl(jnp.asarray(pi2), mu)
        return float(jnp.dot(jnp.asarray(game.rho), per))


def kl_divergence(p, q, rho=None) -> float:
    """ρ-weighted KL(p‖q) between policies of shape [n] or [X, n]."""
    p, q = np.atleast_2d(np.asarray(p, np.float64)), np.atleast_2d(np.asarray(q, np.float64))
    rho = np.full(p.shape[0], 1.0 / p.shape[0]) if rho is None else np.asarray(rho, np.float64)
    with jax.enable_x64(True):
        return float(jnp.dot(jnp.asarray(rho), kl(jnp.asarray(p), jnp.asarray(q))))
