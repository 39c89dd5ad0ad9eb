"""The `own_data` job: your checkpoint and your three JSONL files -> SFT -> preference model -> a policy -> an export.

`configs/own_data.py` is its config; everything it needs is a command-line override:

    python -m nash_lm.main --config=configs/own_data.py --workdir=runs/mine \
        --config.checkpoint=/abs/hf_dir --config.sft_data=sft.jsonl --config.pairs_data=pairs.jsonl \
        --config.prompts_data=prompts.jsonl [--config.algorithm=nash_md_pg --config.beta=0.125 --config.tau=0.01]

`build_train_config` turns it into an ordinary `train` config, with nothing guessed:

- the model's shape (`config.model` and `config.judge_model`) is read from the checkpoint's config.json
  (`nash_lm.interop.hf.model_config_from_hf`), its `max_len` = prompt_len + 2 x response_len (what the
  preference model reads); `config.model_settings` (dtype, scan_layers, remat) goes on top;
- the data is `kind = 'records'` with the checkpoint's own tokenizer.json and chat template
  (`config.data`: truncation, on_error, chat_template), prompt_len / response_len from the top level;
- the stages are `config.train.stages.sft` (init = the checkpoint), `.pm` (a preference model from the SFT
  model's decoder) and `.policy` (ref = sft, judge = pm) with the algorithm `config.algorithm` (a policy
  algorithm that takes a preference judge); `config.beta` and `config.tau` go into the policy stage when its
  algorithm has those fields. Each `*_data` file is also its stage's evaluation split unless `*_eval_data` names
  other files (several files: comma-separated).

Then the `train` pipeline runs it into WORKDIR (config.json holds the built config; rerunning resumes), and
`nash_lm.export.run` writes WORKDIR/export (params, hf/ with the base checkpoint's tokenizer files and
generation_config.json, the serialized sampler). Bad input is one line naming the field, exit code 2, before
anything is written.
"""
from __future__ import annotations

import copy
import os

import jax
import ml_collections

from nash_lm.train import algorithms
from nash_lm.train import config as cfg_lib

KINDS = ("sft", "pairs", "prompts")  # the top-level `<kind>_data` fields, in pipeline order
STAGE_OF = {"sft": "sft", "pairs": "pm", "prompts": "policy"}
RECORDS = {"sft": "SFT {prompt, response}", "pairs": "preference {prompt, chosen, rejected[, label]}",
           "prompts": "prompt {prompt}"}
TRAIN_FIELDS = ("seed", "mesh", "rules", "peak_tflops", "async_checkpoints", "stages")


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _checkpoint(config) -> str:
    path = os.path.expanduser(str(config.checkpoint))
    if not path:
        _fail("config.checkpoint", "required: --config.checkpoint=/abs/dir, a local Hugging Face checkpoint "
                                   "directory (config.json, *.safetensors, tokenizer.json)")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        _fail("config.checkpoint", f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    return path


def _policy_stage(config, template) -> ml_collections.ConfigDict:
    """The policy stage of `config.algorithm`, from the template's fields that the algorithm has."""
    name = str(config.algorithm)
    known = [a.name for a in algorithms.REGISTRY.values() if a.role == "policy" and "preference" in a.judges]
    if name not in known:
        _fail("config.algorithm", f"{name!r}: expected a policy algorithm that takes a preference judge, one of "
                                  f"{known}")
    fields = cfg_lib.stage_fields(name)
    given = {k: v for k, v in template.to_dict().items() if k in fields and k != "algorithm"}
    for key in ("beta", "tau"):
        if key in fields:
            given[key] = config[key]
    return cfg_lib.stage(name, **given)


def build_train_config(config) -> ml_collections.ConfigDict:
    """The `train` config an `own_data` config stands for (see the module docstring); one-line ValueErrors."""
    from nash_lm.interop import hf

    ckpt = _checkpoint(config)
    p, r = int(config.prompt_len), int(config.response_len)
    try:
        hf_config = hf.read_config(ckpt)
        arch = hf.architecture(hf_config)
        model = hf.model_config_from_hf(hf_config, max_len=p + 2 * r).to_dict()
    except (ValueError, OSError) as e:
        _fail("config.checkpoint", str(e).strip().splitlines()[0])
    model.update(config.model_settings.to_dict())
    model["architecture"] = arch
    t = ml_collections.ConfigDict()
    t.job = "train"
    for key in TRAIN_FIELDS:
        t[key] = copy.deepcopy(config.train[key])
    t.model = ml_collections.ConfigDict(model)
    t.judge_model = ml_collections.ConfigDict(model)
    t.data = ml_collections.ConfigDict(dict(kind="records", prompt_len=p, response_len=r, tokenizer="",
                                            **config.data.to_dict()))
    t.stages.policy = _policy_stage(config, t.stages.policy)
    for kind in KINDS:
        files = str(config[f"{kind}_data"]).strip()
        if not files:
            _fail(f"config.{kind}_data", f"required: the {RECORDS[kind]} records file(s) (JSONL or "
                                         f"ArrayRecord; comma-separated)")
        st = t.stages[STAGE_OF[kind]]
        st.train_data = files
        st.eval_data = str(config[f"{kind}_eval_data"]).strip() or files
    t.stages.sft.init = f"{cfg_lib.HF_PREFIX}{ckpt}"
    t.stages.pm.init, t.stages.policy.ref, t.stages.policy.judge = "sft", "sft", "pm"
    if "max_new_tokens" in t.stages.policy:
        t.stages.policy.max_new_tokens = r
    t.pipeline = "sft,pm,policy"
    return t


def run(config, workdir: str) -> dict:
    """Builds the train config, checks it, runs it into `workdir`, then exports the policy to WORKDIR/export."""
    from nash_lm import export as export_lib
    from nash_lm.train import pipeline

    train = build_train_config(config)
    summary = pipeline.run(train, workdir)
    out = os.path.join(workdir, "export")
    if jax.process_index() == 0:
        platforms = [s for s in str(config.export_platforms).split(",") if s]
        manifest = export_lib.run(workdir, out, stage="policy", overwrite=True, platforms=platforms)
        print(f"export: {out} ({', '.join(manifest['files'])})", flush=True)
    summary["export"] = out
    return summary


__all__ = ["build_train_config", "run"]
