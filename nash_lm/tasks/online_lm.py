"""The `docstrings_online` job: iterative online NLHF on the docstring task, main agent + enhancer vs symmetric.

This module owns the online loop, the best-of-k enhancer, the per-round pair sets and the online report. The
pieces of the `docstrings` job are reused from `nash_lm.tasks.pipeline` (stages on task arrays, lm exports,
batched sampling, the rater as a token oracle, text samplers for the tournament).

The language-model analogue of Ye et al.'s online algorithm (arXiv 2402.07314, Alg. 2; docs/nlhf_math.md),
with two arms sharing round 0 and spending the same label budget:

    round 0   sft (mu); n0 pairs y, y' ~ mu on the training prompts, labelled by the rater; pm0 (init = sft)
    round r   main agent pi_r = policy stage (`online.algorithm`: self-play Nash-MD-PG at beta 0, or online IPO)
              against pm_{r-1}, ref = sft, init = pi_{r-1} (pi_0 = sft); then `pairs_per_round` new pairs:
                enhancer   y ~ pi_r, y' = c_j*, j* = argmax_j P_pm_{r-1}(c_j > y | x), c_1..c_k ~ pi_r
                symmetric  y, y' ~ pi_r independently
              labelled by the rater (soft P and a 0/1 draw), appended to the arm's pairs; pm_r (init = pm_{r-1})
              trained on the arm's union of pairs.

Round 1's main agent is trained against pm0 from sft in both arms, so it is one shared stage (`main1`); the arms
differ from the pairs of round 1 on. Stages: sft, pm0, main1, enh_pm1, sym_pm1, enh_main2, enh_pm2, sym_main2, ...
built from the config's templates (`online.policy`, `online.judge`) with `nash_lm.train.config.stage()` and run
by one training pipeline (`nash_lm.train.pipeline.Pipeline`; an error in a generated stage names its template's
field), each stage with its own data, so a killed job resumes stage by stage (done.json). The pair
sets are deterministic functions of the config, seeds and exports (fixed keys per arm and round); they are also
cached in WORKDIR/online/*.npz together with the fingerprints of the stages they came from (a cache whose
fingerprints differ is regenerated). The enhancer's candidates and scores are saved there as well.

Evaluation after every round: the main agents' win rates against sft under the rater on the held-out test
prompts (a `nash_lm.evaluation.tournament` of sft and the round's main agents, Clopper-Pearson 95%), pm_r's
accuracy against the noiseless rater verdict on held-out pairs from mu (validation prompts; ties left out) and
the labels used. Writes WORKDIR/online_lm.json, online_lm.md, online_lm.png and summary.json.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import zlib

import jax
import numpy as np

from nash_lm import distributed, models, stack
from nash_lm.evaluation import tournament
from nash_lm.tasks import docstrings, pipeline, rater as rater_lib
from nash_lm.train import algorithms
from nash_lm.train import config as cfg_lib
from nash_lm.train.pipeline import Pipeline

ARMS = {"enhancer": "enh", "symmetric": "sym"}
_INPUTS = ("algorithm", "init", "ref", "judge")  # filled in by the job, not by the templates
_SCORE_BATCH = 256


# ----------------------------------------------------------------------------------------------------------
# Stage names and the training config


def main_name(arm: str, r: int) -> str:
    return "main1" if r == 1 else f"{ARMS[arm]}_main{r}"


def pm_name(arm: str, r: int) -> str:
    return "pm0" if r == 0 else f"{ARMS[arm]}_pm{r}"


def stage_order(arms, rounds: int) -> list[str]:
    order = ["sft", "pm0"]
    for r in range(1, rounds + 1):
        for arm in arms:
            for name in (main_name(arm, r), pm_name(arm, r)):
                if name not in order:
                    order.append(name)
    return order


def check_online(on) -> list[str]:
    """Checks `config.online` (one ValueError naming the field); returns the arms."""
    for key in ("rounds", "pairs0_per_prompt", "pairs_per_round", "best_of_k"):
        if not isinstance(on[key], int) or isinstance(on[key], bool) or on[key] < 1:
            raise ValueError(f"config.online.{key}: must be an int >= 1, got {on[key]!r}")
    arms = [a.strip() for a in str(on.arms).split(",") if a.strip()]
    if not arms or len(set(arms)) != len(arms) or any(a not in ARMS for a in arms):
        raise ValueError(f"config.online.arms: a comma-separated subset of {list(ARMS)}, got {on.arms!r}")
    main = algorithms.REGISTRY.get(on.algorithm)
    if main is None or main.role != "policy" or "preference" not in main.judges:
        known = [a.name for a in algorithms.REGISTRY.values() if a.role == "policy" and "preference" in a.judges]
        raise ValueError(f"config.online.algorithm: {on.algorithm!r} is not a policy algorithm judged by a "
                         f"preference model; known: {known}")
    if not isinstance(on.beta, (int, float)) or isinstance(on.beta, bool) or not 0.0 <= on.beta <= 1.0:
        raise ValueError(f"config.online.beta: must be in [0, 1], got {on.beta!r}")
    for key in ("policy", "judge"):
        bad = sorted(set(on[key].keys()) & set(_INPUTS + ("beta",)))
        if bad:
            raise ValueError(f"config.online.{key}: field(s) {bad} are set by the job, not by the template")
    return arms


def _from_template(on, key: str, algorithm: str, **inputs):
    try:
        return cfg_lib.stage(algorithm, **on[key].to_dict(), **inputs)
    except ValueError as e:
        raise ValueError(f"config.online.{key}: {str(e).split(': ', 1)[-1]}") from None


def build_train_config(config, task_hash: str, arms) -> tuple:
    """The training config with every stage of the online rounds added; (cfg, order, origins), origins naming
    the template each generated stage came from (`config.online.policy` / `config.online.judge`)."""
    on = config.online
    cfg = pipeline.train_config(config, task_hash)
    origins = {}
    extra = {"beta": float(on.beta)} if "beta" in algorithms.get(on.algorithm).fields else {}
    for r in range(1, on.rounds + 1):
        for arm in arms:
            main, prev = main_name(arm, r), ("sft" if r == 1 else main_name(arm, r - 1))
            if main not in origins:
                cfg.stages[main] = _from_template(on, "policy", on.algorithm, init=prev, ref="sft",
                                                  judge=pm_name(arm, r - 1), **extra)
                origins[main] = "config.online.policy"
            name = pm_name(arm, r)
            cfg.stages[name] = _from_template(on, "judge", "preference", init=pm_name(arm, r - 1))
            origins[name] = "config.online.judge"
    order = stage_order(arms, on.rounds)
    cfg.pipeline = ",".join(order)
    return cfg, order, origins


# ----------------------------------------------------------------------------------------------------------
# Pairs: sampling, best-of-k, labels


@functools.partial(jax.jit, static_argnums=0)
def _pref(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask):
    return models.preference_prob(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask)


def preference_probs(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask) -> np.ndarray:
    """P_pm(y > y2 | prompt) [N] float32, in padded batches of 256 (one compilation)."""
    dtypes = (np.int32, np.float32, np.int32, np.float32, np.int32, np.float32)
    arrays = [np.asarray(a).astype(d) for a, d in zip((prompt, prompt_mask, y, y_mask, y2, y2_mask), dtypes)]
    out = pipeline.in_batches(lambda *chunk: _pref(graphdef, params, *chunk), arrays, _SCORE_BATCH)
    return np.concatenate(out).astype(np.float32)


def best_of_k(scores: np.ndarray) -> np.ndarray:
    """Index of the best candidate per row of scores [m, k] (the first one on ties)."""
    return np.argmax(np.asarray(scores), axis=1)


def _key(seed: int, *parts) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(":".join(map(str, parts)).encode()))


def mu_pairs(gd, params, prompts: dict, per_prompt: int, key, rlen: int) -> dict:
    return pipeline.sample_pairs(gd, params, prompts, per_prompt, *jax.random.split(key), rlen)


def round_pairs(arm: str, gd, params, judge, prompts: dict, k: int, key, rlen: int) -> tuple[dict, dict]:
    """New pairs of one arm and round from the main agent `params`; (pairs, enhancer extras).
    Enhancer: y ~ pi, y' = the best of k samples of pi under `judge` = (graphdef, params) of pm_{r-1}."""
    p, pm_ = prompts["prompt"], prompts["prompt_mask"]
    k1, k2 = jax.random.split(key)
    y, ym = pipeline.sample_tokens(gd, params, p, pm_, k1, rlen)
    if arm == "symmetric":
        y2, y2m = pipeline.sample_tokens(gd, params, p, pm_, k2, rlen)
        return {"prompt": p, "prompt_mask": pm_, "y": y, "y_mask": ym, "y2": y2, "y2_mask": y2m}, {}
    m = len(p)
    rep = lambda a: np.repeat(a, k, axis=0)  # row i*k + j: candidate j of prompt i
    c, cm = pipeline.sample_tokens(gd, params, rep(p), rep(pm_), k2, rlen)
    scores = preference_probs(judge[0], judge[1], rep(p), rep(pm_), c, cm, rep(y), rep(ym)).reshape(m, k)
    best = best_of_k(scores)
    c, cm = c.reshape(m, k, -1), cm.reshape(m, k, -1)
    rows = np.arange(m)
    pairs = {"prompt": p, "prompt_mask": pm_, "y": y, "y_mask": ym, "y2": c[rows, best], "y2_mask": cm[rows, best]}
    return pairs, {"candidates": c, "candidates_mask": cm, "scores": scores, "best": best}


def _cached(path: str, key: str, make) -> dict:
    """The arrays in `path` when it was written under `key`, else make() on every process (saved with the key
    by process 0). Every process takes the same branch, as make() may hold collectives: all of them look at
    the file before any can write it (a barrier), and the write ends at a barrier, so the next look finds it."""
    hit = None
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["cache_key"]) == key:
                hit = {k: f[k] for k in f.files if k != "cache_key"}
    distributed.barrier(f"cache:{os.path.basename(path)}")
    if hit is not None:
        return hit
    arrays = make()
    distributed.write_npz(path, {**arrays, "cache_key": np.asarray(key)})
    return arrays


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


PAIR_KEYS = ("prompt", "prompt_mask", "y", "y_mask", "y2", "y2_mask", "label", "hard_label")


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def judge_accuracy(judge, pairs: dict, noise: float) -> dict:
    """Accuracy of a preference model against the noiseless rater verdict (sign of P - 1/2; ties left out)."""
    prob = preference_probs(judge[0], judge[1], *(pairs[k] for k in PAIR_KEYS[:6]))
    decided = np.abs(pairs["label"] - 0.5) > 1e-6 if noise < 0.5 else np.zeros(len(prob), bool)
    n = int(decided.sum())
    acc = float(np.mean((prob[decided] > 0.5) == (pairs["label"][decided] > 0.5))) if n else float("nan")
    return {"accuracy": acc, "n_decided": n, "n_pairs": int(len(prob))}


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"enhancer": "C0", "symmetric": "C1"}
    for i, arm in enumerate(report["arms"]):
        rows = [r for r in report["rounds"] if r["arm"] == arm]
        x = np.array([r["labels_main_judge"] for r in rows], float)
        shift = (i - 0.5 * (len(report["arms"]) - 1)) * 0.01 * max(x.max(), 1.0)
        win = np.array([r["win_vs_sft"] for r in rows])
        lo = np.array([r["win_ci"][0] for r in rows])
        hi = np.array([r["win_ci"][1] for r in rows])
        axes[0].errorbar(x + shift, win, yerr=[win - lo, hi - win], marker="o", capsize=3, label=arm,
                         color=colors[arm])
        xs = [report["round0"]["labels"]] + [r["labels_total"] for r in rows]
        accs = [report["round0"]["pm_accuracy"]] + [r["pm_accuracy"] for r in rows]
        axes[1].plot(xs, accs, marker="o", label=arm, color=colors[arm])
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("labels the main agent's preference model was trained on")
    axes[0].set_ylabel("P*(main agent beats SFT), 95% CI")
    axes[0].set_title("main agent vs SFT (rater, test prompts)")
    axes[1].set_xlabel("labels collected")
    axes[1].set_ylabel("preference model accuracy (noiseless rater)")
    axes[1].set_title("pm_r on held-out pairs from mu")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    distributed.write_figure(path, fig, dpi=120)


def _markdown(report: dict) -> str:
    lines = [f"Online NLHF on the docstring task: {report['rounds_n']} rounds, main agent "
             f"{report['algorithm']}, best of k = {report['best_of_k']}; round 0: {report['round0']['labels']} "
             f"labels, pm0 accuracy {report['round0']['pm_accuracy']:.3f}.", "",
             "| arm | round | main agent | labels (its judge) | win vs SFT [95% CI] | pm | labels (total) | "
             "pm accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['arm']} | {r['round']} | {r['main']} | {r['labels_main_judge']} | "
                     f"{r['win_vs_sft']:.3f} [{r['win_ci'][0]:.3f}, {r['win_ci'][1]:.3f}] | {r['pm']} | "
                     f"{r['labels_total']} | {r['pm_accuracy']:.3f} |")
    h2h = report.get("head_to_head", [])
    if h2h:
        lines += ["", "| round | P*(enhancer's main agent beats symmetric's) [95% CI] |", "|---|---|"]
        for h in h2h:
            lines.append(f"| {h['round']} | {h['win']:.3f} [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The job


def run_online_lm(config, workdir: str) -> dict:
    """The `docstrings_online` job (see the module docstring); returns the summary (WORKDIR/summary.json)."""
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    task, on = config.task, config.online
    docstrings.CorpusConfig(**task.corpus.to_dict()).validate()  # bad values fail before anything is written
    arms = check_online(on)
    if not isinstance(task.eval_pairs_per_prompt, int) or task.eval_pairs_per_prompt < 1:
        raise ValueError(f"config.task.eval_pairs_per_prompt: must be an int >= 1, got {task.eval_pairs_per_prompt}")
    if not 0.0 <= task.rater_noise <= 0.5:
        raise ValueError(f"config.task.rater_noise: must be in [0, 0.5], got {task.rater_noise}")
    task_hash = pipeline.task_hash(config, ("task", "online"))
    cfg, order, origins = build_train_config(config, task_hash, arms)
    tournament.interval(0, 1, task.tournament.ci_method)
    with Pipeline(cfg, workdir, data={}, origins=origins) as pipe:  # every stage checked, nothing written yet
        return _run_rounds(config, pipe, arms, task_hash, t0)


def _run_rounds(config, pipe: Pipeline, arms, task_hash: str, t0: float) -> dict:
    task, on, workdir = config.task, config.online, pipe.workdir
    os.makedirs(os.path.join(workdir, "online"), exist_ok=True)
    distributed.write_json(os.path.join(workdir, "config.json"), cfg_lib.to_jsonable(config))

    # round 0 inputs: corpus, tokenizer, arrays (as the docstrings job builds them)
    d = pipeline.prepare_docstrings(config, workdir, "online_lm")
    pipe.use_tokenizer(d.fmt.tokenizer)
    corpus, tok, rlen = d.corpus, d.tokenizer, d.response_len
    test_ex = d.splits["test"]
    sft = {s: d.arrays[("sft", s)] for s in ("train", "eval")}
    prompts = {s: d.arrays[("prompts", s)] for s in ("train", "eval")}
    oracle = rater_lib.token_oracle(rater_lib.Rater(corpus, noise=task.rater_noise, seed=task.seed), d.fmt, corpus)
    fp = {name: spec.fingerprint_hash for name, spec in pipe.spec.stages.items()}
    results, held_out = {}, {}

    def run(name, pairs_train=None):
        data = {("sft", s): sft[s] for s in sft}
        data.update({("prompts", s): prompts[s] for s in prompts})
        if "eval" in held_out:
            data[("pairs", "eval")] = held_out["eval"]
        if pairs_train is not None:
            data[("pairs", "train")] = pairs_train
        results.update(pipe.run([name], data=data))

    run("sft")
    gd, mu = pipe.params("sft")
    odir = os.path.join(workdir, "online")
    eval_pairs = _cached(os.path.join(odir, "eval_pairs.npz"), fp["sft"] + task_hash, lambda: pipeline.label_pairs(
        oracle, mu_pairs(gd, mu, prompts["eval"], task.eval_pairs_per_prompt, _key(task.seed, "eval"), rlen),
        [task.seed, 3, 1]))
    held_out["eval"] = eval_pairs
    pairs0 = _cached(os.path.join(odir, "pairs0.npz"), fp["sft"] + task_hash, lambda: pipeline.label_pairs(
        oracle, mu_pairs(gd, mu, prompts["train"], on.pairs0_per_prompt, _key(task.seed, "pairs0"), rlen),
        [task.seed, 3, 0]))
    n0 = len(pairs0["y"])
    print(f"[online_lm] round 0: {n0} pairs from mu labelled by the rater (mean P = {pairs0['label'].mean():.3f})",
          flush=True)
    run("pm0", pairs0)
    judges = {"pm0": pipe.params("pm0")}
    round0 = {"labels": n0, "pm": "pm0", "pm_accuracy": judge_accuracy(judges["pm0"], eval_pairs,
                                                                         task.rater_noise)["accuracy"]}
    union = {arm: pairs0 for arm in arms}
    labels = {arm: n0 for arm in arms}
    rounds, head_to_head, enhancer_files = [], [], []
    n_train = len(prompts["train"]["prompt"])
    judge_rater = rater_lib.Rater(corpus, noise=task.rater_noise, seed=task.seed + 1)
    tconf = task.tournament
    test_prompts = [e["prompt"] for e in test_ex]
    for r in range(1, on.rounds + 1):
        round_rows = {}
        for arm in arms:
            main, prev_pm, pm = main_name(arm, r), pm_name(arm, r - 1), pm_name(arm, r)
            if main not in results:
                run(main)
            _, pi = pipe.params(main)
            # the round's training prompts: a fixed permutation per round (cycled when more pairs than prompts)
            perm = np.random.default_rng([task.seed, 11, r]).permutation(n_train)
            idx = np.resize(perm, on.pairs_per_round)
            batch = {k: v[idx] for k, v in prompts["train"].items()}

            def make():
                new, extra = round_pairs(arm, gd, pi, judges[prev_pm], batch, on.best_of_k,
                                         _key(task.seed, arm, r), rlen)
                return {**pipeline.label_pairs(oracle, new, [task.seed, 5, r, zlib.crc32(arm.encode())]),
                        **{f"enhancer_{k}": v for k, v in extra.items()}}

            path = os.path.join(odir, f"pairs_{ARMS[arm]}{r}.npz")
            arrays = _cached(path, fp[main] + fp[prev_pm] + task_hash, make)
            if arm == "enhancer":
                enhancer_files.append({"round": r, "file": path, "judge": prev_pm, "main": main})
            new = {k: arrays[k] for k in PAIR_KEYS}
            union[arm] = _concat(union[arm], new)
            labels[arm] += len(new["y"])
            print(f"[online_lm] round {r} {arm}: {len(new['y'])} new pairs (mean P(y > y') = "
                  f"{new['label'].mean():.3f}), {labels[arm]} labels in all", flush=True)
            run(pm, union[arm])
            judges[pm] = pipe.params(pm)
            acc = judge_accuracy(judges[pm], eval_pairs, task.rater_noise)["accuracy"]
            round_rows[arm] = {"arm": arm, "round": r, "main": main, "pm": pm, "labels_total": labels[arm],
                               "labels_main_judge": labels[arm] - len(new["y"]), "pm_accuracy": acc,
                               "mean_label_new_pairs": float(new["label"].mean())}
            if arm == "enhancer":
                round_rows[arm]["mean_best_score"] = float(arrays["enhancer_scores"].max(1).mean())
                round_rows[arm]["mean_candidate_score"] = float(arrays["enhancer_scores"].mean())
        # the round's main agents against sft, judged by the rater on the held-out test prompts
        mains = list(dict.fromkeys(row["main"] for row in round_rows.values()))
        policies = {"sft": pipeline.TextSampler(gd, mu, d.fmt, rlen, tconf.temperature)}
        for name in mains:
            policies[name] = pipeline.TextSampler(gd, pipe.params(name)[1], d.fmt, rlen, tconf.temperature)
        result = tournament.run(policies, test_prompts, judge_rater, samples_per_prompt=tconf.samples_per_prompt,
                                seed=task.seed + r, method=tconf.ci_method)
        for arm, row in round_rows.items():
            w, lo, hi = result.cell("sft", row["main"])
            row.update(win_vs_sft=w, win_ci=[lo, hi], n_comparisons=int(result.n.max()))
            rounds.append(row)
            print(f"[online_lm] round {r} {arm}: {row['main']} beats sft {w:.3f} [{lo:.3f}, {hi:.3f}], "
                  f"{row['pm']} accuracy {row['pm_accuracy']:.3f}", flush=True)
        if len(mains) == 2 and {"enhancer", "symmetric"} <= set(round_rows):
            w, lo, hi = result.cell(round_rows["symmetric"]["main"], round_rows["enhancer"]["main"])
            head_to_head.append({"round": r, "win": w, "ci": [lo, hi]})

    report = {"arms": arms, "rounds_n": int(on.rounds), "algorithm": on.algorithm, "beta": float(on.beta),
              "best_of_k": int(on.best_of_k), "pairs_per_round": int(on.pairs_per_round), "round0": round0,
              "rounds": rounds, "head_to_head": head_to_head, "labels": labels, "enhancer_files": enhancer_files,
              "n_test_prompts": len(test_prompts), "wall_time_s": time.time() - t0}
    distributed.write_json(os.path.join(workdir, "online_lm.json"), report)
    md = _markdown(report)
    distributed.write_text(os.path.join(workdir, "online_lm.md"), md)
    _plot(report, os.path.join(workdir, "online_lm.png"))
    print(md, flush=True)
    summary = {"status": "complete", "wall_time_s": time.time() - t0, "labels": labels, "report": "online_lm.json",
               "stages": {k: v.get("eval", {}) for k, v in results.items()},
               "tokenizer": tok.path, "stack": stack.versions(), "config_sha256": hashlib.sha256(
                   json.dumps(cfg_lib.to_jsonable(pipe.spec.config), sort_keys=True).encode()).hexdigest()}
    distributed.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
