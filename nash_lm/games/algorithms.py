"""Every tabular NLHF algorithm as a pure step function behind one interface, iterated with `lax.scan`.

An algorithm is an `Algorithm(init, step, hyper)`: `init(g, hyper) -> state` and
`step(state, t, g, hyper) -> state`, where `g` holds the game as float64 JAX arrays (`A` = P − ½ [X, n, n],
`log_mu` [X, n], `tau`) and every state carries the current log-policy under the key "logp" [X, n]. Updates are
written in log space; `normalize` subtracts the log-partition function per context. With b = ητ:

    nash_md         log π_{t+1} = log π_t^μ + η (A π_t^μ)          π_t^μ ∝ π_t^{1−b} μ^b, η_t = 2/(τ(t+2))
    nash_md_const   the same with a constant η (biased: its mixture solves the game at τ/(1−ητ))
    omd             log π_{t+1} = (1−b) log π_t + b log μ + η (A π_t)          (Munos et al.'s OMD)
    inpo            OMD in INPO's parametrisation: inverse step eta_inv = 1/η
    extragradient   half step from π_t with A π_t, full step from π_t with A π_{t+½}         (EGPO / mirror prox)
    optimistic      π̄_{t+1} from π_t with A π̄_t, π_{t+1} from π_t with A π̄_{t+1}         (ONPO / OMWU)
    mpo             magnetic mirror descent towards a magnet (initially μ) reset every `reset_every` steps
    mwu             log π_{t+1} = log π_t + η (A π_t), no μ              (idealised SPPO / DNO)
    fictitious_play π_{t+1} = π_t + (BR_τ(π_t) − π_t)/(t+2), BR_τ(π) ∝ μ exp(Aπ/τ) (argmax when τ = 0)
    nash_md_pg      gradient ascent on logits θ along the exact expectation of the Nash-MD-PG estimator, i.e.
                    ∇θ [π_θᵀ P π' − τ KL(π_θ‖μ)] with π' = sg(π_θ^{1−β} μ^β) normalised (β = 0: self-play)
    online_ipo      gradient descent on θ along the exact expected online-IPO loss on pairs from sg(π_θ)
    ipo_md          the same on pairs from the geometric mixture sg(π_θ^{1−β} μ^β)

`run` scans `steps` updates from π_0 = μ (or `pi0`) and records, for every iterate π_1..π_T, the KL(π*_τ‖π_t)
to the exact equilibrium, the duality gap of the last iterate and of the running average (1/t) Σ_{s≤t} π_s.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm.games import core

# ----------------------------------------------------------------------------------------------------------
# Shared pieces.


class Arrays(NamedTuple):
    A: jax.Array
    log_mu: jax.Array
    tau: jax.Array


def normalize(logits):
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def adv(g: Arrays, logp):
    """(A π) for π = exp(logp): the advantage of each action against π, per context."""
    return core.payoff_vector(g.A, jnp.exp(logp))


def md_update(g: Arrays, logp, eta, opponent_logp, anchor_weight=None):
    """One mirror-descent step: (1−ητ) log π + ητ log μ + η (A π_opponent), normalised."""
    b = eta * g.tau if anchor_weight is None else anchor_weight
    return normalize((1.0 - b) * logp + b * g.log_mu + eta * adv(g, opponent_logp))


def mixture(g: Arrays, logp, beta):
    """The normalised geometric mixture π^{1−β} μ^β (log space)."""
    return normalize((1.0 - beta) * logp + beta * g.log_mu)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    init: Callable[[Arrays, dict], dict]
    step: Callable[[dict, Any, Arrays, dict], dict]
    defaults: dict  # hyper-parameters and their defaults
    check: Callable[[float, dict], None] = lambda tau, h: None  # raises ValueError for invalid hypers


def _init_logp(g, h):
    return {"logp": h["logp0"]}


# ----------------------------------------------------------------------------------------------------------
# Mirror-descent family.


def _nash_md_step(state, t, g, h):
    eta = 2.0 / (g.tau * (t + 2.0)) if h["eta"] is None else h["eta"]
    b = eta * g.tau
    log_mix = mixture(g, state["logp"], b)
    return {"logp": normalize(log_mix + eta * adv(g, log_mix))}


def _check_nash_md(tau, h):
    if h["eta"] is None and tau <= 0:
        raise ValueError("tau: Nash-MD's schedule eta_t = 2/(tau (t+2)) needs tau > 0")
    if h["eta"] is not None and not 0 < h["eta"] * tau <= 1:
        raise ValueError(f"eta: need 0 < eta*tau <= 1 for the geometric mixture, got eta*tau = {h['eta'] * tau}")


def _omd_step(state, t, g, h):
    eta = h["eta"] if h.get("eta_inv") is None else 1.0 / h["eta_inv"]
    return {"logp": md_update(g, state["logp"], eta, state["logp"])}


def _extragradient_step(state, t, g, h):
    logp = state["logp"]
    half = md_update(g, logp, h["eta"], logp)
    return {"logp": md_update(g, logp, h["eta"], half)}


def _optimistic_init(g, h):
    return {"logp": h["logp0"], "pred": h["logp0"]}


def _optimistic_step(state, t, g, h):
    logp = state["logp"]
    pred = md_update(g, logp, h["eta"], state["pred"])
    return {"logp": md_update(g, logp, h["eta"], pred), "pred": pred}


def _mpo_init(g, h):
    return {"logp": h["logp0"], "magnet": g.log_mu}


def _mpo_step(state, t, g, h):
    eta, alpha = h["eta"], h["alpha"]
    logp = state["logp"]
    logp = normalize((logp + eta * alpha * state["magnet"] + eta * adv(g, logp)) / (1.0 + eta * alpha))
    reset = (t + 1) % h["reset_every"] == 0
    return {"logp": logp, "magnet": jnp.where(reset, logp, state["magnet"])}


def _mwu_step(state, t, g, h):
    return {"logp": md_update(g, state["logp"], h["eta"], state["logp"], anchor_weight=0.0)}


def _fictitious_play_step(state, t, g, h):
    logp = state["logp"]
    v = adv(g, logp)
    argmax = (v >= v.max(-1, keepdims=True) - 1e-12).astype(v.dtype)
    safe_tau = jnp.where(g.tau > 0, g.tau, 1.0)
    br = jnp.where(g.tau > 0, jax.nn.softmax(g.log_mu + v / safe_tau, axis=-1),
                   argmax / argmax.sum(-1, keepdims=True))
    pi = jnp.exp(logp)
    return {"logp": jnp.log(pi + (br - pi) / (t + 2.0))}


# ----------------------------------------------------------------------------------------------------------
# Exact expected-gradient flows on softmax logits θ (the tabular limit of the deep estimators).


def _flow_init(g, h):
    return {"logp": h["logp0"], "theta": h["logp0"]}


def _regularized_objective(theta, opponent, g):
    """Σ_x π_θᵀ A π' − τ KL(π_θ‖μ) with the opponent π' held fixed: the expectation of the Nash-MD-PG surrogate."""
    pi = jax.nn.softmax(theta, axis=-1)
    return jnp.sum(core.payoff_vector(g.A, opponent) * pi) - g.tau * jnp.sum(core.kl(pi, jnp.exp(g.log_mu)))


def _nash_md_pg_step(state, t, g, h):
    theta = state["theta"]
    opponent = jax.lax.stop_gradient(jnp.exp(mixture(g, normalize(theta), h["beta"])))
    theta = theta + h["lr"] * jax.grad(_regularized_objective)(theta, opponent, g)
    return {"logp": normalize(theta), "theta": theta}


def _ipo_loss(theta, log_sampler, g):
    """Exact expected online-IPO loss with soft labels: pairs y, y' ~ sampler, target 1/(2τ).

    E_{y,y'} [ p(y≻y') (h(y,y') − 1/(2τ))² + p(y'≻y) (h(y',y) − 1/(2τ))² ],  h(y,y') = log π(y)/μ(y) − log π(y')/μ(y').
    """
    d = normalize(theta) - g.log_mu
    h = d[..., :, None] - d[..., None, :]
    p = g.A + 0.5
    w = jnp.exp(log_sampler)
    pair = w[..., :, None] * w[..., None, :]
    c = 0.5 / g.tau
    per = p * (h - c) ** 2 + jnp.swapaxes(p, -1, -2) * (-h - c) ** 2
    return jnp.sum(pair * per)


def _ipo_md_step(state, t, g, h):
    theta = state["theta"]
    sampler = jax.lax.stop_gradient(mixture(g, normalize(theta), h["beta"]))
    theta = theta - h["lr"] * jax.grad(_ipo_loss)(theta, sampler, g)
    return {"logp": normalize(theta), "theta": theta}


def _positive(*names):
    def check(tau, h):
        for name in names:
            if not (h[name] is not None and h[name] > 0):
                raise ValueError(f"{name}: must be > 0, got {h[name]!r}")
    return check


def _needs_tau_and(*names):
    def check(tau, h):
        if tau <= 0:
            raise ValueError("tau: this algorithm regularises towards mu and needs tau > 0")
        _positive(*names)(tau, h)
    return check


def _beta_and_lr(tau, h):
    if not 0.0 <= h["beta"] <= 1.0:
        raise ValueError(f"beta: must lie in [0, 1], got {h['beta']}")
    _needs_tau_and("lr")(tau, h)


ALGORITHMS: dict[str, Algorithm] = {
    "nash_md": Algorithm(_init_logp, _nash_md_step, {"eta": None}, _check_nash_md),
    "nash_md_const": Algorithm(_init_logp, _nash_md_step, {"eta": 1.0}, _check_nash_md),
    "omd": Algorithm(_init_logp, _omd_step, {"eta": 0.05}, _needs_tau_and("eta")),
    "inpo": Algorithm(_init_logp, _omd_step, {"eta_inv": 20.0}, _needs_tau_and("eta_inv")),
    "extragradient": Algorithm(_init_logp, _extragradient_step, {"eta": 1.0}, _needs_tau_and("eta")),
    "optimistic": Algorithm(_optimistic_init, _optimistic_step, {"eta": 1.0}, _needs_tau_and("eta")),
    "mpo": Algorithm(_mpo_init, _mpo_step, {"eta": 1.0, "alpha": 0.1, "reset_every": 100},
                     _positive("eta", "alpha", "reset_every")),
    "mwu": Algorithm(_init_logp, _mwu_step, {"eta": 0.1}, _positive("eta")),
    "fictitious_play": Algorithm(_init_logp, _fictitious_play_step, {}),
    "nash_md_pg": Algorithm(_flow_init, _nash_md_pg_step, {"beta": 0.125, "lr": 1.0}, _beta_and_lr),
    "online_ipo": Algorithm(_flow_init, _ipo_md_step, {"beta": 0.0, "lr": 0.01}, _beta_and_lr),
    "ipo_md": Algorithm(_flow_init, _ipo_md_step, {"beta": 0.125, "lr": 0.01}, _beta_and_lr),
}


# ----------------------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class RunResult:
    """What `run` returns. Policies have the caller's shape ([n] or [X, n]); metric arrays have length `steps`,
    entry t describing the iterate π_{t+1}."""

    name: str
    hyper: dict
    policy: np.ndarray  # the last iterate π_T
    average: np.ndarray  # (1/T) Σ_{t=1..T} π_t
    nash: np.ndarray  # π*_τ (an LP equilibrium when τ = 0)
    metrics: dict  # "kl_to_nash", "gap_last", "gap_avg": arrays of shape [steps]
    iterates: np.ndarray | None  # [steps, (X,) n] when keep_iterates


def resolve(name, tau, hyper):
    if name not in ALGORITHMS:
        raise ValueError(f"name: unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    algo = ALGORITHMS[name]
    unknown = set(hyper) - set(algo.defaults) - {"pi0", "keep_iterates", "rho"}
    if unknown:
        raise ValueError(f"hyper: unknown hyper-parameters {sorted(unknown)} for {name!r}; "
                         f"known: {sorted(algo.defaults)}")
    h = {**algo.defaults, **{k: v for k, v in hyper.items() if k in algo.defaults}}
    algo.check(tau, h)
    return algo, h


@functools.partial(jax.jit, static_argnames=("name", "steps", "keep", "static_hyper"))
def _scan(name, steps, keep, static_hyper, dyn_hyper, g, pi_star, rho, logp0):
    algo = ALGORITHMS[name]
    h = {**dict(static_hyper), **dyn_hyper, "logp0": logp0}
    mu = jnp.exp(g.log_mu)

    def gap(pi):
        return jnp.dot(rho, core.gap_per_context(g.A, mu, g.tau, pi))

    def body(carry, t):
        state, total = carry
        state = algo.step(state, t, g, h)
        pi = jnp.exp(state["logp"])
        total = total + pi
        avg = total / (t + 1.0)
        out = {"kl_to_nash": jnp.dot(rho, core.kl(pi_star, pi)), "gap_last": gap(pi), "gap_avg": gap(avg)}
        return (state, total), (out, pi if keep else None)

    state0 = algo.init(g, h)
    (state, total), (metrics, iterates) = jax.lax.scan(
        body, (state0, jnp.zeros_like(logp0)), jnp.arange(steps, dtype=logp0.dtype))
    return jnp.exp(state["logp"]), total / steps, metrics, iterates


def run(name: str, P, mu, tau, steps: int, **hyper) -> RunResult:
    """Runs algorithm `name` for `steps` updates from π_0 = μ (or `pi0=`) on the game (P, μ, τ).

    Hyper-parameters are the algorithm's own (see `ALGORITHMS[name].defaults`), plus `rho` (context weights),
    `pi0` (initial policy) and `keep_iterates` (default True: return every iterate).
    """
    game = core.check_game(P, mu, tau, hyper.get("rho"))
    algo, h = resolve(name, game.tau, hyper)
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    pi0 = game.mu if hyper.get("pi0") is None else core.check_policy(game, hyper["pi0"], "pi0")
    if game.tau > 0 and pi0.min() <= 0:
        raise ValueError("pi0: must have full support")
    pi_star = core.solve(game)
    keep = bool(hyper.get("keep_iterates", True))
    static = tuple(sorted((k, v) for k, v in h.items() if isinstance(v, int) and not isinstance(v, bool)
                          or v is None))
    dyn = {k: v for k, v in h.items() if (k, v) not in static}
    with jax.enable_x64(True):
        g = Arrays(jnp.asarray(game.A), jnp.log(jnp.asarray(game.mu)), jnp.asarray(game.tau, jnp.float64))
        policy, average, metrics, iterates = _scan(
            name, int(steps), keep, static, {k: jnp.asarray(v, jnp.float64) for k, v in dyn.items()}, g,
            jnp.asarray(pi_star), jnp.asarray(game.rho), jnp.log(jnp.asarray(pi0)))
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        policy, average = np.asarray(policy), np.asarray(average)
        iterates = None if iterates is None else np.asarray(iterates)
    if game.squeeze and iterates is not None:
        iterates = iterates[:, 0]
    return RunResult(name, h, game.unbatch(policy), game.unbatch(average), game.unbatch(pi_star), metrics,
                     iterates)
