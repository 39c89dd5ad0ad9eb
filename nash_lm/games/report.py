"""The `games` job: run the configured algorithms on the configured instances and write a report.

    python -m nash_lm.main --config=configs/games.py --workdir=DIR [--config.tau=0.01] [--config.steps=1000]

Writes `DIR/metrics.jsonl` (one line per instance, algorithm and logged step), `DIR/summary.json` (final
last- and average-iterate gaps with a verdict per run), `DIR/report.md` (the same as Markdown tables) and one
convergence plot per instance, `DIR/gap_<instance>.png` (log-scale duality gap against steps).
"""
from __future__ import annotations

import os
import time

import numpy as np

from nash_lm import distributed
from nash_lm.games import algorithms, core, instances


def validate(config) -> None:
    """Checks the whole config before anything runs; raises ValueError naming the field."""
    if not isinstance(config.steps, int) or config.steps <= 0:
        raise ValueError(f"config.steps: must be a positive integer, got {config.steps!r}")
    if not isinstance(config.log_every, int) or config.log_every <= 0:
        raise ValueError(f"config.log_every: must be a positive integer, got {config.log_every!r}")
    if float(config.tau) < 0:
        raise ValueError(f"config.tau: must be >= 0, got {config.tau}")
    if not config.instances:
        raise ValueError("config.instances: empty")
    for key, inst in config.instances.items():
        if inst.get("name") not in instances.REGISTRY:
            raise ValueError(f"config.instances.{key}.name: unknown instance {inst.get('name')!r}; "
                             f"known: {sorted(instances.REGISTRY)}")
    for key, algo in config.algorithms.items():
        name = algo.get("name", key)
        if name not in algorithms.ALGORITHMS:
            raise ValueError(f"config.algorithms.{key}: unknown algorithm {name!r}; "
                             f"known: {sorted(algorithms.ALGORITHMS)}")
        try:
            algorithms.resolve(name, float(config.tau), _hyper(algo))
        except ValueError as e:
            raise ValueError(f"config.algorithms.{key}.{e}") from None


def _hyper(algo_cfg) -> dict:
    return {k: v for k, v in algo_cfg.items() if k != "name"}


def verdict(gap_last: np.ndarray, gap_avg: np.ndarray) -> str:
    """A one-phrase description of a run's behaviour from its gap curves (last fifth of the run)."""
    T = len(gap_last)
    tail = gap_last[-max(T // 5, 3):]
    if gap_last[-1] < 1e-8:
        return "last iterate converges"
    if tail.max() - tail.min() <= 1e-3 * tail.mean():
        return "settles at a biased point"
    if np.mean(np.diff(tail) < 0) > 0.95:
        return "last iterate converging slowly"
    if gap_avg[-1] < 0.5 * gap_last[-1]:
        return "last iterate cycles; average converges"
    return "last iterate oscillates"


def _plot(path: str, title: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, (last, avg)) in enumerate(curves.items()):
        steps = np.arange(1, len(last) + 1)
        color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        ax.plot(steps, np.maximum(last, 1e-17), color=color, label=name, lw=1.2)
        ax.plot(steps, np.maximum(avg, 1e-17), color=color, ls=":", lw=1.0)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("duality gap (solid: last iterate, dotted: average)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    distributed.write_figure(path, fig, dpi=110)


def run(config, workdir: str) -> dict:
    validate(config)
    tau, steps = float(config.tau), int(config.steps)
    games = {key: instances.make(**dict(inst)) for key, inst in config.instances.items()}
    for key, g in games.items():  # validate every game before writing anything
        try:
            core.check_game(g.P, g.mu, tau, g.rho)
        except ValueError as e:
            raise ValueError(f"config.instances.{key}: {e}") from None
    summary = {"tau": tau, "steps": steps, "runs": []}
    t0 = time.time()
    rows = []
    for key, g in games.items():
        curves = {}
        for algo_key, algo in config.algorithms.items():
            name = algo.get("name", algo_key)
            res = algorithms.run(name, g.P, g.mu, tau, steps, rho=g.rho, keep_iterates=False, **_hyper(algo))
            m = res.metrics
            rows += [{"instance": key, "algorithm": algo_key, "step": t + 1, **{k: float(v[t]) for k, v in m.items()}}
                     for t in range(config.log_every - 1, steps, config.log_every)]
            curves[algo_key] = (m["gap_last"], m["gap_avg"])
            summary["runs"].append({
                "instance": key, "algorithm": algo_key, "hyper": {k: v for k, v in res.hyper.items()},
                "gap_last": float(m["gap_last"][-1]), "gap_avg": float(m["gap_avg"][-1]),
                "kl_to_nash": float(m["kl_to_nash"][-1]),
                "verdict": verdict(m["gap_last"], m["gap_avg"]),
            })
        _plot(os.path.join(workdir, f"gap_{key}.png"), f"{key}: tau = {tau}", curves)
    distributed.write_jsonl(os.path.join(workdir, "metrics.jsonl"), rows)
    summary["wall_s"] = time.time() - t0
    distributed.write_json(os.path.join(workdir, "summary.json"), summary, indent=1, sort_keys=False)
    distributed.write_text(os.path.join(workdir, "report.md"), markdown_table(summary))
    print(markdown_table(summary))
    print(f"wrote {workdir}/metrics.jsonl, summary.json, report.md and gap_*.png in {summary['wall_s']:.1f}s")
    return summary


def markdown_table(summary: dict) -> str:
    keys = list(dict.fromkeys(r["instance"] for r in summary["runs"]))
    lines = [f"Duality gap after {summary['steps']} steps, tau = {summary['tau']} "
             "(last iterate / average iterate; verdict from the last-iterate curve).", ""]
    lines.append("| algorithm | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    by = {(r["algorithm"], r["instance"]): r for r in summary["runs"]}
    for algo in dict.fromkeys(r["algorithm"] for r in summary["runs"]):
        cells = []
        for k in keys:
            r = by[(algo, k)]
            cells.append(f"{r['gap_last']:.1e} / {r['gap_avg']:.1e}<br>{r['verdict']}")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
