"""Offline estimators of the regularized Nash policy; each outputs the max player π̂1 [X, n].

(c) Greedy plug-in: π̂ = games.nash_equilibrium(P̂), the equilibrium of the MLE's game.

(a) Version-space pessimism (Ye et al. Alg. 1, tabular class; docs/math.md, section 7):

        P̃ = { P tabular : Σ_i (P − P̂)²(x_i, a1_i, a2_i) ≤ β²/2 },
        π̂ = argmax_π1 min_π2 min_{P∈P̃} J_P(π1, π2).

    In the tabular class the sum over samples is Σ_pairs N_k (p_k − p̂_k)² with p_k ∈ [0, 1], an ellipsoid cut
    by the box; a pair never compared is unconstrained by the data (p_k anywhere in [0, 1]).

(b) Bonus (lower-confidence-bound) pessimism for the linear class [derived; the form in Sec. 2.2]:

        π̂ = argmax_π1 min_π2 [ J_P̂(π1, π2) − β ‖E_{x~ρ, a~π1, a'~π2} φ(x,a,a')‖_{Σ^{-1}} ],
        Σ = λI + Σ_i φ_i φ_iᵀ,   P̂ = σ(Φθ̂).

    The bonus is exactly min over the ellipsoid {δ : δᵀΣδ ≤ β²} of the linear perturbation δᵀE[φ] (Cauchy–
    Schwarz), so (b) is pessimism over the set {P̂ + Φδ : δᵀΣδ ≤ β²} (a first-order, identity-link version
    space in θ; it may leave [0, 1], which only makes it more pessimistic).

Both pessimistic problems have the form max_π1 f(π1) with

    f(π1) = min_{Δ∈C, π2} E_ρ[ π1ᵀ (P̂ + Δ) π2 + τ KL(π2‖μ) ] − τ KL_ρ(π1‖μ),

f concave (a minimum of functions linear in π1, minus KL), but the inner problem is not convex (it is concave
in Δ after minimising π2 out). `pessimistic_equilibrium` solves it by a cutting-plane method with curved cuts:
each oracle call at π1_t returns the minimising adversary P_t = P̂ + Δ_t, and
F_t(π1) = min_π2 E_ρ[π1ᵀP_tπ2 + τKL(π2‖μ)] (closed form, −τ log Σ μ exp(−P_tᵀπ1/τ)) is an upper model of the
inner minimum that is tight at π1_t; the master max_π1 min_t F_t(π1) − τKL(π1) is a small smooth program
(SLSQP). Master value and best evaluated f bracket the optimum; the loop stops when they agree. The inner
oracle alternates exact block minimisations (π2 = softmin response; Δ = the set's linear-minimisation oracle,
closed form for both sets) from several starts, so it finds the global minimum on small games (checked
against enumeration/scipy in tests) but is a local method in general.
Requires τ > 0.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import optimize, stats

from nash_lm import games
from nash_lm.learning.classes import LinearClass, TabularClass, tabular_features
from nash_lm.learning.data import Dataset


# ----------------------------------------------------------------------------------------------------------
# Uncertainty sets: a center P̂ and a linear-minimisation oracle over the perturbations Δ = P − P̂.


def _pairs(X: int, n: int):
    a, b = np.triu_indices(n, 1)
    x = np.repeat(np.arange(X), a.size)
    return x, np.tile(a, X), np.tile(b, X)


class VersionSpace:
    """Ye et al.'s version space for the tabular class: Σ_k N_k (p_k − p̂_k)² ≤ β²/2, p ∈ [0, 1].

    N [X, n, n] are the pair counts (an entry np.inf marks a pair known exactly: p_k = p̂_k).
    """

    def __init__(self, P_hat, N, beta: float):
        self.center = np.asarray(P_hat, dtype=np.float64)
        if self.center.ndim == 2:
            self.center = self.center[None]
        N = np.asarray(N, dtype=np.float64)
        N = N[None] if N.ndim == 2 else N
        if beta < 0:
            raise ValueError(f"beta: must be >= 0, got {beta}")
        X, n, _ = self.center.shape
        self.idx = _pairs(X, n)
        self.p_hat = self.center[self.idx]
        self.N = N[self.idx]
        self.r2 = 0.5 * float(beta) ** 2

    def lmo(self, G: np.ndarray) -> np.ndarray:
        """argmin_{Δ = P − P̂, P ∈ P̃} Σ G ⊙ Δ for a batch G [S, X, n, n]; returns Δ [S, X, n, n].

        With P(b,a) = 1 − P(a,b) the objective is Σ_k g_k (p_k − p̂_k), g_k = G(a,b) − G(b,a). KKT for the
        separable ellipsoid + box: p_k = clip(p̂_k − t g_k / N_k, 0, 1), with t ≥ 0 the smallest value making
        the ellipsoid constraint tight (t = ∞ if the box binds first), found exactly from the sorted breakpoints
        of the piecewise-quadratic Σ_k min(t² g_k²/N_k, N_k cap_k²).
        """
        x, a, b = self.idx
        g = G[:, x, a, b] - G[:, x, b, a]  # [S, K]
        S, K = g.shape
        sgn = np.sign(g)
        cap = np.where(g > 0, self.p_hat, 1.0 - self.p_hat)  # room to move against the gradient
        known = np.isinf(self.N)
        unobs = self.N == 0
        obs = ~known & ~unobs & (g != 0)
        Nk = np.where(obs, self.N, 1.0)
        absg = np.where(obs, np.abs(g), 0.0)
        a_k = absg ** 2 / Nk
        b_k = np.where(obs, Nk * cap ** 2, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_k = np.where(obs & (absg > 0), Nk * cap / np.where(absg > 0, absg, 1.0), 0.0)
        if self.r2 == 0:
            t = np.zeros(S)
        else:
            order = np.argsort(t_k, axis=1)
            ts = np.take_along_axis(t_k, order, 1)
            As = np.take_along_axis(a_k, order, 1)
            Bs = np.take_along_axis(b_k, order, 1)
            B_before = np.cumsum(Bs, 1) - Bs
            A_from = np.cumsum(As[:, ::-1], 1)[:, ::-1]
            S_at = B_before + ts ** 2 * A_from
            hit = S_at >= self.r2
            any_hit = hit.any(1)
            j = np.argmax(hit, 1)
            rows = np.arange(S)
            with np.errstate(divide="ignore", invalid="ignore"):
                t_hit = np.sqrt(np.maximum(self.r2 - B_before[rows, j], 0.0) / A_from[rows, j])
            t = np.where(any_hit, t_hit, np.inf)
        with np.errstate(invalid="ignore"):
            move = np.where(obs, np.minimum(t[:, None] * absg / Nk, cap), 0.0)
        move = np.where(unobs & (g != 0), cap, move)
        dev = -sgn * move  # p_k − p̂_k
        D = np.zeros((S,) + self.center.shape)
        D[:, x, a, b] = dev
        D[:, x, b, a] = -dev
        return D


class BonusSet:
    """Perturbations Φδ with δᵀΣδ ≤ β²: min_Δ ⟨G, Δ⟩ = −β‖Σ G⊙φ‖_{Σ^{-1}} (the LCB bonus of (b))."""

    def __init__(self, P_hat, features, Sigma, beta: float):
        self.center = np.asarray(P_hat, dtype=np.float64)
        if self.center.ndim == 2:
            self.center = self.center[None]
        self.phi = np.asarray(features, dtype=np.float64)
        self.phi = self.phi[None] if self.phi.ndim == 3 else self.phi
        self.Sigma = np.asarray(Sigma, dtype=np.float64)
        if beta < 0:
            raise ValueError(f"beta: must be >= 0, got {beta}")
        self.beta = float(beta)
        self.Sigma_inv = np.linalg.inv(self.Sigma)

    def bonus(self, G: np.ndarray) -> np.ndarray:
        """β ‖Σ_{x,a,a'} G φ‖_{Σ^{-1}} for G [S, X, n, n] (G = ρ π1 π2ᵀ gives the bonus of (π1, π2))."""
        v = np.einsum("sxab,xabd->sd", G, self.phi)
        return self.beta * np.sqrt(np.maximum(np.einsum("sd,de,se->s", v, self.Sigma_inv, v), 0.0))

    def lmo(self, G: np.ndarray) -> np.ndarray:
        v = np.einsum("sxab,xabd->sd", G, self.phi)
        w = v @ self.Sigma_inv
        norm = np.sqrt(np.maximum(np.einsum("sd,sd->s", v, w), 0.0))
        delta = -self.beta * w / np.where(norm > 0, norm, 1.0)[:, None]
        delta[norm == 0] = 0.0
        return np.einsum("xabd,sd->sxab", self.phi, delta)


# ----------------------------------------------------------------------------------------------------------
# The pessimistic max-min problem.


class PessimisticResult(NamedTuple):
    pi: np.ndarray          # the max player π̂1 [X, n]
    value: float            # f(π̂1): the pessimistic (lower-bound) value of J(π̂1, †)
    upper: float            # the cutting-plane upper bound on max f
    iterations: int
    adversary_pi2: np.ndarray  # the minimising opponent at π̂1 [X, n]
    adversary_P: np.ndarray    # the minimising preference P̂ + Δ at π̂1 [X, n, n]


def _kl_rows(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _inner_oracle(uset, pi1, log_mu, tau, rho, extra_starts=None, iters: int = 300, tol: float = 1e-14):
    """min over (Δ ∈ C, π2) of E_ρ[π1ᵀ(P̂+Δ)π2 + τKL(π2‖μ)] by alternating exact minimisation, multi-start."""
    P0 = uset.center
    X, n, _ = P0.shape
    mu = np.exp(log_mu)
    starts = [_softmax(log_mu - np.einsum("xa,xab->xb", pi1, P0) / tau), mu, np.full((X, n), 1.0 / n)]
    for a in range(n):
        e = np.full((X, n), 0.1 / n)
        e[:, a] += 0.9
        starts.append(e)
    if extra_starts is not None:
        starts.extend(extra_starts)
    pi2 = np.stack(starts)  # [S, X, n]
    w1 = rho[:, None] * pi1
    prev = np.inf
    for _ in range(iters):
        Delta = uset.lmo(w1[None, :, :, None] * pi2[:, :, None, :])
        Pk = P0[None] + Delta
        resp = np.einsum("xa,sxab->sxb", pi1, Pk)
        pi2 = _softmax(log_mu[None] - resp / tau)
        Delta = uset.lmo(w1[None, :, :, None] * pi2[:, :, None, :])
        Pk = P0[None] + Delta
        vals = (np.einsum("xa,sxab,sxb->sx", pi1, Pk, pi2) + tau * _kl_rows(pi2, mu[None])) @ rho
        if np.max(np.abs(vals - prev)) <= tol * max(1.0, np.max(np.abs(vals))):
            break
        prev = vals
    s = int(np.argmin(vals))
    return float(vals[s]), Pk[s], pi2[s]


def _curved_cut(Pk, pi1, log_mu, tau, rho):
    """F_k(π1) = min_π2 E_ρ[π1ᵀP_kπ2 + τKL(π2‖μ)] = −τ Σ_x ρ_x log Σ_b μ_b exp(−(P_kᵀπ1)_b/τ) and its
    gradient ρ_x (P_k π2_k)(x, a), π2_k the softmin response. Pk [K, X, n, n]."""
    z = log_mu[None] - np.einsum("xa,kxab->kxb", pi1, Pk) / tau
    m = z.max(-1)
    lse = m + np.log(np.exp(z - m[..., None]).sum(-1))
    pi2 = np.exp(z - lse[..., None])
    return -tau * (lse @ rho), rho[None, :, None] * np.einsum("kxab,kxb->kxa", Pk, pi2)


def _solve_master(Pks, log_mu, tau, rho, pi_start):
    """max_{π1, t} t − τ KL_ρ(π1‖μ) s.t. t ≤ F_k(π1) for every stored adversary P_k (SLSQP on logits with
    the first logit of each context fixed at 0). Returns (π1, master value)."""
    X, n = log_mu.shape
    Pks = np.stack(Pks)

    def unpack(v):
        z = np.concatenate([np.zeros((X, 1)), v[:-1].reshape(X, n - 1)], axis=1)
        return _softmax(z), v[-1]

    def chain(pi, g):  # gradient wrt the free logits of a function with gradient g wrt π [.., X, n]
        return (pi * (g - np.sum(pi * g, -1, keepdims=True)))[..., 1:].reshape(g.shape[:-2] + (-1,))

    def obj(v):
        pi, t = unpack(v)
        kl = rho @ _kl_rows(pi, np.exp(log_mu))
        g = tau * rho[:, None] * (np.log(np.maximum(pi, 1e-300)) - log_mu + 1.0)
        return -(t - tau * kl), np.append(chain(pi, g), -1.0)

    def cons(v):
        pi, t = unpack(v)
        F, _ = _curved_cut(Pks, pi, log_mu, tau, rho)
        return F - t

    def cons_jac(v):
        pi, _ = unpack(v)
        _, G = _curved_cut(Pks, pi, log_mu, tau, rho)
        return np.hstack([chain(pi, G), -np.ones((Pks.shape[0], 1))])

    z0 = np.log(np.maximum(pi_start, 1e-300))
    z0 = (z0 - z0[:, :1])[:, 1:].reshape(-1)
    pi0 = unpack(np.append(z0, 0.0))[0]
    t0 = float(_curved_cut(Pks, pi0, log_mu, tau, rho)[0].min())
    res = optimize.minimize(obj, np.append(z0, t0), jac=True, method="SLSQP",
                            constraints=[{"type": "ineq", "fun": cons, "jac": cons_jac}],
                            options={"ftol": 1e-15, "maxiter": 500})
    pi, _ = unpack(res.x)
    F, _ = _curved_cut(Pks, pi, log_mu, tau, rho)
    model = float(F.min() - tau * rho @ _kl_rows(pi, np.exp(log_mu)))
    return pi, max(model, -float(res.fun))


def pessimistic_equilibrium(uset, mu, tau: float, rho=None, tol: float = 1e-12, max_iter: int = 100,
                            pi_init=None) -> PessimisticResult:
    """argmax_π1 min_{Δ∈C, π2} J_{P̂+Δ}(π1, π2) for an uncertainty set C (`VersionSpace` or `BonusSet`).

    Cutting planes with curved cuts: every oracle call at π1_t returns the minimising adversary P_t = P̂ + Δ_t,
    and F_t(π1) = min_π2 J_{P_t}(π1, π2) + τKL(π1) (closed form) is an upper model of the pessimistic
    objective that is tight at π1_t; the master maximises min_t F_t(π1) − τKL(π1). Stops when the master
    value (an upper bound on max f up to the master's accuracy) and the best evaluated f agree to `tol`.
    """
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"tau: pessimistic estimators need tau > 0, got {tau}")
    P0 = uset.center
    X, n, _ = P0.shape
    mu = np.broadcast_to(np.atleast_2d(np.asarray(mu, dtype=np.float64)), (X, n))
    log_mu = np.log(mu)
    rho = np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=np.float64).reshape(-1)
    pi1 = games.nash_equilibrium(np.clip(P0, 0, 1), mu, tau, rho) if pi_init is None else pi_init
    pi1 = np.broadcast_to(np.atleast_2d(pi1), (X, n)).copy()
    Pks, recent = [], []
    best = (-np.inf, pi1, None, None)
    upper = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        val, Pk, pi2 = _inner_oracle(uset, pi1, log_mu, tau, rho, extra_starts=recent)
        recent = ([pi2] + recent)[:4]
        f = val - tau * float(rho @ _kl_rows(pi1, mu))
        if f > best[0]:
            best = (f, pi1, pi2, Pk)
        Pks.append(Pk)
        pi1, upper = _solve_master(Pks, log_mu, tau, rho, best[1])
        if upper - best[0] <= tol * max(1.0, abs(upper)):
            break
    f, pi, pi2, Pk = best
    return PessimisticResult(pi, f, upper, it, pi2, Pk)


# ----------------------------------------------------------------------------------------------------------
# The three offline methods.


def default_beta(method: str, num_params: int, delta: float = 0.1) -> float:
    """Confidence radius [derived]: an asymptotic (1 − δ) chi-square ellipsoid with p(1 − p) ≤ ¼.

    Version space: Σ_k N_k (p̂_k − p_k)² ≈ Σ_k p_k(1−p_k) χ²_1 ≤ ¼ χ²_K, so β²/2 = ¼ χ²_K(1−δ).
    Bonus: the same ellipsoid in P-units, β² = ¼ χ²_d(1−δ) (for the tabular features the two sets coincide up
    to λ and the box).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta: must lie in (0, 1), got {delta}")
    q = float(stats.chi2.ppf(1 - delta, max(int(num_params), 1)))
    if method == "version_space":
        return float(np.sqrt(0.5 * q))
    if method == "bonus":
        return float(0.5 * np.sqrt(q))
    raise ValueError(f"method: no confidence radius for {method!r}")


def plugin_policy(P_hat, mu, tau, rho=None) -> np.ndarray:
    """(c) Greedy plug-in: the exact equilibrium of the fitted game, [X, n]."""
    P_hat = np.asarray(P_hat, dtype=np.float64)
    P_hat = P_hat[None] if P_hat.ndim == 2 else P_hat
    mu = np.broadcast_to(np.atleast_2d(mu), P_hat.shape[:2])
    return games.nash_equilibrium(P_hat, mu, tau, rho)


METHODS = ("plugin", "plugin_linear", "version_space", "bonus")


def offline_policy(method: str, data: Dataset, mu, tau: float, rho=None, *, beta=None, delta: float = 0.1,
                   features=None, ridge: float = 1e-6, design_lambda: float = 1.0, tol: float = 1e-12) -> np.ndarray:
    """The max player π̂1 [X, n] of one offline method fitted on `data`.

    method: "plugin" (tabular MLE + exact NE), "plugin_linear" (logistic MLE on `features` + exact NE),
    "version_space" (tabular, (a)), "bonus" (linear class on `features`, (b)). features default to the
    tabular one-hot features; beta defaults to `default_beta(method, ·, delta)`; tol is the optimality
    tolerance (relative, in value) of the pessimistic solver.
    """
    X, n = data.num_contexts, data.num_actions
    if method == "plugin":
        return plugin_policy(TabularClass(X, n).fit(data).P_hat, mu, tau, rho)
    if method == "version_space":
        fit = TabularClass(X, n).fit(data)
        K = int(np.count_nonzero(fit.N[_pairs(X, n)]))
        b = default_beta(method, K, delta) if beta is None else float(beta)
        return pessimistic_equilibrium(VersionSpace(fit.P_hat, fit.N, b), mu, tau, rho, tol=tol).pi
    if method in ("plugin_linear", "bonus"):
        phi = tabular_features(X, n) if features is None else features
        cls = LinearClass(phi, ridge=ridge, design_lambda=design_lambda)
        fit = cls.fit(data)
        if method == "plugin_linear":
            return plugin_policy(fit.P_hat, mu, tau, rho)
        b = default_beta(method, cls.dim, delta) if beta is None else float(beta)
        return pessimistic_equilibrium(BonusSet(fit.P_hat, cls.phi, fit.Sigma, b), mu, tau, rho, tol=tol).pi
    raise ValueError(f"method: unknown offline method {method!r}; known: {list(METHODS)}")
