"""Held-out NLL of the untouched `hf:` checkpoint and of the SFT stage on a docstring job's validation split.

    python scripts/heldout_nll.py --config=configs/smollm2_docstrings.py --job_workdir=runs/smollm2

The validation split is the job's own (the corpus cached in WORKDIR/cache, the job's tokenizer, chat template and
lengths, `nash_lm.tasks.pipeline.prepare_docstrings`); every response token (and its EOS) is scored under teacher
forcing (`nash_lm.train.step.eval_sft`), in batches of the SFT stage's batch size. Prints one JSON line.
"""
import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from nash_lm import export as export_lib
from nash_lm.interop import hf
from nash_lm.tasks import pipeline as tasks
from nash_lm.train import config as cfg_lib
from nash_lm.train import step as step_lib

config_flags.DEFINE_config_file("config", None, "A docstring job's config (its SFT stage starts from hf:).")
flags.DEFINE_string("job_workdir", None, "The job's workdir (the SFT stage complete).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    d = tasks.prepare_docstrings(config, FLAGS.job_workdir, "heldout_nll")
    valid = d.arrays[("sft", "eval")]
    sft = config.train.stages.sft
    model = cfg_lib.model_config(config.train, "model")
    base = hf.load_pretrained(cfg_lib.hf_path(sft.init, "config.train.stages.sft.init"), config=model, tokenizer=False)
    graphdef, tuned = export_lib.load_stage_params(FLAGS.job_workdir, "sft", model)
    fn = jax.jit(step_lib.eval_sft, static_argnums=0)
    b, n = int(sft.batch_size), len(valid["prompt"])
    out = {"rows_scored": n - n % b}
    for name, (gd, params) in (("base", (base.graphdef, base.params)), ("sft", (graphdef, tuned))):
        nll, tokens = 0.0, 0.0
        for i in range(0, n - n % b, b):
            batch = {k: v[i:i + b] for k, v in valid.items()}
            m = fn(gd, params, batch)
            count = float(batch["response_mask"].sum())
            nll, tokens = nll + float(m["nll_per_token"]) * count, tokens + count
        out[f"{name}_nll_per_token"] = nll / tokens
    print(json.dumps(out))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "job_workdir"])
    app.run(main)
