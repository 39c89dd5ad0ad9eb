"""Preference function classes and their maximum-likelihood fits.

Two classes of antisymmetric preference functions P(x, a, a') (P(x,a,a') + P(x,a',a) = 1):

- `TabularClass(X, n)`: every P with entries in [0, 1]; one free probability per unordered pair {a, a'} per
  context. Its MLE is the empirical win rate of each pair (½ for a pair never compared).
- `LinearClass(features)`: P_θ(x, a, a') = σ(θᵀφ(x, a, a')) with antisymmetric features φ(x,a,a') = −φ(x,a',a),
  which makes every P_θ antisymmetric (σ(z) + σ(−z) = 1). Its MLE is ridge-regularised logistic regression,
  solved by damped Newton (`logistic_mle`). The tabular class is the linear class with the one-hot features of
  `tabular_features` (on its interior).

Feature constructors: `tabular_features`, `bt_features` (φ = ψ(a) − ψ(a'): Bradley–Terry, transitive) and
`skew_features` (φ_ij = ψ_i(a)ψ_j(a') − ψ_j(a)ψ_i(a'): non-transitive, rock-paper-scissors-like).

The fits also carry what the pessimistic and online estimators need: pair counts (tabular) and the design
matrix Σ = λI + Σ_i φ_i φ_iᵀ (linear).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nash_lm.learning.data import Dataset, pair_counts

ANTISYMMETRY_TOL = 1e-12


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------------------
# Tabular class.


class TabularFit(NamedTuple):
    """MLE of the tabular class: P_hat [X, n, n] (½ on unobserved pairs), wins W and pair counts N."""

    P_hat: np.ndarray
    W: np.ndarray
    N: np.ndarray


class TabularClass:
    """All antisymmetric P on X contexts and n actions; the MLE is the per-pair empirical win rate."""

    def __init__(self, num_contexts: int, num_actions: int):
        if num_contexts < 1 or num_actions < 2:
            raise ValueError(f"num_actions: need >= 2 actions and >= 1 context, got {num_actions}, {num_contexts}")
        self.num_contexts, self.num_actions = int(num_contexts), int(num_actions)

    def fit(self, data: Dataset) -> TabularFit:
        if (data.num_contexts, data.num_actions) != (self.num_contexts, self.num_actions):
            raise ValueError("data: game shape does not match the class")
        W, N = pair_counts(data)
        P_hat = np.where(N > 0, W / np.maximum(N, 1.0), 0.5)
        idx = np.arange(self.num_actions)
        P_hat[:, idx, idx] = 0.5
        return TabularFit(P_hat, W, N)

    def features(self) -> np.ndarray:
        return tabular_features(self.num_contexts, self.num_actions)


# ----------------------------------------------------------------------------------------------------------
# Linear class with a logistic link.


def check_features(features) -> np.ndarray:
    """Canonical [X, n, n, d] float64 features; raises ValueError unless φ(x,a,a') = −φ(x,a',a)."""
    phi = np.asarray(features, dtype=np.float64)
    if phi.ndim == 3:
        phi = phi[None]
    if phi.ndim != 4 or phi.shape[1] != phi.shape[2]:
        raise ValueError(f"features: expected shape [n, n, d] or [X, n, n, d], got {list(phi.shape)}")
    if not np.all(np.isfinite(phi)):
        raise ValueError("features: contain NaN or Inf")
    asym = np.abs(phi + np.swapaxes(phi, 1, 2)).max() if phi.size else 0.0
    if asym > ANTISYMMETRY_TOL * max(1.0, np.abs(phi).max()):
        raise ValueError(f"features: not antisymmetric, max |phi(a,b) + phi(b,a)| = {asym:.3g}")
    return phi


def logistic_nll(theta, F, y, ridge):
    """Ridge-regularised negative log-likelihood of labels y under P = σ(Fθ)."""
    z = F @ theta
    return float(np.sum(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)) + 0.5 * ridge * theta @ theta)


def logistic_mle(F, y, ridge: float = 1e-6, tol: float = 1e-11, max_iter: int = 200) -> np.ndarray:
    """argmin_θ Σ_i −[y_i log σ(f_iᵀθ) + (1−y_i) log σ(−f_iᵀθ)] + (ridge/2)‖θ‖² by damped Newton.

    ridge > 0 makes the problem strongly convex, so the minimiser exists even for separable data.
    """
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    d = F.shape[1]
    if ridge <= 0:
        raise ValueError(f"ridge: must be > 0, got {ridge}")
    theta = np.zeros(d)
    f = logistic_nll(theta, F, y, ridge)
    for _ in range(max_iter):
        s = sigmoid(F @ theta)
        g = F.T @ (s - y) + ridge * theta
        H = (F * (s * (1 - s))[:, None]).T @ F + ridge * np.eye(d)
        step = np.linalg.solve(H, g)
        dec = float(g @ step)  # Newton decrement²
        if dec / 2 <= tol * max(1.0, abs(f)):
            break
        t = 1.0
        while True:
            cand = theta - t * step
            fc = logistic_nll(cand, F, y, ridge)
            if fc <= f - 0.25 * t * dec or t < 1e-12:
                break
            t *= 0.5
        theta, f = cand, fc
    return theta


class LinearFit(NamedTuple):
    """MLE of the linear class: θ̂, P_hat = σ(Φθ̂) [X, n, n] and the design matrix Σ = λI + Σ_i φ_i φ_iᵀ."""

    theta: np.ndarray
    P_hat: np.ndarray
    Sigma: np.ndarray
    N: np.ndarray  # pair counts [X, n, n], for reporting coverage


class LinearClass:
    """P_θ(x, a, a') = σ(θᵀφ(x, a, a')) for antisymmetric features φ [X, n, n, d]."""

    def __init__(self, features, ridge: float = 1e-6, design_lambda: float = 1.0):
        self.phi = check_features(features)
        if ridge <= 0:
            raise ValueError(f"ridge: must be > 0, got {ridge}")
        if design_lambda <= 0:
            raise ValueError(f"design_lambda: must be > 0, got {design_lambda}")
        self.ridge, self.design_lambda = float(ridge), float(design_lambda)
        self.num_contexts, self.num_actions, _, self.dim = self.phi.shape

    def prob(self, theta) -> np.ndarray:
        return sigmoid(self.phi @ np.asarray(theta, dtype=np.float64))

    def design(self, data: Dataset) -> np.ndarray:
        F = self.phi[data.x, data.a1, data.a2]
        return self.design_lambda * np.eye(self.dim) + F.T @ F

    def fit(self, data: Dataset) -> LinearFit:
        if (data.num_contexts, data.num_actions) != (self.num_contexts, self.num_actions):
            raise ValueError("data: game shape does not match the class")
        F = self.phi[data.x, data.a1, data.a2]
        theta = logistic_mle(F, data.y, self.ridge)
        return LinearFit(theta, self.prob(theta), self.design(data), pair_counts(data)[1])


# ----------------------------------------------------------------------------------------------------------
# Feature constructors.


def tabular_features(num_contexts: int, num_actions: int) -> np.ndarray:
    """One coordinate per (context, pair a < b): φ = +e_k for (a, b), −e_k for (b, a), 0 on the diagonal."""
    X, n = num_contexts, num_actions
    pairs = [(x, a, b) for x in range(X) for a in range(n) for b in range(a + 1, n)]
    phi = np.zeros((X, n, n, len(pairs)))
    for k, (x, a, b) in enumerate(pairs):
        phi[x, a, b, k], phi[x, b, a, k] = 1.0, -1.0
    return phi


def bt_features(psi) -> np.ndarray:
    """Bradley–Terry features φ(x,a,a') = ψ(x,a) − ψ(x,a') from action embeddings ψ [n, k] or [X, n, k]."""
    psi = np.asarray(psi, dtype=np.float64)
    psi = psi[None] if psi.ndim == 2 else psi
    return psi[:, :, None, :] - psi[:, None, :, :]


def skew_features(psi) -> np.ndarray:
    """Skew-bilinear features φ_ij(x,a,a') = ψ_i(x,a)ψ_j(x,a') − ψ_j(x,a)ψ_i(x,a') for i < j (non-transitive)."""
    psi = np.asarray(psi, dtype=np.float64)
    psi = psi[None] if psi.ndim == 2 else psi
    k = psi.shape[-1]
    outer = psi[:, :, None, :, None] * psi[:, None, :, None, :]  # [X, a, b, i, j] = ψ_i(a) ψ_j(b)
    skew = outer - np.swapaxes(outer, 3, 4)
    iu, ju = np.triu_indices(k, 1)
    return skew[..., iu, ju]
