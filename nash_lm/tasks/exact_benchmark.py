"""The exact benchmark (job `exact_benchmark`, `configs/exact_benchmark.py`): Nash learning vs RLHF on token games
whose every number is exact, because the response space Y = V^L is enumerated.

    python -m nash_lm.main --config=configs/exact_benchmark.py --workdir=DIR

A *cell* is (size, preference structure, seed, tau). Each builds a game on sequences with a random autoregressive
reference mu (`token_game.reference_table`) and one of the preference structures:

    persona_orders  K personas, each a random total order of the responses; P = the share preferring y
    persona_bt      K personas, each a Bradley-Terry model with random scores; P = their mean
    bradley_terry   one Bradley-Terry model (where RLHF is consistent)
    rps, dice       the lifted rock-paper-scissors / non-transitive dice (`token_game.lift`, action = token sum)
    random          EGPO-style random P on the sequences

and trains on it (all exact, float64):

- every algorithm of the tabular registry `nash_lm.games.algorithms.ALGORITHMS` (entries added there appear in
  the grid by themselves; `config.hyper.<name>` sets hyper-parameters, `config.exclude` drops names), on the full
  policy class over sequences;
- `nash_md_pg_token`: the exact expected Nash-MD-PG update of a language-model policy, i.e. gradient ascent on the
  per-prefix next-token logits of pi_theta along grad [pi_theta^T P pi' - tau KL(pi_theta || mu)] with the opponent
  pi' the one-step-at-a-time (token-level) mixture of pi_theta and mu that the sampler draws from;
- the algorithms listed in `config.beta_curve.algorithms` at every beta of `config.beta_curve.betas`;
- RLHF by its exact counterpart (`rlhf_exact[c=k tau]`: the Bradley-Terry projection r of P under mu x mu, then
  pi = mu exp(r/c)) and by its standard route (`rlhf_pairs[c=k tau]`: `rlhf.n_pairs` pairs from mu labelled by
  Bernoulli(P), a tabular Bradley-Terry reward model fitted by maximum likelihood with an L2 penalty
  `rlhf.l2`, then the exact maximiser of the KL-regularised objective the policy gradient ascends,
  pi = mu exp(r/c)), for c = k tau over `rlhf.c_over_tau`;
- offline IPO on the same pairs (`ipo_pairs[c=k tau]`: `population.ipo_fit` of the sampled win counts with IPO's
  tau = c) and its population counterpart (`ipo_exact[c=k tau]`: the same fit on mu x mu weighted by P, i.e.
  pi ∝ mu exp(P(y > mu)/c)); DPO on the same pairs is `rlhf_pairs` (on a tabular policy DPO's minimiser is the
  standard route's pi ∝ mu exp(r/c) with DPO's beta = c and the same L2 penalty on the implicit reward);
- (small sizes) the exact stationary points of Nash-MD-PG with the sequence- and with the token-level mixture
  (`stationary_point`) at every beta: the equilibrium each mixture leads to.

Each cell reports, per policy, the exact duality gap of the tau-regularised game, the unregularised one, KL(pi*||pi)
and KL(pi||mu), and the exact head-to-head P(pi > pi') between every two policies (pi* and mu included). Cells are
written to DIR/cells/<key>.json as they finish (a rerun skips finished cells: the job resumes) and gathered into
DIR/exact_benchmark.json with the game's defining data (mu, tau, persona orders or scores, Bradley-Terry scores,
the lift; P itself where `store_P_max` allows) and every policy's exact sequence distribution per prompt, so that
every number can be recomputed from that file alone; DIR/report.md holds the tables and DIR/*.png the figures.
`config.results_dir` (if set) receives exact_benchmark.json.gz, exact_report.md and exact_summary.json, and
`config.figures_dir` (if set) the figures as exact_<name>.png.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import distributed, games
from nash_lm.games import algorithms as galg
from nash_lm.games import core, population
from nash_lm.tasks import token_game as tg

STRUCTURES = ("persona_orders", "persona_bt", "bradley_terry", "rps", "dice", "random")
TOKEN_PG = "nash_md_pg_token"


# ----------------------------------------------------------------------------------------------------------
# Games


def build_game(structure: str, V: int, L: int, contexts: int, seed: int, *, personas: int = 5,
               persona_scale: float = 2.0, bt_scale: float = 1.0, mu_scale: float = 1.0):
    """(P [X, N, N], mu [X, N], mu_table [X, n_prefixes, V] log-probs, definition): the game of one cell.

    `definition` is what P follows from, in JSON-ready form (see `preference_from_definition`).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure: unknown {structure!r}; known: {list(STRUCTURES)}")
    N = V ** L
    table = tg.reference_table(V, L, contexts, mu_scale, seed)
    mu = np.exp(tg.sequence_logprobs(table, V, L))
    rng = np.random.default_rng([seed, 25, STRUCTURES.index(structure)])
    if structure in ("persona_orders", "persona_bt"):
        scores = rng.normal(size=(contexts, personas, N))
        if structure == "persona_orders":  # a total order is its rank vector (0 = worst)
            ranks = np.argsort(np.argsort(scores, -1), -1)
            definition = {"kind": "persona_orders", "ranks": ranks.tolist()}
        else:
            definition = {"kind": "persona_bt", "scores": scores.tolist(), "scale": persona_scale}
    elif structure == "bradley_terry":
        definition = {"kind": "bradley_terry", "scores": (bt_scale * rng.normal(size=(contexts, N))).tolist()}
    elif structure == "random":
        g = games.instances.random_game(N, contexts, seed=seed)
        definition = {"kind": "random", "P": np.broadcast_to(g.P, (contexts, N, N)).tolist()}
    else:
        lifted = tg.lift(structure, V, L, contexts=contexts, mapping="sum", mu_scale=mu_scale, seed=seed)
        base = games.instances.make(structure).P
        definition = {"kind": "lift", "instance": structure, "P_game": base.tolist(),
                      "actions": lifted.actions.tolist()}
    return preference_from_definition(definition), mu, table, definition


def preference_from_definition(d: dict) -> np.ndarray:
    """P [X, N, N] from a cell's stored definition."""
    if d["kind"] == "persona_orders":
        return np.stack([population.persona_preference(r, "order") for r in np.asarray(d["ranks"], np.float64)])
    if d["kind"] == "persona_bt":
        return np.stack([population.persona_preference(s, "bt", d["scale"]) for s in np.asarray(d["scores"])])
    if d["kind"] == "bradley_terry":
        return np.stack([population.bradley_terry_preference(s) for s in np.asarray(d["scores"])])
    if d["kind"] == "random":
        return np.asarray(d["P"], np.float64)
    if d["kind"] == "lift":
        Pg = np.asarray(d["P_game"], np.float64)
        return np.stack([Pg[np.ix_(a, a)] for a in np.asarray(d["actions"])])
    raise ValueError(f"definition.kind: unknown {d['kind']!r}")


# ----------------------------------------------------------------------------------------------------------
# Training


@functools.partial(jax.jit, static_argnames=("name", "steps", "static_hyper"))
def _train_registry(name, steps, static_hyper, dyn_hyper, g, logp0):
    algo = galg.ALGORITHMS[name]
    h = {**dict(static_hyper), **dyn_hyper, "logp0": logp0}

    def body(carry, t):
        state, total = carry
        state = algo.step(state, t, g, h)
        return (state, total + jnp.exp(state["logp"])), None

    (state, total), _ = jax.lax.scan(body, (algo.init(g, h), jnp.zeros_like(logp0)),
                                     jnp.arange(steps, dtype=logp0.dtype))
    return jnp.exp(state["logp"]), total / steps


def train_registry(name: str, A, mu, tau: float, steps: int, hyper: dict):
    """Last and average iterate [X, N] of registry algorithm `name` after `steps` updates from mu."""
    _, h = galg.resolve(name, tau, hyper)
    static = tuple(sorted((k, v) for k, v in h.items()
                          if v is None or (isinstance(v, int) and not isinstance(v, bool))))
    with jax.enable_x64(True):
        dyn = {k: jnp.asarray(v, jnp.float64) for k, v in h.items() if (k, v) not in static}
        g = galg.Arrays(jnp.asarray(A), jnp.log(jnp.asarray(mu)), jnp.asarray(tau, jnp.float64))
        last, avg = _train_registry(name, int(steps), static, dyn, g, jnp.log(jnp.asarray(mu)))
        return np.asarray(last), np.asarray(avg), h


@functools.partial(jax.jit, static_argnames=("steps",))
def _train_token_pg(steps, A, log_mu_table, tau, beta, lr, seqs, rows):
    def seq_logp(log_table):  # [X, R, V] normalised -> [X, N]
        return log_table[:, rows, seqs].sum(-1)

    log_mu = seq_logp(log_mu_table)

    def objective(theta, opponent):
        lp = seq_logp(jax.nn.log_softmax(theta, -1))
        pi = jnp.exp(lp)
        return jnp.sum(core.payoff_vector(A, opponent) * pi) - tau * jnp.sum(pi * (lp - log_mu))

    def body(theta, _):
        mix = jax.nn.log_softmax((1.0 - beta) * jax.nn.log_softmax(theta, -1) + beta * log_mu_table, -1)
        opponent = jax.lax.stop_gradient(jnp.exp(seq_logp(mix)))
        return theta + lr * jax.grad(objective)(theta, opponent), None

    theta, _ = jax.lax.scan(body, log_mu_table, None, length=steps)
    return jax.nn.log_softmax(theta, -1)


def train_token_pg(A, mu_table, V: int, L: int, tau: float, steps: int, beta: float, lr: float):
    """Exact expected Nash-MD-PG on per-prefix logits with the token-level mixture opponent, from mu.

    Returns (pi [X, N], the policy's per-prefix log-prob table [X, n_prefixes, V]).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: must lie in [0, 1], got {beta}")
    with jax.enable_x64(True):
        table = _train_token_pg(int(steps), jnp.asarray(A), jnp.asarray(mu_table), jnp.asarray(tau, jnp.float64),
                                jnp.asarray(beta, jnp.float64), jnp.asarray(lr, jnp.float64),
                                jnp.asarray(tg.all_sequences(V, L)), jnp.asarray(tg.prefix_rows(V, L)))
        table = np.asarray(table)
    return np.exp(tg.sequence_logprobs(table, V, L)), table


@functools.partial(jax.jit, static_argnames=("V", "L", "mixture", "max_iter"))
def _stationary(P, log_mu_table, tau, beta, damping, tol, seqs, rows, V, L, mixture, max_iter):
    X = P.shape[0]
    log_mu = log_mu_table[:, rows, seqs].sum(-1)

    def conditionals(logp):  # [X, N] -> per-prefix next-token log-probs [X, n_prefixes, V]
        parts = []
        for n in range(L):
            joint = jax.nn.logsumexp(logp.reshape(X, V ** n, V, V ** (L - n - 1)), axis=-1)
            parts.append(joint - jax.nn.logsumexp(joint, -1, keepdims=True))
        return jnp.concatenate(parts, axis=1)

    def opponent(logp):
        if mixture == "sequence":
            return jax.nn.log_softmax((1.0 - beta) * logp + beta * log_mu, -1)
        mix = jax.nn.log_softmax((1.0 - beta) * conditionals(logp) + beta * log_mu_table, -1)
        return mix[:, rows, seqs].sum(-1)

    def residual(logp):
        target = jax.nn.log_softmax(log_mu + jnp.einsum("xij,xj->xi", P, jnp.exp(opponent(logp))) / tau, -1)
        diff = target - logp
        return diff, jnp.max(jnp.abs(diff - diff.mean(-1, keepdims=True)))

    def body(carry):
        logp, _, it = carry
        diff, _ = residual(logp)
        logp = jax.nn.log_softmax(logp + damping * diff, -1)
        return logp, residual(logp)[1], it + 1

    res0 = residual(log_mu)[1]
    logp, res, it = jax.lax.while_loop(lambda c: (c[1] >= tol) & (c[2] < max_iter), body, (log_mu, res0, 0))
    return logp, jnp.exp(opponent(logp)), res, it


def stationary_point(P, mu_table, V: int, L: int, tau: float, beta: float, mixture: str, *, damping: float = 0.5,
                     tol: float = 1e-12, max_iter: int = 50_000) -> dict:
    """The stationary point of exact Nash-MD-PG on the full autoregressive class with the given opponent mixture
    (the same fixed point as `token_game.mixture_fixed_point`, iterated in one compiled loop): pi = BR_tau(pi')
    with pi' the sequence- or token-level mixture of pi and mu. Returns {'pi', 'opponent', 'residual',
    'iterations'}."""
    if mixture not in ("token", "sequence"):
        raise ValueError(f"mixture: must be 'token' or 'sequence', got {mixture!r}")
    with jax.enable_x64(True):
        f64 = lambda v: jnp.asarray(v, jnp.float64)
        logp, opp, res, it = _stationary(f64(P), f64(mu_table), f64(tau), f64(beta), f64(damping), f64(tol),
                                         jnp.asarray(tg.all_sequences(V, L)), jnp.asarray(tg.prefix_rows(V, L)),
                                         V, L, mixture, int(max_iter))
        return {"pi": np.exp(np.asarray(logp)), "opponent": np.asarray(opp), "residual": float(res),
                "iterations": int(it)}


# ----------------------------------------------------------------------------------------------------------
# Metrics


def policy_metrics(P, mu, tau: float, pi, pi_star) -> dict:
    """Exact duality gaps (tau-regularised and unregularised) and KLs of policy pi [X, N] (uniform rho)."""
    X = P.shape[0]
    with jax.enable_x64(True):
        A, m, p = jnp.asarray(P - 0.5), jnp.asarray(mu), jnp.asarray(pi)
        gap = float(jnp.mean(core.gap_per_context(A, m, tau, p)))
        gap0 = float(jnp.mean(core.gap_per_context(A, m, 0.0, p)))
    rho = np.full(X, 1.0 / X)
    return {"duality_gap": gap, "duality_gap_unregularised": gap0,
            "kl_pi_star_vs_pi": tg.kl(np.log(pi_star), np.log(pi), rho),
            "kl_pi_vs_mu": tg.kl(np.log(pi), np.log(mu), rho)}


def head_to_head(P, policies: list) -> np.ndarray:
    """H[a, b] = P(pi_a > pi_b) = mean_x pi_a(x)^T P(x) pi_b(x)."""
    Pi = np.stack(policies)  # [K, X, N]
    return np.mean([Pi[:, x] @ P[x] @ Pi[:, x].T for x in range(P.shape[0])], axis=0)


# ----------------------------------------------------------------------------------------------------------
# One cell


def _beta_name(name: str, beta: float) -> str:
    return f"{name}[beta={beta:g}]"


def run_cell(config, size: str, structure: str, seed: int, tau: float) -> dict:
    """Builds the game of one cell, trains every policy on it and evaluates them exactly (JSON-ready dict)."""
    sz = config.sizes[size]
    V, L, X = int(sz.V), int(sz.L), int(sz.contexts)
    N = V ** L
    t0 = time.time()
    P, mu, mu_table, definition = build_game(structure, V, L, X, seed, personas=int(config.personas),
                                             persona_scale=float(config.persona_scale),
                                             bt_scale=float(config.bt_scale), mu_scale=float(config.mu_scale))
    A = P - 0.5
    pi_star = np.atleast_2d(games.nash_equilibrium(P, mu, tau))
    steps = int(sz.steps)
    algos = list(sz.algorithms) if sz.algorithms else registry_names(config)
    betas = [float(b) for b in (sz.betas or config.beta_curve.betas)]
    policies, meta = {}, {}

    for name in algos:
        if name == TOKEN_PG:
            continue
        sweep = name in config.beta_curve.algorithms
        for beta in (betas if sweep else [None]):
            hyper = dict(config.hyper.get(name, {}))
            if beta is not None:
                hyper["beta"] = beta
            t = time.time()
            last, avg, h = train_registry(name, A, mu, tau, steps, hyper)
            key = _beta_name(name, beta) if beta is not None else name
            policies[key] = last
            meta[key] = {"algorithm": name, "hyper": dict(h), "steps": steps, "train_s": time.time() - t,
                         "gap_average_iterate": policy_metrics(P, mu, tau, avg, pi_star)["duality_gap"]}
    if TOKEN_PG in algos:
        lr = float(config.hyper.get(TOKEN_PG, {}).get("lr", 1.0))
        for beta in (betas if TOKEN_PG in config.beta_curve.algorithms else
                     [float(config.hyper.get(TOKEN_PG, {}).get("beta", 0.125))]):
            t = time.time()
            pi, table = train_token_pg(A, mu_table, V, L, tau, steps, beta, lr)
            key = _beta_name(TOKEN_PG, beta)
            policies[key] = pi
            meta[key] = {"algorithm": TOKEN_PG, "hyper": {"beta": beta, "lr": lr}, "steps": steps,
                         "train_s": time.time() - t}
            if 0 < beta < 1:
                meta[key]["mixture_gap"] = tg.mixture_gap(table, mu_table, beta, V, L)

    # RLHF: exact counterpart and the standard route, one reward each, a sweep of c
    rng = np.random.default_rng([seed, 25, 1000 + STRUCTURES.index(structure)])
    r_exact = np.stack([population.bt_projection(P[x], mu[x]) for x in range(X)])
    counts = [population.sample_pair_counts(P[x], mu[x], int(config.rlhf.n_pairs), rng) for x in range(X)]
    r_pairs = np.stack([population.bt_fit(c, float(config.rlhf.l2)) for c in counts])
    for k in config.rlhf.c_over_tau:
        c = float(k) * tau
        for route, r in (("rlhf_exact", r_exact), ("rlhf_pairs", r_pairs)):
            key = f"{route}[c={float(k):g}tau]"
            policies[key] = population.rlhf_policy(mu, r, c)
            meta[key] = {"algorithm": route, "hyper": {"c": c, "c_over_tau": float(k)}}
    # offline IPO: on the same sampled pairs, and on the population of pairs from mu weighted by P
    pop = [mu[x][:, None] * mu[x][None, :] * P[x] for x in range(X)]
    for k in config.rlhf.c_over_tau:
        c = float(k) * tau
        for route, counts_of in (("ipo_exact", pop), ("ipo_pairs", counts)):
            key = f"{route}[c={float(k):g}tau]"
            policies[key] = population.rlhf_policy(mu, np.stack([population.ipo_fit(C, c) for C in counts_of]), 1.0)
            meta[key] = {"algorithm": route, "hyper": {"c": c, "c_over_tau": float(k)}}
    rlhf_data = {"reward_exact": r_exact.tolist(), "reward_pairs": r_pairs.tolist(),
                 "n_pairs": int(config.rlhf.n_pairs), "l2": float(config.rlhf.l2)}

    # the equilibrium each mixture leads to (exact stationary points of Nash-MD-PG), small sizes only
    mixture = {}
    if sz.mixture_fixed_points:
        for beta in betas:
            row = {}
            for mix in ("token", "sequence"):
                fp = stationary_point(P, mu_table, V, L, tau, beta, mix, damping=float(config.fixed_point.damping),
                                      max_iter=int(config.fixed_point.max_iter))
                key = f"stationary_{mix}[beta={beta:g}]"
                policies[key] = fp["pi"]
                meta[key] = {"algorithm": f"stationary point, {mix}-level mixture", "hyper": {"beta": beta},
                             "residual": fp["residual"], "iterations": fp["iterations"]}
                row[mix] = key
            tok_table = tg.conditionals(np.log(policies[row["token"]]), V, L)
            row["kl_token_fp_vs_sequence_fp"] = tg.kl(np.log(policies[row["token"]]),
                                                      np.log(policies[row["sequence"]]))
            row["kl_sequence_fp_vs_token_fp"] = tg.kl(np.log(policies[row["sequence"]]),
                                                      np.log(policies[row["token"]]))
            row["mixture_gap_at_token_fp"] = tg.mixture_gap(tok_table, mu_table, beta, V, L)
            mixture[f"{beta:g}"] = row

    names = list(policies)
    out_policies = {}
    for key in names:
        out_policies[key] = {**meta[key], **policy_metrics(P, mu, tau, policies[key], pi_star),
                             "pi": policies[key].tolist()}
    H = head_to_head(P, [policies[k] for k in names] + [pi_star, mu])
    for i, key in enumerate(names):
        out_policies[key]["win_vs_pi_star"] = float(H[i, -2])
        out_policies[key]["win_vs_mu"] = float(H[i, -1])
    cell = {"size": size, "structure": structure, "seed": seed, "tau": tau, "V": V, "L": L, "contexts": X,
            "n_sequences": N,
            "game": {"mu": mu.tolist(), "mu_table": mu_table.tolist(), "preference": definition,
                     "P": P.tolist() if N <= int(config.store_P_max) and definition["kind"] != "random" else None,
                     "pi_star": pi_star.tolist()},
            "rlhf": rlhf_data, "policies": out_policies, "mixture": mixture,
            "head_to_head": {"names": names + ["pi_star", "mu"], "matrix": H.tolist()},
            "wall_s": time.time() - t0}
    rng_c = np.random.default_rng([seed, 25, 2000])
    sample = [rng_c.choice(N, size=min(N, int(config.cycle_sample)), replace=False) for _ in range(X)]
    cell["game"]["cycle_rate"] = {"sample": [s.tolist() for s in sample],
                                  "rate": float(np.mean([population.cycle_rate(P[x], sample[x]) for x in range(X)]))}
    return cell


def registry_names(config) -> list:
    """Every tabular registry algorithm not excluded, then the token-level Nash-MD-PG of a language model."""
    return [n for n in galg.ALGORITHMS if n not in config.exclude] + [TOKEN_PG]


# ----------------------------------------------------------------------------------------------------------
# The job


def validate(config) -> None:
    """Checks the config before anything runs (ValueError naming the field)."""
    for key, sz in config.sizes.items():
        for f in ("V", "L", "contexts", "steps"):
            if not isinstance(sz[f], int) or sz[f] < (2 if f == "V" else 1):
                low = 2 if f == "V" else 1
                raise ValueError(f"config.sizes.{key}.{f}: must be an integer >= {low}, got {sz[f]!r}")
        if sz.V ** sz.L > 10_000:
            raise ValueError(f"config.sizes.{key}: V**L = {sz.V ** sz.L} sequences is beyond the exact benchmark "
                             "(<= 10000)")
        for s in sz.structures:
            if s not in STRUCTURES:
                raise ValueError(f"config.sizes.{key}.structures: unknown {s!r}; known: {list(STRUCTURES)}")
        for a in sz.algorithms:
            if a not in galg.ALGORITHMS and a != TOKEN_PG:
                raise ValueError(f"config.sizes.{key}.algorithms: unknown {a!r}; known: "
                                 f"{sorted(galg.ALGORITHMS) + [TOKEN_PG]}")
        for t in sz.taus:
            if not float(t) > 0:
                raise ValueError(f"config.sizes.{key}.taus: every tau must be > 0, got {t}")
        if not sz.seeds:
            raise ValueError(f"config.sizes.{key}.seeds: empty")
        for name in (n for n in (list(sz.algorithms) or registry_names(config)) if n in galg.ALGORITHMS):
            for tau in sz.taus:  # every registry algorithm accepts its hyper-parameters at every tau of the grid
                try:
                    galg.resolve(name, float(tau), dict(config.hyper.get(name, {})))
                except ValueError as e:
                    raise ValueError(f"config.hyper.{name} (tau = {tau}): {e}") from None
    for b in config.beta_curve.betas:
        if not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"config.beta_curve.betas: must lie in [0, 1], got {b}")
    for k in config.rlhf.c_over_tau:
        if not float(k) > 0:
            raise ValueError(f"config.rlhf.c_over_tau: must be > 0, got {k}")
    if int(config.rlhf.n_pairs) < 1:
        raise ValueError(f"config.rlhf.n_pairs: must be >= 1, got {config.rlhf.n_pairs}")
    for name in config.hyper:
        if name not in galg.ALGORITHMS and name != TOKEN_PG:
            raise ValueError(f"config.hyper.{name}: unknown algorithm")
        if name in galg.ALGORITHMS:
            try:
                galg.resolve(name, 1.0, dict(config.hyper[name]))
            except ValueError as e:
                raise ValueError(f"config.hyper.{name}.{e}") from None
    if int(config.personas) < 1:
        raise ValueError(f"config.personas: must be >= 1, got {config.personas}")


def cell_keys(config) -> list:
    out = []
    for size, sz in config.sizes.items():
        for structure in sz.structures:
            for tau in sz.taus:
                for seed in sz.seeds:
                    out.append((size, structure, int(seed), float(tau)))
    return out


def _key(size, structure, seed, tau) -> str:
    return f"{size}-{structure}-tau{tau:g}-seed{seed}"


def _write_atomic(path: str, text: str) -> None:
    distributed.write_text(path, text)


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        distributed.write_bytes(dst, f.read())


def run(config, workdir: str) -> dict:
    validate(config)
    os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
    t0 = time.time()
    cells = []
    keys = cell_keys(config)
    for i, (size, structure, seed, tau) in enumerate(keys):
        path = os.path.join(workdir, "cells", _key(size, structure, seed, tau) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                cell = json.load(f)
            sz = config.sizes[size]
            if (cell["V"], cell["L"], cell["contexts"]) != (sz.V, sz.L, sz.contexts):
                raise ValueError(f"workdir: {path} holds V, L, contexts = {cell['V']}, {cell['L']}, "
                                 f"{cell['contexts']}, not this config's {sz.V}, {sz.L}, {sz.contexts}; "
                                 "use a fresh --workdir")
            cells.append(cell)
            continue
        cell = run_cell(config, size, structure, seed, tau)
        _write_atomic(path, json.dumps(cell))
        cells.append(cell)
        print(f"[{i + 1}/{len(keys)}] {_key(size, structure, seed, tau)}: {cell['wall_s']:.1f}s "
              f"(job {time.time() - t0:.0f}s)", flush=True)
    result = {"config": config.to_dict(), "cells": cells}
    _write_atomic(os.path.join(workdir, "exact_benchmark.json"), json.dumps(result))
    from nash_lm.tasks import exact_report

    summary = exact_report.write(result, workdir)
    summary["wall_s_this_run"] = time.time() - t0
    summary["wall_s_cells"] = sum(c["wall_s"] for c in cells)
    _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1))
    if config.results_dir:
        def gzipped(f):
            with open(os.path.join(workdir, "exact_benchmark.json"), "rb") as src, \
                    gzip.GzipFile(filename="exact_benchmark.json", fileobj=f, mode="wb", mtime=0) as g:
                shutil.copyfileobj(src, g)

        distributed.write_file(os.path.join(config.results_dir, "exact_benchmark.json.gz"), gzipped)
        for name in ("report.md", "summary.json"):
            _copy(os.path.join(workdir, name), os.path.join(config.results_dir, "exact_" + name))
    if config.figures_dir:
        for name in summary["figures"]:
            _copy(os.path.join(workdir, name), os.path.join(config.figures_dir, "exact_" + name))
    print(f"wrote {workdir}/exact_benchmark.json, report.md, summary.json ({summary['wall_s_cells']:.0f}s of cells)")
    return summary
