"""The docstring study: the docstring pipeline over several seeds, pooled (`configs/docstrings_study.py`).

For each seed s of `config.study.seeds` the `docstrings` job (`nash_lm.tasks.pipeline.run_docstrings`) runs in
WORKDIR/seed_<s> with `task.seed = train.seed = s`; a seed whose summary.json is complete for the same config is
reused, an incomplete one resumes stage by stage. Then the seeds are pooled:

- the tournament: for every two policies, the comparisons of all seeds summed (wins and counts), with a
  Clopper-Pearson interval on the pooled count (comparisons treated as independent draws; the per-seed win
  rates are kept beside it so their spread can be read);
- the beta curve: P(Nash-MD-PG at beta ≻ SFT) for every `nash_md_pg` stage, by beta;
- exploitability on text: for every `exploiter` stage x, P(x ≻ its target) under the rater, where the target is
  the stage x starts from (its `init`);
- how non-transitive the rater is: cyclic triples among mu's tournament samples, summed over seeds;
- the judges' agreement with the rater on held-out pairs (the preference and reward stages' eval `accuracy`:
  the share of held-out pairs from mu, ties excluded, on which the judge picks the rater's majority).

Writes WORKDIR/study.json (the pooled matrix, every seed's tournament counts and the numbers above), study.md and
the figure docs/figures/docstrings_study.png; copies study.{json,md} to `config.study.results_dir` as
docstrings_study.{json,md} (empty: not copied).
"""
from __future__ import annotations

import json
import os

import numpy as np

from nash_lm import distributed, stack
from nash_lm.evaluation import tournament
from nash_lm.train import config as cfg_lib


def seed_config(config, seed: int):
    """The docstring job's config for one seed of the study."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.job = "docstrings"
    del c["study"]
    c.task.seed = int(seed)
    c.train.seed = int(seed)
    c.lock()
    return c


def _complete(workdir: str, config) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    cfg_path = os.path.join(workdir, "config.json")
    if not (os.path.isfile(path) and os.path.isfile(cfg_path)):
        return None
    with open(path) as f:
        summary = json.load(f)
    with open(cfg_path) as f:
        same = json.load(f) == cfg_lib.to_jsonable(config)
    return summary if same and summary.get("status") == "complete" else None


def pooled_cell(seeds: list[dict], row: str, col: str, method: str = "clopper_pearson") -> dict:
    """P(col ≻ row) pooled over the seeds' tournaments (each `tournament.to_json()`), with its interval and the
    per-seed win rates."""
    wins = n = 0
    per_seed = []
    for t in seeds:
        r, c = t["names"].index(row), t["names"].index(col)
        wins, n = wins + t["wins"][r][c], n + t["n"][r][c]
        per_seed.append(t["wins"][r][c] / t["n"][r][c])
    low, high = tournament.interval(int(wins), int(n), method)
    return {"win": wins / n, "ci": [low, high], "wins": int(wins), "n": int(n), "per_seed": per_seed}


def run(config, workdir: str) -> dict:
    from nash_lm.tasks import pipeline

    seeds = [int(s) for s in config.study.seeds]
    if not seeds:
        raise ValueError("config.study.seeds: name at least one seed")
    summaries = {}
    for s in seeds:
        c = seed_config(config, s)
        sub = os.path.join(workdir, f"seed_{s}")
        got = _complete(sub, c)
        if got is None:
            print(f"[study] seed {s}: the docstring pipeline in {sub}", flush=True)
            got = pipeline.run_docstrings(c, sub)
        summaries[s] = got
    result = pool(config, summaries)
    write(result, workdir, config.study)
    return result


def pool(config, summaries: dict) -> dict:
    """The pooled numbers (see the module docstring) from each seed's summary."""
    stages = config.train.stages
    ts = [summaries[s]["tournament"] for s in sorted(summaries)]
    names = [n for n in ts[0]["names"] if all(n in t["names"] for t in ts)]
    method = ts[0].get("ci_method", "clopper_pearson")
    matrix = {r: {c: pooled_cell(ts, r, c, method) for c in names if c != r} for r in names}
    algorithm = lambda n: stages[n].algorithm if n in stages else ""
    beta = sorted(((float(stages[n].beta), n) for n in names if algorithm(n) == "nash_md_pg"))
    exploit = [(n, stages[n].init) for n in names if algorithm(n) == "exploiter" and stages[n].init in names]
    cyc = [summaries[s].get("mu_cycles") or {} for s in sorted(summaries)]
    judges = {}
    for n in names + [k for k in stages if algorithm(k) in ("preference", "reward")]:
        if algorithm(n) in ("preference", "reward"):
            acc = [summaries[s]["stages"][n]["accuracy"] for s in sorted(summaries) if n in summaries[s]["stages"]]
            judges[n] = {"kind": algorithm(n), "accuracy_per_seed": acc, "mean": float(np.mean(acc)),
                         "eval_pairs": int(stages[n].eval_batches) * int(stages[n].batch_size)}
    return {
        "seeds": sorted(summaries), "names": names, "ci_method": method,
        "prompts": ts[0]["n_prompts"], "samples_per_prompt": ts[0]["samples_per_prompt"],
        "matrix": matrix,  # matrix[row][col] = P(col ≻ row), pooled
        "beta_curve": [{"beta": b, "stage": n, **matrix["sft"][n]} for b, n in beta],
        "exploiters": [{"exploiter": x, "target": t, **matrix[t][x]} for x, t in exploit],
        "mu_cycles": {"cyclic": int(sum(c.get("cyclic", 0) for c in cyc)),
                      "triples": int(sum(c.get("triples", 0) for c in cyc)),
                      "rate_per_seed": [c.get("rate") for c in cyc]},
        "judges": judges,
        "wall_time_s_per_seed": [summaries[s].get("wall_time_s") for s in sorted(summaries)],
        "per_seed_tournaments": {str(s): {k: summaries[s]["tournament"][k] for k in ("names", "wins", "n")}
                                 for s in sorted(summaries)},
        "stack": stack.versions(),
    }


def _fmt(cell: dict) -> str:
    return f"{cell['win']:.3f} [{cell['ci'][0]:.2f}, {cell['ci'][1]:.2f}]"


def markdown(result: dict) -> str:
    seeds, names = result["seeds"], result["names"]
    cyc = result["mu_cycles"]
    out = [f"Docstring study: seeds {seeds}, {result['prompts']} test prompts x {result['samples_per_prompt']} "
           f"samples per seed; cells pool the seeds' comparisons (95% {result['ci_method']} intervals).", ""]
    out += ["## Beta curve: P(Nash-MD-PG at beta ≻ SFT)", "", "| beta | stage | pooled | per seed |", "|---|---|---|---|"]
    out += [f"| {c['beta']} | {c['stage']} | {_fmt(c)} | {', '.join(f'{w:.3f}' for w in c['per_seed'])} |"
            for c in result["beta_curve"]]
    out += ["", "## Exploitability on text: P(exploiter ≻ its target) under the rater", "",
            "| target | exploiter | pooled | per seed |", "|---|---|---|---|"]
    out += [f"| {c['target']} | {c['exploiter']} | {_fmt(c)} | {', '.join(f'{w:.3f}' for w in c['per_seed'])} |"
            for c in result["exploiters"]]
    rate = cyc["cyclic"] / cyc["triples"] if cyc["triples"] else 0.0
    out += ["", "## The rater", "",
            f"Cyclic triples among mu's samples: {cyc['cyclic']} of {cyc['triples']} ({rate:.4f}); per seed "
            + ", ".join(f"{r:.4f}" for r in cyc["rate_per_seed"] if r is not None) + ".", ""]
    out += ["| judge | kind | agreement with the rater on held-out pairs, per seed | mean |", "|---|---|---|---|"]
    out += [f"| {n} | {j['kind']} | {', '.join(f'{a:.3f}' for a in j['accuracy_per_seed'])} | {j['mean']:.3f} |"
            for n, j in result["judges"].items()]
    out += ["", "## Pooled tournament: P(column ≻ row)", "", "| row \\ column | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
    for r in names:
        out.append(f"| **{r}** | " + " | ".join("—" if c == r else f"{result['matrix'][r][c]['win']:.3f}"
                                                 for c in names) + " |")
    return "\n".join(out) + "\n"


def figure(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    curve = result["beta_curve"]
    if curve:
        x = np.array([c["beta"] for c in curve])
        y = np.array([c["win"] for c in curve])
        err = np.array([[c["win"] - c["ci"][0], c["ci"][1] - c["win"]] for c in curve]).T
        a.errorbar(x, y, yerr=err, marker="o", capsize=3, label="Nash-MD-PG (pooled)")
        for k in range(len(curve[0]["per_seed"])):
            a.plot(x, [c["per_seed"][k] for c in curve], ".", color="gray", alpha=0.6,
                   label="per seed" if k == 0 else None)
    for name, style in (("rlhf", "--"), ("inpo", ":"), ("dpo", "-.")):
        if name in result["matrix"].get("sft", {}):
            c = result["matrix"]["sft"][name]
            a.axhline(c["win"], linestyle=style, color="k", alpha=0.6, label=f"{name} {_fmt(c)}")
    a.set_xlabel("beta")
    a.set_ylabel("P(policy ≻ SFT) under the rater")
    a.set_title("Docstring task: the beta curve")
    a.legend(fontsize=7)
    ex = result["exploiters"]
    if ex:
        labels = [c["target"] for c in ex]
        y = np.array([c["win"] for c in ex])
        err = np.array([[c["win"] - c["ci"][0], c["ci"][1] - c["win"]] for c in ex]).T
        b.bar(labels, y, yerr=err, capsize=3, color="tab:orange", alpha=0.8)
        b.axhline(0.5, color="k", linewidth=0.8)
        b.set_ylim(min(0.4, float(y.min()) - 0.05), max(0.7, float(y.max()) + 0.05))
    b.set_ylabel("P(exploiter ≻ policy) under the rater")
    b.set_title("Exploitability on text (higher: more exploitable)")
    fig.tight_layout()
    distributed.write_figure(path, fig, dpi=110)


def write(result: dict, workdir: str, study) -> None:
    text = markdown(result)
    distributed.write_json(os.path.join(workdir, "study.json"), result)
    distributed.write_text(os.path.join(workdir, "study.md"), text)
    png = os.path.join(workdir, "docstrings_study.png")
    figure(result, png)
    if study.get("figures_dir", ""):
        with open(png, "rb") as f:
            distributed.write_bytes(os.path.join(study.figures_dir, "docstrings_study.png"), f.read())
    if study.get("results_dir", ""):
        distributed.write_json(os.path.join(study.results_dir, "docstrings_study.json"), result)
        distributed.write_text(os.path.join(study.results_dir, "docstrings_study.md"), text)
