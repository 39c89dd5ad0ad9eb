"""Preferences of a population of raters, Bradley-Terry fits, and RLHF's exact optimum, on enumerated responses.

The paper's motivation is that people disagree: K personas, each consistent on its own, aggregate to a
preference no reward can represent. This module builds such preferences and the Bradley-Terry (BT) machinery
RLHF puts in their place; everything is float64 NumPy on [n, n] preference matrices (one context; stack them for
several).

- `persona_preference(scores, kind)`: persona k ranks the responses by `scores[k]` ('order': a total order,
  P_k(y > y') = 1[s_k(y) > s_k(y')] with ties split; 'bt': P_k(y > y') = sigmoid(s_k(y) - s_k(y'))), and
  P(y > y') = (1/K) sum_k P_k(y > y'). Antisymmetric by construction; with K >= 3 disagreeing total orders it
  has Condorcet cycles.
- `bradley_terry_preference(scores)`: P(y > y') = sigmoid(s(y) - s(y')), the one structure RLHF is right for.
- `cycle_rate(P, sample)` (`cyclic_triples(P)`, their count): the share of cyclic triples of the strict majority relation (P > 1/2) among the
  triples of distinct responses of `sample`.
- `bt_fit(C, l2)`: the BT reward maximising sum_{a,b} C[a, b] log sigmoid(r_a - r_b) - l2/2 |r|^2 (C[a, b] = how
  often, or with what weight, a beat b), by Newton's method on the concave log-likelihood.
- `bt_projection(P, w)`: the BT projection of P under pairs drawn from w x w, i.e. `bt_fit(w w^T * P)`: the reward
  RLHF's reward model converges to with unlimited pairs from w (Munos et al., Prop. 2: it depends on w unless P is
  BT).
- `sample_pair_counts(P, w, n, rng)`: RLHF's data: n pairs from w x w labelled by Bernoulli(P), as win counts.
- `rlhf_policy(mu, r, c)`: the maximiser of E_pi[r] - c KL(pi || mu), pi proportional to mu exp(r / c).
- `ipo_fit(C, tau)`: offline IPO (Azar et al. 2023) on a tabular policy: the log-ratio g = log(pi/mu) minimising
  sum_{a,b} C[a, b] (g_a - g_b - 1/(2 tau))^2 (C[a, b]: how often a beat b). Its normal equations are a graph
  Laplacian system, L g = (wins - losses) / (2 tau) with L the Laplacian of C + C^T; the minimum-norm solution
  (each connected set of compared responses centred, a response never compared at 0). With the population
  C = (mu mu^T) * P it is g = (P(y > mu) - 1/2) / tau + const: IPO's optimum pi ∝ mu exp(P(y > mu) / tau),
  the tau-regularised best response to mu. (DPO on a tabular policy is the standard RLHF route: its minimiser
  is pi ∝ mu exp(r/beta) with r the Bradley-Terry fit of the same pairs, Rafailov et al. 2023, Sec. 4.)
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

PERSONA_KINDS = ("order", "bt")


def persona_preference(scores, kind: str = "order", scale: float = 1.0) -> np.ndarray:
    """P [n, n] = the mean over personas of each persona's preference (see the module docstring).

    `scores` [K, n]: persona k's utility of each response; `scale` multiplies score differences for kind 'bt'.
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[0] < 1:
        raise ValueError(f"scores: expected [K, n] with K >= 1, got shape {list(s.shape)}")
    if kind not in PERSONA_KINDS:
        raise ValueError(f"kind: must be one of {list(PERSONA_KINDS)}, got {kind!r}")
    P = np.zeros((s.shape[1], s.shape[1]))
    for sk in s:
        d = sk[:, None] - sk[None, :]
        P += (d > 0) + 0.5 * (d == 0) if kind == "order" else expit(scale * d)
    return P / s.shape[0]


def bradley_terry_preference(scores) -> np.ndarray:
    """P(y > y') = sigmoid(s(y) - s(y')) [n, n]."""
    s = np.asarray(scores, np.float64)
    return expit(s[:, None] - s[None, :])


def cycle_rate(P, sample=None) -> float:
    """Share of cyclic triples among the triples of distinct responses in `sample` (default: all responses).

    A triple {a, b, c} is cyclic when the strict majority relation (y beats y' iff P(y > y') > 1/2) orders it
    a > b > c > a or the reverse; a tie on any of its pairs makes it not cyclic.
    """
    P = np.asarray(P, np.float64)
    idx = np.arange(P.shape[0]) if sample is None else np.unique(np.asarray(sample))
    if len(idx) < 3:
        raise ValueError(f"sample: need at least 3 distinct responses, got {len(idx)}")
    m = len(idx)
    return float(cyclic_triples(P[np.ix_(idx, idx)]) / (m * (m - 1) * (m - 2) // 6))


def cyclic_triples(P) -> int:
    """How many triples of an [m, m] preference matrix are cyclic under its strict majority (P > 1/2)."""
    W = (np.asarray(P, np.float64) > 0.5).astype(np.int64)  # W[a, b] = 1: a beats b
    # Each cyclic triple is counted 3 times by trace(W^3) (once per starting vertex); a transitive triple never.
    return int(np.trace(W @ W @ W) // 3)


def bt_fit(C, l2: float = 0.0, *, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """Rewards r [n] maximising sum_{a,b} C[a,b] log sigmoid(r_a - r_b) - l2/2 |r|^2 (Newton with backtracking).

    With l2 = 0 the constant is fixed by centring (mean r = 0; the likelihood ignores it). The log-likelihood
    is concave, so Newton with an Armijo line search converges from r = 0; a response never compared keeps
    r = 0 (with l2 > 0) or its gauge value.
    """
    C = np.asarray(C, np.float64)
    n = C.shape[0]
    if C.shape != (n, n) or C.min() < 0:
        raise ValueError(f"C: expected a non-negative [n, n] matrix, got shape {list(C.shape)}")
    M = C + C.T  # comparisons between a and b, either way
    wins = C.sum(1)
    gauge = 0.0 if l2 > 0 else max(M.sum() / n, 1e-300)  # the penalty (gauge/2 n) (sum r)^2 fixes the mean

    def objective(r):
        d = r[:, None] - r[None, :]
        return -np.sum(C * log_expit(d)) + 0.5 * l2 * r @ r + 0.5 * gauge * r.mean() ** 2 * n

    r = np.zeros(n)
    f = objective(r)
    for _ in range(max_iter):
        d = r[:, None] - r[None, :]
        sig = expit(d)
        g = -(wins - (M * sig).sum(1)) + l2 * r + gauge * r.mean()
        curv = M * sig * (1.0 - sig)
        H = np.diag(curv.sum(1) + l2) - curv + gauge / n
        step = np.linalg.solve(H, -g)
        decrement = -g @ step
        if np.abs(step).max() < tol * (1.0 + np.abs(r).max()):
            break
        t = 1.0
        while True:
            f_new = objective(r + t * step)
            if f_new <= f - 1e-4 * t * decrement:
                break
            t *= 0.5
            if t < 1e-8:  # no decrease left at working precision: r is optimal to rounding
                return r - r.mean() if l2 == 0 else r
        r, f = r + t * step, f_new
    return r - r.mean() if l2 == 0 else r


def bt_projection(P, w) -> np.ndarray:
    """The Bradley-Terry projection of P under pairs from w x w (centred rewards [n])."""
    P, w = np.asarray(P, np.float64), np.asarray(w, np.float64)
    return bt_fit(w[:, None] * w[None, :] * P)


def sample_pair_counts(P, w, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """C [n, n]: C[a, b] = times a beat b among `n_pairs` pairs drawn from w x w, labelled by Bernoulli(P)."""
    P, w = np.asarray(P, np.float64), np.asarray(w, np.float64)
    a = rng.choice(len(w), size=n_pairs, p=w)
    b = rng.choice(len(w), size=n_pairs, p=w)
    first = rng.uniform(size=n_pairs) < P[a, b]
    C = np.zeros((len(w), len(w)))
    np.add.at(C, (np.where(first, a, b), np.where(first, b, a)), 1.0)
    return C


def rlhf_policy(mu, r, c: float) -> np.ndarray:
    """argmax_pi E_pi[r] - c KL(pi || mu) = mu exp(r / c) / Z (per row when mu, r are [X, n]); with c = 1 and
    r = IPO's log-ratio g (`ipo_fit`), IPO's policy mu exp(g) / Z."""
    if not c > 0:
        raise ValueError(f"c: RLHF's KL coefficient must be > 0, got {c}")
    z = np.log(np.asarray(mu, np.float64)) + np.asarray(r, np.float64) / c
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def ipo_fit(C, tau: float) -> np.ndarray:
    """Offline IPO's tabular log-ratio g [n] (see the module docstring): min-norm least squares."""
    if not tau > 0:
        raise ValueError(f"tau: IPO's regularisation must be > 0, got {tau}")
    C = np.asarray(C, np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.min() < 0:
        raise ValueError(f"C: expected a non-negative [n, n] matrix, got shape {list(C.shape)}")
    M = C + C.T
    lap = np.diag(M.sum(1)) - M
    rhs = (C.sum(1) - C.sum(0)) / (2.0 * tau)
    return np.linalg.lstsq(lap, rhs, rcond=None)[0]
