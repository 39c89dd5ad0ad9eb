"""Batch online learning of the game: main agent + enhancer (Ye et al. Alg. 2) vs symmetric self-play.

For t = 1..T (batches of m labels):
1. Main agent: P̂_t = MLE of the linear class (logistic; default: tabular one-hot features) on all labels so far,
   π1_t = games.nash_equilibrium(P̂_t) (exact; before any data P̂ = ½ and π1 = μ).
2. Opponent π2_t, by `strategy`:
   - "enhancer" [derived; docs/math.md, section 7]: the most informative opponent in the plausible set,

         π2_t = argmax_{π2 ∈ Π_t} Γ_t(π1_t, π2),   Γ_t(π1, π2) = ‖E_{x~ρ, a~π1, a'~π2} φ(x,a,a')‖_{Σ_t^{-1}},
         Π_t = { π2 : τ KL_ρ(π2‖π1_t) ≤ β Γ_t(π1_t, π2) },   Σ_t = λI + Σ_{labels so far} φ φᵀ.

     Γ_t is the linear-class form of Ye et al.'s uncertainty ratio sup_P |E(P − P̂)(π1,π2)| / sqrt(λ + Σ(P − P̂)²)
     (constants folded into β); Π_t is the rule of the BT sister algorithm (Xiong et al. 2023): the enhancer may
     move away from the main agent only as far (in τ-weighted KL) as the information it gains.
     Γ_t(π1, π1) = 0 (φ is antisymmetric), so π2 = π1 is always feasible and the enhancer falls back to
     self-play once the fit is certain.
   - "symmetric": π2_t = π1_t (self-play sampling, a1, a2 ~ π1_t).
   - "uniform": π2_t = π1_t = uniform (non-adaptive data collection with the same label budget).
3. Collect m tuples x ~ ρ, a1 ~ π1_t, a2 ~ π2_t, y ~ Bernoulli(P*).
The reported metric is the half duality gap of the main agent π1_t under the true P* (Ye's ε criterion).
"""
from __future__ import annotations

import numpy as np
from scipy import optimize

from nash_lm import games
from nash_lm.learning.classes import LinearClass, tabular_features
from nash_lm.learning.data import Dataset, product_behaviour, sample_dataset

STRATEGIES = ("enhancer", "symmetric", "uniform")


def _kl_rows(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def uncertainty(features, Sigma, pi1, pi2, rho=None) -> float:
    """Γ(π1, π2) = ‖Σ_x ρ_x Σ_{a,a'} π1(a|x) π2(a'|x) φ(x,a,a')‖_{Σ^{-1}}."""
    phi = np.asarray(features, dtype=np.float64)
    phi = phi[None] if phi.ndim == 3 else phi
    X = phi.shape[0]
    rho = np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=np.float64)
    pi1, pi2 = np.atleast_2d(pi1), np.atleast_2d(pi2)
    v = np.einsum("x,xa,xb,xabd->d", rho, pi1, pi2, phi)
    return float(np.sqrt(max(v @ np.linalg.solve(Sigma, v), 0.0)))


def enhancer_policy(features, Sigma, pi1, tau: float, beta: float, rho=None, extra_starts=()) -> np.ndarray:
    """argmax Γ(π1, π2) over Π = {π2 : τ KL_ρ(π2‖π1) ≤ β Γ(π1, π2)} (multi-start SLSQP on the logits of π2
    relative to π1; π1 itself is returned when no start finds a feasible point with Γ > 0)."""
    phi = np.asarray(features, dtype=np.float64)
    phi = phi[None] if phi.ndim == 3 else phi
    X, n = phi.shape[:2]
    rho = np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=np.float64)
    pi1 = np.broadcast_to(np.atleast_2d(np.asarray(pi1, dtype=np.float64)), (X, n))
    if tau <= 0 or beta < 0:
        raise ValueError(f"tau, beta: need tau > 0 and beta >= 0, got {tau}, {beta}")
    Sinv = np.linalg.inv(Sigma)
    M = np.einsum("x,xa,xabd->xbd", rho, pi1, phi)  # v(π2) = Σ_x Σ_b π2(b|x) M[x, b]
    log_pi1 = np.log(np.maximum(pi1, 1e-300))

    def pi2_of(z):
        zz = log_pi1 + z.reshape(X, n)
        zz = zz - zz.max(-1, keepdims=True)
        e = np.exp(zz)
        return e / e.sum(-1, keepdims=True)

    def gamma_and_grad(z):
        p = pi2_of(z)
        v = np.einsum("xb,xbd->d", p, M)
        w = Sinv @ v
        g = float(np.sqrt(max(v @ w, 0.0)))
        dp = np.einsum("xbd,d->xb", M, w) / max(g, 1e-300)
        return g, (p * (dp - np.sum(p * dp, -1, keepdims=True))).reshape(-1)

    def slack_and_grad(z):  # β Γ − τ KL ≥ 0
        p = pi2_of(z)
        g, dg = gamma_and_grad(z)
        kl = float(rho @ _kl_rows(p, pi1))
        dkl = rho[:, None] * (np.log(np.maximum(p, 1e-300)) - log_pi1 + 1.0)
        dkl = (p * (dkl - np.sum(p * dkl, -1, keepdims=True))).reshape(-1)
        return beta * g - tau * kl, beta * dg - tau * dkl

    starts = [3.0 * np.eye(X * n)[k] for k in range(X * n)]
    starts += [np.asarray(z, dtype=np.float64).reshape(-1) for z in extra_starts]
    best, best_g = pi1.copy(), 0.0
    for z0 in starts:
        res = optimize.minimize(lambda z: tuple(-t for t in gamma_and_grad(z)), z0, jac=True, method="SLSQP",
                                constraints=[{"type": "ineq", "fun": lambda z: slack_and_grad(z)[0],
                                              "jac": lambda z: slack_and_grad(z)[1]}],
                                options={"ftol": 1e-12, "maxiter": 100})
        g = gamma_and_grad(res.x)[0]
        if slack_and_grad(res.x)[0] >= -1e-9 and g > best_g:
            best, best_g = pi2_of(res.x), g
    return best


def run_online(P, mu, tau: float, strategy: str, *, batches: int, batch_size: int, beta: float = 1.0,
               rho=None, features=None, ridge: float = 1e-6, design_lambda: float = 1.0,
               rng: np.random.Generator) -> list[dict]:
    """One online run; returns one record per batch t (the main agent π1_t was used to collect batch t):
    labels so far (before batch t), half duality gap of π1_t under P, Γ_t(π1_t, π2_t), KL(π2_t‖π1_t)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown {strategy!r}; known: {list(STRATEGIES)}")
    P = np.asarray(P, dtype=np.float64)
    P = P[None] if P.ndim == 2 else P
    X, n, _ = P.shape
    mu = np.broadcast_to(np.atleast_2d(np.asarray(mu, dtype=np.float64)), (X, n))
    rho = np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=np.float64)
    phi = tabular_features(X, n) if features is None else features
    cls = LinearClass(phi, ridge=ridge, design_lambda=design_lambda)
    data = Dataset.empty(X, n)
    records = []
    for t in range(1, batches + 1):
        fit = cls.fit(data)
        pi1 = games.nash_equilibrium(fit.P_hat, mu, tau, rho)
        if strategy == "enhancer":
            pi2 = enhancer_policy(cls.phi, fit.Sigma, pi1, tau, beta, rho)
            a_pi, b_pi = pi1, pi2
        elif strategy == "symmetric":
            pi2 = a_pi = b_pi = pi1
        else:
            pi2 = a_pi = b_pi = np.full((X, n), 1.0 / n)
        records.append({
            "batch": t, "labels": data.size,
            "half_gap": 0.5 * games.duality_gap(P, mu, tau, pi1, rho),
            "gamma": uncertainty(cls.phi, fit.Sigma, pi1, pi2, rho),
            "kl_pi2_pi1": float(rho @ _kl_rows(pi2, pi1)),
        })
        # Order of the pair is randomised so the data do not depend on which player is "first".
        D = 0.5 * (product_behaviour(rho, a_pi, b_pi) + product_behaviour(rho, b_pi, a_pi))
        data = data.concat(sample_dataset(P, D, batch_size, rng))
    fit = cls.fit(data)
    pi1 = games.nash_equilibrium(fit.P_hat, mu, tau, rho)
    records.append({"batch": batches + 1, "labels": data.size,
                    "half_gap": 0.5 * games.duality_gap(P, mu, tau, pi1, rho), "gamma": float("nan"),
                    "kl_pi2_pi1": float("nan")})
    return records
