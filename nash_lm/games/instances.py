"""The instance library: preference games with known structure (nlhf_math.md, section 4.2).

Every constructor returns a `Game(P, mu, rho)` NamedTuple of NumPy float64 arrays (single-context games have
P [n, n], mu [n] and rho None; contextual ones [X, n, n], [X, n], [X]). `make(name, **kwargs)` builds one by
name, which is how configs refer to them.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np


class Game(NamedTuple):
    P: np.ndarray
    mu: np.ndarray
    rho: np.ndarray | None = None


def _from_upper(wins: np.ndarray) -> np.ndarray:
    """Completes P from P[i, j] for i < j: P[j, i] = 1 − P[i, j], P[i, i] = ½."""
    n = wins.shape[-1]
    upper = np.triu(np.ones((n, n)), 1)
    return wins * upper + np.swapaxes((1.0 - wins) * upper, -1, -2) + 0.5 * np.eye(n)


def rock_paper_scissors(soft: float = 1.0, mu=(0.7, 0.2, 0.1)) -> Game:
    """Rock-paper-scissors: P(win) = (1 + soft)/2; soft = 1 gives 0/1 preferences (benchmark B1)."""
    if not 0 < soft <= 1:
        raise ValueError(f"soft: must lie in (0, 1], got {soft}")
    w = (1.0 + soft) / 2.0
    # Order (rock, paper, scissors): paper beats rock, scissors beats paper, rock beats scissors.
    P = np.array([[0.5, 1 - w, w], [w, 0.5, 1 - w], [1 - w, w, 0.5]])
    return Game(P, _distribution(mu, 3))


def dice_win_probability(a, b) -> float:
    """P(die a beats die b) with ties counted as ½, by enumerating all face pairs."""
    wins = sum((x > y) + 0.5 * (x == y) for x, y in itertools.product(a, b))
    return wins / (len(a) * len(b))


DICE = ((2, 2, 4, 4, 9, 9), (1, 1, 6, 6, 8, 8), (3, 3, 5, 5, 7, 7))


def dice(mu=(1 / 3, 1 / 3, 1 / 3), faces=DICE) -> Game:
    """Non-transitive dice (Munos et al. App. C.1): A beats B, B beats C, C beats A, each with probability 5/9."""
    n = len(faces)
    P = np.array([[dice_win_probability(faces[i], faces[j]) for j in range(n)] for i in range(n)])
    return Game(P, _distribution(mu, n))


def three_raters(eps: float = 0.1, mu=(1 / 3, 1 / 3, 1 / 3)) -> Game:
    """Munos et al. section 3.2: three rater types with weights (1/3 − ε, 1/3 + ε/2, 1/3 + ε/2).

    Type 1 prefers y2 ≻ y1, type 2 y1 ≻ y3, type 3 y3 ≻ y2; other pairs tie. Unregularized equilibrium:
    (1/3 + ε/2, 1/3 + ε/2, 1/3 − ε) for |ε| ≤ 1/3.
    """
    if not -1 / 3 <= eps <= 1 / 3:
        raise ValueError(f"eps: must lie in [-1/3, 1/3], got {eps}")
    p1, p2, p3 = 1 / 3 - eps, 1 / 3 + eps / 2, 1 / 3 + eps / 2
    wins = np.zeros((3, 3))
    wins[0, 1] = 1 - (1 + p1) / 2  # P(y1 ≻ y2)
    wins[0, 2] = (1 + p2) / 2  # P(y1 ≻ y3)
    wins[1, 2] = 1 - (1 + p3) / 2  # P(y2 ≻ y3)
    return Game(_from_upper(wins), _distribution(mu, 3))


def bradley_terry(rewards, mu=None) -> Game:
    """Logistic Bradley–Terry preferences P(i ≻ j) = σ(r_i − r_j)."""
    r = np.asarray(rewards, np.float64)
    P = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
    return Game(P, _distribution(mu, len(r)))


def elo(mu=None) -> Game:
    """Munos et al. App. A: Elo scores (0, log 9, log 2), so P(y2 ≻ y1) = 0.9, P(y3 ≻ y1) = 2/3, P(y2 ≻ y3) = 9/11."""
    return bradley_terry([0.0, np.log(9.0), np.log(2.0)], mu)


def affine_bradley_terry(rewards, c: float, mu=None) -> Game:
    """Affine preferences P(i ≻ j) = ½ + (r_i − r_j)/c; needs c ≥ 2 max|r_i − r_j|. Then π*_τ ∝ μ exp(r/(cτ))."""
    r = np.asarray(rewards, np.float64)
    spread = r.max() - r.min()
    if c < 2 * spread:
        raise ValueError(f"c: must be at least 2 * (max r - min r) = {2 * spread} so that P lies in [0, 1]")
    return Game(0.5 + (r[:, None] - r[None, :]) / c, _distribution(mu, len(r)))


def random_game(n: int = 10, contexts: int = 1, seed: int = 0) -> Game:
    """EGPO-style random games: P_ij ~ U[0, 1] for i > j, μ = softmax(N(0, 1) logits); `contexts` > 1 stacks
    independent games with uniform ρ."""
    rng = np.random.default_rng(seed)
    lower = rng.uniform(size=(contexts, n, n))
    P = _from_upper(np.swapaxes(1.0 - lower, -1, -2))  # P[i, j] = U_ij for i > j via the complement
    logits = rng.normal(size=(contexts, n))
    mu = np.exp(logits - logits.max(-1, keepdims=True))
    mu /= mu.sum(-1, keepdims=True)
    if contexts == 1:
        return Game(P[0], mu[0])
    return Game(P, mu, np.full(contexts, 1.0 / contexts))


def cyclic_tournament(n: int = 5, strength: float = 1.0, mu=None) -> Game:
    """Regular tournament on odd n: i beats the next (n−1)/2 actions (mod n) with probability (1 + strength)/2.
    Its unique unregularized equilibrium is uniform."""
    if n < 3 or n % 2 == 0:
        raise ValueError(f"n: a regular cyclic tournament needs an odd n >= 3, got {n}")
    w = (1.0 + strength) / 2.0
    P = np.full((n, n), 0.5)
    for i in range(n):
        for k in range(1, (n - 1) // 2 + 1):
            P[i, (i + k) % n] = w
            P[(i + k) % n, i] = 1 - w
    return Game(P, _distribution(mu, n))


def _distribution(mu, n: int) -> np.ndarray:
    if mu is None:
        return np.full(n, 1.0 / n)
    mu = np.asarray(mu, np.float64)
    if mu.shape != (n,):
        raise ValueError(f"mu: expected {n} probabilities, got shape {list(mu.shape)}")
    return mu / mu.sum()


REGISTRY = {
    "rps": rock_paper_scissors,
    "dice": dice,
    "three_raters": three_raters,
    "elo": elo,
    "bradley_terry": bradley_terry,
    "affine_bradley_terry": affine_bradley_terry,
    "random": random_game,
    "cyclic": cyclic_tournament,
}


def make(name: str, **kwargs) -> Game:
    """An instance by registry name, e.g. make("random", n=100, seed=0)."""
    if name not in REGISTRY:
        raise ValueError(f"instance: unknown name {name!r}; known: {sorted(REGISTRY)}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"instance {name!r}: {e}") from None
