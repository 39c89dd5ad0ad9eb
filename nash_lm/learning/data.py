"""Preference datasets: labelled pairs (x, a1, a2, y) with y ~ Bernoulli(P*(x, a1, a2)).

This module owns the data side of the statistical setting of Ye et al. (arXiv 2402.07314; docs/math.md,
section 7): a behaviour *pair distribution* D[x, a1, a2] (the product ρ(x) π_D(a1|x) π_D(a2|x) in the
paper; any joint distribution here, so that coverage can be removed pair by pair), sampling of n labelled
tuples, concatenation of batches (online learning) and the pair counts every estimator is built from.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """n labelled comparisons in a game with X contexts and n_actions actions.

    x, a1, a2: int arrays [N]; y: float array [N] with y = 1 when a1 was preferred to a2.
    """

    x: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    y: np.ndarray
    num_contexts: int
    num_actions: int

    @property
    def size(self) -> int:
        return int(self.y.shape[0])

    def concat(self, other: "Dataset") -> "Dataset":
        if (other.num_contexts, other.num_actions) != (self.num_contexts, self.num_actions):
            raise ValueError("data: cannot concatenate datasets of different games")
        return Dataset(np.concatenate([self.x, other.x]), np.concatenate([self.a1, other.a1]),
                       np.concatenate([self.a2, other.a2]), np.concatenate([self.y, other.y]),
                       self.num_contexts, self.num_actions)

    @staticmethod
    def empty(num_contexts: int, num_actions: int) -> "Dataset":
        z = np.zeros(0, dtype=np.int64)
        return Dataset(z, z.copy(), z.copy(), np.zeros(0), num_contexts, num_actions)


def _as_game_arrays(P, rho=None):
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 2:
        P = P[None]
    if P.ndim != 3 or P.shape[1] != P.shape[2]:
        raise ValueError(f"P: expected shape [n, n] or [X, n, n], got {list(P.shape)}")
    X = P.shape[0]
    rho = np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=np.float64).reshape(-1)
    if rho.shape[0] != X or rho.min() < 0 or abs(rho.sum() - 1) > 1e-9:
        raise ValueError(f"rho: expected {X} non-negative context weights summing to 1")
    return P, rho


def product_behaviour(rho, pi1, pi2=None) -> np.ndarray:
    """D[x, a1, a2] = ρ(x) π1(a1|x) π2(a2|x) (π2 = π1 by default: the paper's a1, a2 ~ π_D i.i.d.)."""
    pi1 = np.atleast_2d(np.asarray(pi1, dtype=np.float64))
    pi2 = pi1 if pi2 is None else np.atleast_2d(np.asarray(pi2, dtype=np.float64))
    rho = np.asarray(rho, dtype=np.float64).reshape(-1)
    pi1 = np.broadcast_to(pi1, (rho.shape[0], pi1.shape[-1]))
    pi2 = np.broadcast_to(pi2, (rho.shape[0], pi2.shape[-1]))
    return rho[:, None, None] * pi1[:, :, None] * pi2[:, None, :]


def sample_dataset(P, D, n: int, rng: np.random.Generator) -> Dataset:
    """n i.i.d. tuples (x, a1, a2) ~ D with labels y ~ Bernoulli(P[x, a1, a2])."""
    P, _ = _as_game_arrays(P)
    D = np.asarray(D, dtype=np.float64)
    if D.ndim == 2:
        D = D[None]
    X, na, _ = P.shape
    if D.shape != (X, na, na):
        raise ValueError(f"behaviour: expected a pair distribution of shape {[X, na, na]}, got {list(D.shape)}")
    if D.min() < 0 or abs(D.sum() - 1) > 1e-9:
        raise ValueError("behaviour: the pair distribution must be non-negative and sum to 1")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    flat = rng.choice(D.size, size=n, p=D.ravel() / D.sum())
    x, rest = np.divmod(flat, na * na)
    a1, a2 = np.divmod(rest, na)
    y = (rng.random(n) < P[x, a1, a2]).astype(np.float64)
    return Dataset(x.astype(np.int64), a1.astype(np.int64), a2.astype(np.int64), y, X, na)


def pair_counts(data: Dataset):
    """(wins W, counts N), both [X, n, n]: N[x,a,b] = N[x,b,a] = number of comparisons of the pair {a, b}
    (either order), W[x,a,b] = number of those that a won. Self-comparisons (a1 = a2) carry no information
    (P(a > a) = ½ in every antisymmetric class) and are not counted."""
    X, n = data.num_contexts, data.num_actions
    W = np.zeros((X, n, n))
    N = np.zeros((X, n, n))
    off = data.a1 != data.a2
    x, a1, a2, y = data.x[off], data.a1[off], data.a2[off], data.y[off]
    np.add.at(N, (x, a1, a2), 1.0)
    np.add.at(N, (x, a2, a1), 1.0)
    np.add.at(W, (x, a1, a2), y)
    np.add.at(W, (x, a2, a1), 1.0 - y)
    return W, N
