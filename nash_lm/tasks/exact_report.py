"""Tables and figures of the exact benchmark (`nash_lm.tasks.exact_benchmark`) from its JSON alone.

`write(result, outdir)` writes report.md and three figures (beta_curve.png, mixture_gap.png, nash_vs_rlhf.png)
and returns the summary (every aggregate the report shows). Aggregates are over seeds: mean with [min, max].
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

import numpy as np

from nash_lm import distributed

# The Nash side of the contrast: exact Nash-MD on the full class (converges to pi*_tau), and the language-model
# Nash-MD-PG (token-level mixture) at the paper's best beta after the configured number of gradient steps.
NASH_CONTRASTS = ("nash_md", "nash_md_pg_token[beta=0.125]")
# the reward- and pair-based baselines of each cell (`exact_benchmark.run_cell`), each at every c = k tau
BASELINES = ("rlhf_exact", "rlhf_pairs", "ipo_exact", "ipo_pairs")


FLOOR = 1e-9  # log-scale figures draw smaller gaps at this value


def _agg(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _fmt(a: dict, fmt: str = ".2e") -> str:
    return f"{a['mean']:{fmt}} [{a['min']:{fmt}}, {a['max']:{fmt}}]"


def _beta(name: str):
    m = re.search(r"\[beta=([0-9.]+)\]", name)
    return float(m.group(1)) if m else None


def _groups(cells):
    """(size, structure, tau) -> list of cells (one per seed)."""
    out = defaultdict(list)
    for c in cells:
        out[(c["size"], c["structure"], c["tau"])].append(c)
    return dict(sorted(out.items()))


def _h2h(cell, a: str, b: str) -> float:
    names = cell["head_to_head"]["names"]
    return cell["head_to_head"]["matrix"][names.index(a)][names.index(b)]


def summarise(result: dict) -> dict:
    groups = _groups(result["cells"])
    summary = {"groups": {}}
    for (size, structure, tau), cells in groups.items():
        key = f"{size}/{structure}/tau={tau:g}"
        names = list(cells[0]["policies"])
        g = {"cycle_rate": _agg([c["game"]["cycle_rate"]["rate"] for c in cells]), "policies": {}}
        for n in names:
            g["policies"][n] = {m: _agg([c["policies"][n][m] for c in cells])
                                for m in ("duality_gap", "kl_pi_star_vs_pi", "win_vs_pi_star", "win_vs_mu")}
        # RLHF's sweep of c: which c has the smallest duality gap, per route (per seed, then the mean)
        for route in BASELINES:
            rl = [n for n in names if n.startswith(route)]
            best = [min(rl, key=lambda n: c["policies"][n]["duality_gap"]) for c in cells]
            mean_best = min(rl, key=lambda n: g["policies"][n]["duality_gap"]["mean"])
            g[f"{route}_best"] = {"by_mean": mean_best, "per_seed": best}
        # the contrast: each Nash policy against RLHF at its best c (by mean duality gap), both routes
        contrast = {}
        for nash in (n for n in NASH_CONTRASTS if n in names):
            for route in BASELINES:
                rb = g[f"{route}_best"]["by_mean"]
                contrast[f"{nash} vs {route}"] = {
                    "nash": nash, "rlhf": rb,
                    "gap_ratio": _agg([c["policies"][rb]["duality_gap"] / max(c["policies"][nash]["duality_gap"],
                                                                             1e-300) for c in cells]),
                    "nash_vs_rlhf": _agg([_h2h(c, nash, rb) for c in cells])}
        g["contrast"] = contrast
        # the beta curve: per algorithm, the gap at every beta and the winning beta per seed
        curves = {}
        for algo in ("nash_md_pg", "nash_md_pg_token", "stationary_token", "stationary_sequence"):
            bn = sorted([n for n in names if n.startswith(algo + "[")], key=_beta)
            if not bn:
                continue
            gaps = np.array([[c["policies"][n]["duality_gap"] for n in bn] for c in cells])  # [seeds, betas]
            win = [_beta(bn[i]) for i in gaps.argmin(1)]
            curves[algo] = {"betas": [_beta(n) for n in bn], "gap": [_agg(gaps[:, i]) for i in range(len(bn))],
                            "best_beta_per_seed": win,
                            "beta0_minus_best": _agg(gaps[:, 0] - gaps.min(1))}
        g["beta_curve"] = curves
        if cells[0]["mixture"]:
            mix = {}
            for b in cells[0]["mixture"]:
                rows = [c["mixture"][b] for c in cells]
                mix[b] = {"kl_token_fp_vs_sequence_fp": _agg([r["kl_token_fp_vs_sequence_fp"] for r in rows]),
                          "kl_mixtures_at_token_fp": _agg([r["mixture_gap_at_token_fp"]["kl_token_vs_sequence"]
                                                           for r in rows]),
                          "tv_mixtures_at_token_fp": _agg([r["mixture_gap_at_token_fp"]["tv"] for r in rows]),
                          "gap_token_fp": _agg([c["policies"][r["token"]]["duality_gap"]
                                                for c, r in zip(cells, rows)]),
                          "gap_sequence_fp": _agg([c["policies"][r["sequence"]]["duality_gap"]
                                                   for c, r in zip(cells, rows)])}
            g["mixture"] = mix
        trained = {n: c for n, c in g["policies"].items() if n.startswith("nash_md_pg_token[")}
        g["mixture_trained"] = {}
        for n in trained:
            vals = [c["policies"][n].get("mixture_gap", {}).get("kl_token_vs_sequence") for c in cells]
            if all(v is not None for v in vals):
                g["mixture_trained"][n] = _agg(vals)
        summary["groups"][key] = g
    return summary


def markdown(summary: dict) -> str:
    L = ["# Exact benchmark", "",
         "All numbers exact (enumerated responses, float64); aggregates over seeds are mean [min, max].", ""]
    groups = summary["groups"]
    L += ["## Duality gap of every policy (tau-regularised game)", ""]
    for size in dict.fromkeys(k.split("/")[0] for k in groups):
        keys = [k for k in groups if k.startswith(size + "/")]
        names = list(dict.fromkeys(n for k in keys for n in groups[k]["policies"]))
        L.append(f"### {size}")
        L.append("")
        L.append("| policy | " + " | ".join(k.split("/", 1)[1] for k in keys) + " |")
        L.append("|---|" + "---|" * len(keys))
        for n in names:
            L.append(f"| {n} | " + " | ".join(_fmt(groups[k]["policies"][n]["duality_gap"])
                                              if n in groups[k]["policies"] else "" for k in keys) + " |")
        L.append("| cycle rate | " + " | ".join(_fmt(groups[k]["cycle_rate"], ".3f") for k in keys) + " |")
        L.append("")
    L += ["## Nash vs RLHF at its best c (by mean duality gap)", "",
          "| game | Nash policy | RLHF | gap(RLHF) / gap(Nash) | P(Nash > RLHF) | gap Nash | gap RLHF | "
          "P(RLHF > pi*) |", "|---|---|---|---|---|---|---|---|"]
    for k, g in groups.items():
        for c in g["contrast"].values():
            L.append(f"| {k} | {c['nash']} | {c['rlhf']} | {_fmt(c['gap_ratio'], '.3g')} | "
                     f"{_fmt(c['nash_vs_rlhf'], '.4f')} | {_fmt(g['policies'][c['nash']]['duality_gap'])} | "
                     f"{_fmt(g['policies'][c['rlhf']]['duality_gap'])} | "
                     f"{_fmt(g['policies'][c['rlhf']]['win_vs_pi_star'], '.4f')} |")
    L += ["", "## The beta curve (duality gap by beta; best beta per seed)", ""]
    for k, g in groups.items():
        for algo, cv in g["beta_curve"].items():
            cells = " | ".join(f"{b:g}: {a['mean']:.2e}" for b, a in zip(cv["betas"], cv["gap"]))
            L.append(f"- {k} {algo}: {cells}; best beta per seed {cv['best_beta_per_seed']}")
    L += ["", "## Token- vs sequence-level mixture (stationary points of Nash-MD-PG)", "",
          "| game | beta | KL(token fp || sequence fp) | KL(token mix || seq mix) at token fp | gap token fp | "
          "gap sequence fp |", "|---|---|---|---|---|---|"]
    for k, g in groups.items():
        for b, m in g.get("mixture", {}).items():
            L.append(f"| {k} | {b} | {_fmt(m['kl_token_fp_vs_sequence_fp'])} | {_fmt(m['kl_mixtures_at_token_fp'])}"
                     f" | {_fmt(m['gap_token_fp'])} | {_fmt(m['gap_sequence_fp'])} |")
    return "\n".join(L) + "\n"


def figures(summary: dict, outdir: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    small = {k: g for k, g in groups.items() if k.startswith("small/")}
    taus = sorted({float(k.split("tau=")[1]) for k in small})
    written = []
    # beta curve: trained language-model Nash-MD-PG and its stationary point, per tau
    fig, axes = plt.subplots(1, max(len(taus), 1), figsize=(6 * max(len(taus), 1), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, tau in zip(axes[0], taus):
        for i, (k, g) in enumerate((k, g) for k, g in small.items() if k.endswith(f"tau={tau:g}")):
            for algo, ls in (("nash_md_pg_token", "-"), ("stationary_token", ":")):
                cv = g["beta_curve"].get(algo)
                if cv is None:
                    continue
                m = np.array([a["mean"] for a in cv["gap"]])
                lo = np.array([a["min"] for a in cv["gap"]])
                hi = np.array([a["max"] for a in cv["gap"]])
                ax.plot(cv["betas"], np.maximum(m, FLOOR), ls, color=colors[i], marker="o", ms=3,
                        label=k.split("/")[1] if ls == "-" else None)
                if ls == "-":
                    ax.fill_between(cv["betas"], np.maximum(lo, FLOOR), np.maximum(hi, FLOOR), color=colors[i],
                                    alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel("exact duality gap")
        ax.set_title(f"Nash-MD-PG (token-level mixture), tau = {tau:g}\nsolid: trained (band: min-max over seeds), "
                     f"dotted: stationary point\n(gaps below {FLOOR:g}, e.g. the exact 0 at beta = 0, "
                     f"drawn at {FLOOR:g})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(outdir, "beta_curve.png")
    distributed.write_figure(path, fig, dpi=110)
    written.append(path)
    # mixture gap: KL between the equilibria each mixture leads to, by beta
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    structures = sorted({k.split("/")[1] for k in small})
    for k, g in small.items():
        if "mixture" not in g:
            continue
        i = structures.index(k.split("/")[1])
        bs = [float(b) for b in g["mixture"]]
        inner = [b for b in bs if 0 < b < 1]
        for ax, field in zip(axes, ("kl_token_fp_vs_sequence_fp", "kl_mixtures_at_token_fp")):
            v = [g["mixture"][f"{b:g}"][field]["mean"] for b in inner]
            ax.plot(inner, np.maximum(v, 1e-17), marker="o", ms=3, color=colors[i % 10],
                    ls="-" if k.endswith(f"tau={taus[0]:g}") else "--", label=k.split("/", 1)[1])
    axes[0].set_title("KL(token-mixture stationary point || sequence-mixture one)")
    axes[1].set_title("KL(token-level mixture || sequence-level mixture) at the token stationary point")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("beta")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = os.path.join(outdir, "mixture_gap.png")
    distributed.write_figure(path, fig, dpi=110)
    written.append(path)
    # Nash vs RLHF: duality gap of Nash-MD-PG and of RLHF at every c, per game
    keys = [k for k, g in groups.items() if all(n in g["policies"] for n in NASH_CONTRASTS)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(keys)), 4.8))
    series = [(n, {k: n for k in keys}) for n in NASH_CONTRASTS]
    series += [(f"{route} at its best c", {k: groups[k][f"{route}_best"]["by_mean"] for k in keys})
               for route in BASELINES]
    width = 0.8 / len(series)
    cmap = plt.get_cmap("tab10").colors
    for j, (label, pick) in enumerate(series):
        a = [groups[k]["policies"][pick[k]]["duality_gap"] for k in keys]
        m = np.array([x["mean"] for x in a])
        err = [m - np.array([x["min"] for x in a]), np.array([x["max"] for x in a]) - m]
        ax.bar(np.arange(len(keys)) + j * width, m, width, yerr=err, color=cmap[j], label=label)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(keys)) + 0.4)
    ax.set_xticklabels([k.replace("/tau", "\ntau") for k in keys], fontsize=6, rotation=30)
    ax.set_ylabel("exact duality gap (mean, min-max over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Nash vs RLHF: exact duality gap of the tau-regularised game (RLHF's c chosen per game by mean gap)",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(outdir, "nash_vs_rlhf.png")
    distributed.write_figure(path, fig, dpi=110)
    written.append(path)
    return written


def write(result: dict, outdir: str) -> dict:
    summary = summarise(result)
    distributed.write_text(os.path.join(outdir, "report.md"), markdown(summary))
    summary["figures"] = [os.path.basename(p) for p in figures(summary, outdir)]
    return summary
