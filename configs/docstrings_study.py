"""The docstring task over seeds: the β curve, Nash-MD-PG vs RLHF, INPO and DPO, and each policy's exploiter.

    python -m nash_lm.main --config=configs/docstrings_study.py --workdir=runs/docstrings_study

For each seed s of `study.seeds`, the docstring pipeline (configs/docstrings.py: corpus, tokenizer, SFT mu, the
rater-labelled pairs from mu, preference and reward models) runs in WORKDIR/seed_<s> with `task.seed = train.seed
= s` (SFT, the pairs and their labels, the judges, every policy and the tournament's draws all change with it):

    rlhf (on rm); Nash-MD-PG at beta 0 (sp), 0.125, 0.25, 0.375, 0.5, 0.75 (md1..md6) and 1 (br); INPO; DPO on
    the labelled pairs from mu; exploiters x_<p> of rlhf, sp, md1, md4, br and inpo (each starts from <p> and is
    trained against it, frozen, under the same preference model, KL-regularised to mu: `exploiter`)
    -> the tournament on the held-out test prompts under the rater panel; the rater's cycle rate among mu's
       samples; the judges' agreement with the rater on held-out pairs

then `nash_lm.tasks.study` pools the seeds (comparisons summed over seeds, Clopper-Pearson intervals) into
WORKDIR/study.{json,md} and figures. Each seed resumes stage by stage; a complete seed is reused. Seeds can run
as separate processes on the same workdir (`--config.study.seeds='(1,)'`), then one run with all of them pools.
"""
import importlib.util
import os

import ml_collections

from nash_lm.train.config import stage

_spec = importlib.util.spec_from_file_location("docstrings_config", os.path.join(os.path.dirname(__file__),
                                                                                  "docstrings.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

EXPLOITED = ("rlhf", "sp", "md1", "md4", "br", "inpo")


def get_config():
    c = _base.get_config()
    c.job = "docstrings_study"
    c.study = ml_collections.ConfigDict(dict(seeds=(0, 1, 2), results_dir="bench/results",
                                             figures_dir="docs/figures"))
    t = c.train
    policy = {k: t.stages.md1[k] for k in ("ref", "judge", "tau", "steps", "batch_size", "lr", "max_new_tokens",
                                           "log_every", "checkpoint_every", "eval_batches")}
    t.stages.md6 = stage("nash_md_pg", beta=0.75, **policy)
    # INPO with its registry defaults (eta_inv 1: a round moves the log-ratio by at most 1/2; 15 rounds of 10
    # steps), the policy stages' tau; DPO on the pairs from mu with their soft labels
    t.stages.inpo = stage("inpo", eta_inv=1.0, anchor_every=10, **policy)
    t.stages.dpo = stage("dpo", ref="sft", tau=0.1, steps=150, batch_size=32, lr=2e-4, log_every=25,
                         checkpoint_every=150, eval_batches=4)
    for name in EXPLOITED:
        t.stages[f"x_{name}"] = stage("exploiter", init=name, **{**policy, "steps": 100, "checkpoint_every": 100})
    t.pipeline = ",".join(["sft", "pm", "rm", "rlhf", "sp", "md1", "md2", "md3", "md4", "md6", "br", "inpo", "dpo"]
                          + [f"x_{n}" for n in EXPLOITED])
    return c
