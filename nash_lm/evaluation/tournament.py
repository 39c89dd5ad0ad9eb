"""The evaluation tournament: every policy against every other on held-out prompts, judged pairwise.

A policy is any callable `sample(prompts: list[str], seed: int) -> list[str]` (one completion per prompt), so the
tournament works with any sampler (a jitted model sampler, a lookup table, a baseline). A judge is any callable
`judge(prompts, ys, y2s) -> P(y > y2)` as floats in [0, 1] (e.g. `nash_lm.tasks.rater.Rater`).

For each prompt and each policy, `samples_per_prompt` completions are drawn once; every unordered pair of
policies is then compared on the same prompts, each comparison shown to the judge in a random order (a fair coin
per comparison, so a judge with a position bias cannot favour the first-listed policy), and the outcome is a
0/1 draw from the judge's P (the paper's judge also answers "1" or "2"). Ties are therefore broken by the coin of
P = 1/2. With k wins of column policy c over row policy r in n comparisons:

    win[r, c] = k / n = P*(pi_c > pi_r)      (column vs row, the layout of Munos et al.'s Table 1)
    win[c, r] = 1 - win[r, c]                (the same comparisons seen from the other side)

with a 95% (1 - alpha) Clopper-Pearson (exact) or Wilson interval. The diagonal is 1/2 by definition and not
played. `save` writes `tournament.json`, `tournament.md` (the table, cells "rate [low, high]"), `heatmap.png` and
`samples.md` (the first prompts with every policy's completion and the reference when given).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from nash_lm import distributed

CI_METHODS = ("clopper_pearson", "wilson")


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval: the alpha/2 and 1 - alpha/2 quantiles of Beta(k, n-k+1) and Beta(k+1, n-k)."""
    if n <= 0:
        return 0.0, 1.0
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval."""
    if n <= 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(1 - alpha / 2))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def interval(k: int, n: int, method: str = "clopper_pearson", alpha: float = 0.05) -> tuple[float, float]:
    if method == "clopper_pearson":
        return clopper_pearson(k, n, alpha)
    if method == "wilson":
        return wilson(k, n, alpha)
    raise ValueError(f"ci method: unknown {method!r}; known: {list(CI_METHODS)}")


@dataclasses.dataclass
class TournamentResult:
    names: list
    win: np.ndarray  # [P, P] win[r, c] = P*(pi_c > pi_r)
    low: np.ndarray
    high: np.ndarray
    wins: np.ndarray  # [P, P] integer wins of column over row
    n: np.ndarray  # [P, P] comparisons
    method: str
    alpha: float
    prompts: list
    samples: dict  # name -> list of completions (len = len(prompts) * samples_per_prompt)
    samples_per_prompt: int
    references: list | None = None

    def cell(self, row: str, col: str) -> tuple[float, float, float]:
        r, c = self.names.index(row), self.names.index(col)
        return float(self.win[r, c]), float(self.low[r, c]), float(self.high[r, c])

    def to_json(self) -> dict:
        return {
            "layout": "win[row][col] = P*(col policy beats row policy)",
            "names": self.names, "win": self.win.tolist(), "ci_low": self.low.tolist(),
            "ci_high": self.high.tolist(), "wins": self.wins.tolist(), "n": self.n.tolist(),
            "ci_method": self.method, "confidence": 1 - self.alpha, "n_prompts": len(self.prompts),
            "samples_per_prompt": self.samples_per_prompt,
        }


def run(policies: Mapping[str, Callable], prompts: Sequence[str], judge: Callable, *, samples_per_prompt: int = 1,
        seed: int = 0, method: str = "clopper_pearson", alpha: float = 0.05,
        references: Sequence[str] | None = None, progress: bool = False) -> TournamentResult:
    """Plays the tournament (see the module docstring)."""
    names = list(policies)
    if len(names) < 2:
        raise ValueError("tournament: needs at least two policies")
    if not prompts:
        raise ValueError("tournament: needs at least one prompt")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: must be >= 1, got {samples_per_prompt}")
    interval(0, 1, method, alpha)  # validates the method
    prompts = list(prompts)
    rep = [p for _ in range(samples_per_prompt) for p in prompts]
    samples = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names) + len(names) * (len(names) - 1) // 2, desc="tournament", leave=False)
    for i, name in enumerate(names):
        out = []
        for s in range(samples_per_prompt):
            got = list(policies[name](prompts, seed * 1_000_003 + 1000 * s + i))
            if len(got) != len(prompts):
                raise ValueError(f"policy {name!r} returned {len(got)} completions for {len(prompts)} prompts")
            out += got
        samples[name] = out
        if bar:
            bar.update(1)
    k_ = len(names)
    wins = np.zeros((k_, k_), np.int64)
    n = np.zeros((k_, k_), np.int64)
    rng = np.random.default_rng([seed, 17])
    for r in range(k_):
        for c in range(r + 1, k_):
            yc, yr = samples[names[c]], samples[names[r]]
            swap = rng.uniform(size=len(rep)) < 0.5
            first = [b if s else a for a, b, s in zip(yc, yr, swap)]
            second = [a if s else b for a, b, s in zip(yc, yr, swap)]
            p_first = np.asarray(judge(rep, first, second), np.float64)
            if p_first.shape != (len(rep),) or np.any((p_first < 0) | (p_first > 1)) or np.any(np.isnan(p_first)):
                raise ValueError(f"judge: expected {len(rep)} probabilities in [0, 1]")
            first_won = rng.uniform(size=len(rep)) < p_first
            c_won = np.where(swap, ~first_won, first_won)
            wins[r, c] = int(c_won.sum())
            wins[c, r] = len(rep) - wins[r, c]
            n[r, c] = n[c, r] = len(rep)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    win = np.full((k_, k_), 0.5)
    low = np.full((k_, k_), 0.5)
    high = np.full((k_, k_), 0.5)
    for r in range(k_):
        for c in range(k_):
            if r != c:
                win[r, c] = wins[r, c] / n[r, c]
                low[r, c], high[r, c] = interval(int(wins[r, c]), int(n[r, c]), method, alpha)
    return TournamentResult(names, win, low, high, wins, n, method, alpha, prompts, samples, samples_per_prompt,
                            list(references) if references is not None else None)


def markdown(result: TournamentResult, digits: int = 3) -> str:
    """The table: one row per row policy, one column per column policy; cell = P*(column beats row) [CI]."""
    pct = round(100 * (1 - result.alpha))
    lines = [f"P*(column beats row), {result.n.max()} comparisons per cell, {pct}% "
             f"{result.method.replace('_', '-')} intervals.", "",
             "| row \\ column | " + " | ".join(result.names) + " |",
             "|---|" + "---|" * len(result.names)]
    for r, row in enumerate(result.names):
        cells = []
        for c in range(len(result.names)):
            if r == c:
                cells.append("—")
            else:
                cells.append(f"{result.win[r, c]:.{digits}f} [{result.low[r, c]:.{digits - 1}f}, "
                             f"{result.high[r, c]:.{digits - 1}f}]")
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(result: TournamentResult, path: str, title: str = "P*(column beats row)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result.names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.7 * k))
    im = ax.imshow(result.win, cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), result.names, rotation=45, ha="right")
    ax.set_yticks(range(k), result.names)
    ax.set_xlabel("column policy")
    ax.set_ylabel("row policy")
    for r in range(k):
        for c in range(k):
            if r != c:
                ax.text(c, r, f"{result.win[r, c]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(result.win[r, c] - 0.5) > 0.3 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    distributed.write_figure(path, fig, dpi=120)


def samples_markdown(result: TournamentResult, n_prompts: int = 5, max_prompt_chars: int = 300) -> str:
    lines = ["# Sample outputs", ""]
    for i, prompt in enumerate(result.prompts[:n_prompts]):
        text = prompt if len(prompt) <= max_prompt_chars else prompt[:max_prompt_chars] + " …"
        lines += [f"## Prompt {i + 1}", "", "> " + text.replace("\n", " "), ""]
        if result.references is not None:
            lines.append(f"- *reference*: {result.references[i]}")
        for name in result.names:
            lines.append(f"- **{name}**: {result.samples[name][i]}")
        lines.append("")
    return "\n".join(lines)


def save(result: TournamentResult, outdir: str, n_sample_prompts: int = 5) -> dict:
    """Writes tournament.json, tournament.md, heatmap.png and samples.md (process 0, through
    `nash_lm.distributed`; call it on every process); returns their paths."""
    paths = {k: os.path.join(outdir, f) for k, f in (("json", "tournament.json"), ("markdown", "tournament.md"),
                                                      ("heatmap", "heatmap.png"), ("samples", "samples.md"))}
    payload = result.to_json()
    payload["samples"] = {name: s[: n_sample_prompts] for name, s in result.samples.items()}
    payload["sample_prompts"] = result.prompts[:n_sample_prompts]
    distributed.write_json(paths["json"], payload, sort_keys=False)
    distributed.write_text(paths["markdown"], markdown(result))
    heatmap(result, paths["heatmap"])
    distributed.write_text(paths["samples"], samples_markdown(result, n_sample_prompts))
    return paths
