"""The `ye_offline` and `ye_online` CLI jobs: sample-complexity experiments for learning the game from data.

`run_offline(config, workdir)`: for each τ, coverage regime, sample size n and seed, draw an offline dataset
from the behaviour pair distribution, fit, and record the half duality gap ½DG_τ(π̂) under the true P (Ye's
ε criterion) of each method. Coverage regimes (pair distributions):
- "full": a1, a2 i.i.d. uniform (every pair covered);
- "unilateral": one side from π*_τ, the other uniform (covers π* against every opponent, little else);
- "no_coverage": uniform over ordered pairs except the pairs among the `uncovered_top` most likely actions of
  π*_τ (π* against its own best responses is never compared), i.e. unilateral coverage of π* removed.
Writes offline.jsonl (one line per run and method), summary.json (mean, 95% CI over seeds, fitted log-log
slope of the mean gap against n per regime/method) and one PNG per τ.

`run_online(config, workdir)`: main agent + enhancer vs symmetric self-play vs uniform sampling, (i) half gap
of the main agent against labels at a fixed batch size, (ii) final half gap at a fixed label budget against the
number of batches it is split into. Writes online.jsonl, summary.json and PNGs.

Instances: "random" (EGPO/B5 style: P_ij ~ U[0, 1] below the diagonal, μ = softmax(N(0, 1))) and
"hidden_winner" (action 0 beats every other action with probability `winner_p`, the rest random in
[0.3, 0.7], μ(0) = `winner_mu`: the reference rarely plays the equilibrium's main action).
"""
from __future__ import annotations

import os
import time

import numpy as np

from nash_lm import distributed, games
from nash_lm.learning.data import product_behaviour, sample_dataset
from nash_lm.learning.online import STRATEGIES
from nash_lm.learning.online import run_online as online_run
from nash_lm.learning.pessimism import METHODS, offline_policy

COVERAGES = ("full", "unilateral", "no_coverage")


# ----------------------------------------------------------------------------------------------------------
# Instances and behaviour.


def make_instance(name: str, n: int, seed: int, winner_p: float = 0.85, winner_mu: float = 0.02):
    """(P [n, n], μ [n]) of a named instance; raises ValueError naming the field."""
    if n < 2:
        raise ValueError(f"n_actions: need at least 2 actions, got {n}")
    rng = np.random.default_rng(seed)
    if name == "random":
        L = np.tril(rng.uniform(size=(n, n)), -1)
        mu = np.exp(rng.normal(size=n))
    elif name == "hidden_winner":
        if not 0.5 <= winner_p <= 1 or not 0 < winner_mu < 1:
            raise ValueError("winner_p: must lie in [0.5, 1] and winner_mu in (0, 1)")
        L = np.tril(0.3 + 0.4 * rng.uniform(size=(n, n)), -1)
        L[1:, 0] = 1 - winner_p
        mu = np.exp(rng.normal(size=n))
        mu[0] = 0.0
        mu = (1 - winner_mu) * mu / mu.sum()
        mu[0] = winner_mu
    else:
        raise ValueError(f"instance: unknown {name!r}; known: ['random', 'hidden_winner']")
    P = L + np.triu(1 - L.T, 1)
    np.fill_diagonal(P, 0.5)
    return P, mu / mu.sum()


def behaviour(coverage: str, pi_star: np.ndarray, uncovered_top: int = 2) -> np.ndarray:
    n = pi_star.shape[-1]
    u = np.full(n, 1.0 / n)
    if coverage == "full":
        return product_behaviour([1.0], u)
    if coverage == "unilateral":
        return 0.5 * (product_behaviour([1.0], pi_star, u) + product_behaviour([1.0], u, pi_star))
    if coverage == "no_coverage":
        if not 2 <= uncovered_top <= n:
            raise ValueError(f"uncovered_top: must lie in [2, n_actions], got {uncovered_top}")
        D = np.ones((1, n, n))
        top = np.argsort(-pi_star)[:uncovered_top]
        D[0][np.ix_(top, top)] = 0.0
        return D / D.sum()
    raise ValueError(f"coverages: unknown {coverage!r}; known: {list(COVERAGES)}")


# ----------------------------------------------------------------------------------------------------------
# Statistics and plotting helpers.


def _ci(values):
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    h = float(1.96 * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return m, h


def _slope(ns, means):
    ns, means = np.asarray(ns, float), np.asarray(means, float)
    ok = means > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns[ok]), np.log(means[ok]), 1)[0])


def _check_positive_ints(name, values):
    vals = [int(v) for v in values]
    if not vals or min(vals) < 1:
        raise ValueError(f"{name}: expected a non-empty list of positive integers, got {list(values)}")
    return vals


# ----------------------------------------------------------------------------------------------------------
# Offline job.


def run_offline(config, workdir: str) -> dict:
    taus = [float(t) for t in config.taus]
    if not taus or min(taus) <= 0:
        raise ValueError(f"taus: pessimism needs every tau > 0, got {taus}")
    ns = _check_positive_ints("n_values", config.n_values)
    if int(config.num_seeds) < 2:
        raise ValueError(f"num_seeds: need >= 2 for confidence intervals, got {config.num_seeds}")
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown {m!r}; known: {list(METHODS)}")
    for c in config.coverages:
        if c not in COVERAGES:
            raise ValueError(f"coverages: unknown {c!r}; known: {list(COVERAGES)}")
    P, mu = make_instance(config.instance, int(config.n_actions), int(config.game_seed))
    os.makedirs(workdir, exist_ok=True)
    out_path = os.path.join(workdir, "offline.jsonl")
    start = time.time()
    rows = []
    for tau in taus:
        pi_star = games.nash_equilibrium(P, mu, tau)
        for coverage in config.coverages:
            D = behaviour(coverage, pi_star, int(config.uncovered_top))
            for n in ns:
                for s in range(int(config.num_seeds)):
                    rng = np.random.default_rng([int(config.seed), s, n, int(1e6 * tau)])
                    data = sample_dataset(P, D, n, rng)
                    for method in config.methods:
                        t0 = time.time()
                        pi = offline_policy(method, data, mu, tau, delta=float(config.delta),
                                            ridge=float(config.ridge),
                                            design_lambda=float(config.design_lambda),
                                            tol=float(config.solver_tol))[0]
                        row = dict(tau=tau, coverage=coverage, n=n, seed=s, method=method,
                                   half_gap=0.5 * games.duality_gap(P, mu, tau, pi),
                                   kl_to_nash=games.kl_divergence(pi_star, pi),
                                   seconds=time.time() - t0)
                        rows.append(row)
    distributed.write_jsonl(out_path, rows)
    summary = {"job": "ye_offline", "instance": config.instance, "n_actions": int(config.n_actions),
               "taus": taus, "n_values": ns, "num_seeds": int(config.num_seeds), "curves": [], "slopes": [],
               "seconds": time.time() - start}
    for tau in taus:
        for coverage in config.coverages:
            for method in config.methods:
                means, halfs = [], []
                for n in ns:
                    m, h = _ci([r["half_gap"] for r in rows if r["tau"] == tau and r["coverage"] == coverage
                                and r["method"] == method and r["n"] == n])
                    means.append(m)
                    halfs.append(h)
                summary["curves"].append(dict(tau=tau, coverage=coverage, method=method, n=ns, mean=means,
                                              ci95=halfs))
                summary["slopes"].append(dict(tau=tau, coverage=coverage, method=method,
                                              slope=_slope(ns, means),
                                              slope_upper_half=_slope(ns[len(ns) // 2:], means[len(ns) // 2:])))
    distributed.write_json(os.path.join(workdir, "summary.json"), summary, indent=1, sort_keys=False)
    summary["plots"] = _plot_offline(summary, workdir)
    return summary


def _plot_offline(summary, workdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    coverages = list(dict.fromkeys(c["coverage"] for c in summary["curves"]))
    for tau in summary["taus"]:
        fig, axes = plt.subplots(1, len(coverages), figsize=(4.2 * len(coverages), 3.4), sharey=True, dpi=80)
        axes = np.atleast_1d(axes)
        for ax, coverage in zip(axes, coverages):
            for c in summary["curves"]:
                if c["tau"] != tau or c["coverage"] != coverage:
                    continue
                ns, m, h = np.array(c["n"]), np.array(c["mean"]), np.array(c["ci95"])
                slope = next(s["slope"] for s in summary["slopes"] if s["tau"] == tau
                             and s["coverage"] == coverage and s["method"] == c["method"])
                ax.errorbar(ns, m, yerr=np.minimum(h, 0.999 * m), marker="o", ms=3, capsize=2,
                            label=f"{c['method']} (slope {slope:.2f})")
            ns = np.array(summary["n_values"], float)
            ref = [c for c in summary["curves"] if c["tau"] == tau and c["coverage"] == coverage][0]["mean"][0]
            ax.plot(ns, ref * (ns / ns[0]) ** -0.5, "k:", lw=1, label="slope −1/2")
            ax.plot(ns, ref * (ns / ns[0]) ** -1.0, "k--", lw=1, label="slope −1")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{coverage} coverage, τ = {tau:g}", fontsize=9)
            ax.set_xlabel("n (offline labels)")
            ax.legend(fontsize=6)
        axes[0].set_ylabel("½ duality gap of π̂ (mean ± 95% CI)")
        fig.tight_layout()
        path = os.path.join(workdir, f"ye_offline_tau{tau:g}.png")
        distributed.write_figure(path, fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Online job.


def run_online(config, workdir: str) -> dict:
    tau = float(config.tau)
    if tau <= 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    for s in config.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategies: unknown {s!r}; known: {list(STRATEGIES)}")
    batches = int(config.batches)
    batch_size = int(config.batch_size)
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches, batch_size: must be >= 1, got {batches}, {batch_size}")
    splits = _check_positive_ints("budget_batches", config.budget_batches)
    budget = int(config.label_budget)
    if budget < max(splits):
        raise ValueError(f"label_budget: must be >= max(budget_batches), got {budget}")
    if int(config.num_seeds) < 2:
        raise ValueError(f"num_seeds: need >= 2 for confidence intervals, got {config.num_seeds}")
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    summary = {"job": "ye_online", "tau": tau, "batch_size": batch_size, "batches": batches,
               "label_budget": budget, "budget_batches": splits, "num_seeds": int(config.num_seeds),
               "curves": [], "budget": [], "beta": float(config.beta)}
    lines = []
    for inst in config.instances:
        P, mu = make_instance(inst, int(config.n_actions), int(config.game_seed),
                              float(config.winner_p), float(config.winner_mu))
        for strategy in config.strategies:
            per_seed = []
            for s in range(int(config.num_seeds)):
                rec = online_run(P, mu, tau, strategy, batches=batches, batch_size=batch_size,
                                 beta=float(config.beta), ridge=float(config.ridge),
                                 design_lambda=float(config.design_lambda),
                                 rng=np.random.default_rng([int(config.seed), s, 1]))
                per_seed.append([r["half_gap"] for r in rec])
                lines += [dict(r, experiment="curve", instance=inst, strategy=strategy, seed=s) for r in rec]
            arr = np.array(per_seed)
            labels = [batch_size * t for t in range(batches + 1)]
            stats_ = [_ci(arr[:, t]) for t in range(arr.shape[1])]
            summary["curves"].append(dict(instance=inst, strategy=strategy, labels=labels,
                                          mean=[m for m, _ in stats_], ci95=[h for _, h in stats_]))
            finals = []
            for T in splits:
                vals = []
                for s in range(int(config.num_seeds)):
                    rec = online_run(P, mu, tau, strategy, batches=T, batch_size=budget // T,
                                     beta=float(config.beta), ridge=float(config.ridge),
                                     design_lambda=float(config.design_lambda),
                                     rng=np.random.default_rng([int(config.seed), s, 2, T]))
                    vals.append(rec[-1]["half_gap"])
                    lines.append(dict(rec[-1], experiment="budget", instance=inst, strategy=strategy, seed=s,
                                      split_batches=T))
                finals.append(_ci(vals))
            summary["budget"].append(dict(instance=inst, strategy=strategy, batches=splits,
                                          mean=[m for m, _ in finals], ci95=[h for _, h in finals]))
    distributed.write_jsonl(os.path.join(workdir, "online.jsonl"), lines)
    summary["seconds"] = time.time() - start
    distributed.write_json(os.path.join(workdir, "summary.json"), summary, indent=1, sort_keys=False)
    summary["plots"] = _plot_online(summary, config, workdir)
    return summary


def _plot_online(summary, config, workdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    insts = list(config.instances)
    fig, axes = plt.subplots(2, len(insts), figsize=(4.4 * len(insts), 6.4), dpi=80, squeeze=False)
    for j, inst in enumerate(insts):
        ax = axes[0, j]
        for c in summary["curves"]:
            if c["instance"] != inst:
                continue
            x, m, h = np.array(c["labels"][1:]), np.array(c["mean"][1:]), np.array(c["ci95"][1:])
            ax.plot(x, m, marker="o", ms=3, label=c["strategy"])
            ax.fill_between(x, np.maximum(m - h, m * 1e-3), m + h, alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"labels (batches of {summary['batch_size']})")
        ax.set_ylabel("½ duality gap of main agent")
        ax.set_title(f"{inst}, τ = {summary['tau']:g}", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for c in summary["budget"]:
            if c["instance"] != inst:
                continue
            ax.errorbar(c["batches"], c["mean"], yerr=np.minimum(c["ci95"], 0.999 * np.array(c["mean"])),
                        marker="o", ms=3, capsize=2, label=c["strategy"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"number of batches (total {summary['label_budget']} labels)")
        ax.set_ylabel("final ½ duality gap")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, "ye_online.png")
    distributed.write_figure(path, fig)
    return [path]
