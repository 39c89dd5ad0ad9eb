"""Stage inputs: the parameters a stage starts from, its frozen reference and its judge, placed on the mesh.

- `abstract_params`: (graphdef, abstract sharded parameters, a jitted initialiser creating them already
  sharded) of an 'lm', 'preference' or 'reward' model, Llama or a decoder variant (`nash_lm.interop.variants`).
- `load_export` / `load_stage_params`: an earlier stage's exported parameters (`WORKDIR/stages/<name>/export`),
  read straight into the shardings; `load_pretrained_input`: a `hf:` checkpoint.
- `StageInputs(spec, run, host_oracle)`: everything a stage reads before its first step: the model, its
  parameter shardings, how to initialise the policy (random, an earlier stage, a `hf:` checkpoint, or a judge
  whose backbone is an earlier language model), the frozen reference mu and the judge (a trained model, a JAX
  oracle or a host oracle).
"""
from __future__ import annotations

import os

import jax
from absl import logging

from nash_lm import models, parallel
from nash_lm.interop import hf as hf_interop
from nash_lm.interop import variants
from nash_lm.train import algorithms
from nash_lm.train import checkpoint as ckpt_lib
from nash_lm.train import config as cfg_lib
from nash_lm.train.scoring import Judge
from nash_lm.train.spec import Input, RunSpec, StageSpec, stage_dir


def abstract_params(model_cfg, kind: str, seed: int, mesh, rules, architecture: str = "llama"):
    """(graphdef, abstract params with shardings, a jitted initialiser creating params already sharded).
    `architecture` 'gemma' / 'qwen2' builds that variant of the 'lm' decoder (`nash_lm.interop.variants`)."""
    if architecture == "llama":
        graphdef, shapes = models.abstract_init(model_cfg, kind)
        shardings = parallel.param_shardings(shapes, mesh, rules)
        initialise = jax.jit(lambda: models.init(model_cfg, kind, seed)[1], out_shardings=shardings)
        return graphdef, ckpt_lib.abstract(shapes, shardings), initialise
    if kind != "lm":
        raise ValueError(f"architecture {architecture!r}: only 'lm' models (not {kind!r}) have this variant")
    graphdef, shapes = variants.build_abstract(model_cfg, architecture)
    shardings = parallel.param_shardings(shapes, mesh, rules)
    return (graphdef, ckpt_lib.abstract(shapes, shardings),
            lambda: variants.init(model_cfg, architecture, seed, shardings=shardings)[1])


def load_pretrained_input(path: str, model_cfg, shardings):
    """Parameters of a `hf:` stage input (checked by `spec.resolve`), placed with `shardings`; the same tree as
    `abstract_params` gives for the configured architecture."""
    p = hf_interop.load_pretrained(path, config=model_cfg, shardings=shardings)
    logging.info("imported %s from %s", hf_interop.describe(p), path)
    return p.params


def load_export(workdir, name, abstract_tree, key="policy"):
    path = os.path.join(stage_dir(workdir, name), "export")
    if not os.path.isdir(path):
        raise ValueError(f"missing stage input {name!r}: {path} does not exist")
    return ckpt_lib.load_params(path, {key: abstract_tree})[key]


def load_stage_params(run: RunSpec, name: str, key: str = "policy"):
    """(graphdef, params) of the export of stage `name` of `run` ('policy', or 'ema' for an EMA stage)."""
    config = run.config
    alg = algorithms.get(config.stages[name].algorithm)
    model_key = "model" if alg.produces == "lm" else "judge_model"
    graphdef, abstract, _ = abstract_params(cfg_lib.model_config(config, model_key), alg.produces, 0, run.mesh,
                                            run.rules, cfg_lib.model_architecture(config, model_key))
    return graphdef, load_export(run.workdir, name, abstract, key)


class StageInputs:
    """The model and the input parameters of one stage (nothing is read from disk until asked)."""

    def __init__(self, spec: StageSpec, run: RunSpec, host_oracle=None, abstract: bool = False):
        """`abstract`: shapes and shardings only, nothing read (for compiling ahead of time, `nash_lm.aot`)."""
        self.spec, self.run, self.abstract = spec, run, abstract
        mesh, rules = run.mesh, run.rules
        self.graphdef, self.abstract_policy, self._initialise = abstract_params(
            spec.model, spec.algorithm.produces, spec.seed, mesh, rules, spec.architecture)
        self.param_sh = jax.tree.map(lambda a: a.sharding, self.abstract_policy)
        self.judge, self.ref, self.judge_params = None, None, None
        if spec.role == "policy":
            self.ref = self._load(spec.ref)
            self.judge, self.judge_params = self._load_judge(spec.judge, host_oracle)
            if run.frozen_dtype:  # config.frozen_dtype: the frozen trees' matrices stored in bf16 (shardings kept)
                self.ref, self.judge_params = (None if p is None else models.cast_storage(p, run.frozen_dtype)
                                               for p in (self.ref, self.judge_params))
        self.frozen = (self.ref, self.judge_params)

    def init_policy(self):
        """The parameters step 0 starts from."""
        spec = self.spec
        start = spec.init or (spec.ref if spec.role == "policy" else None)
        if start is None:
            return self._initialise()
        if spec.role == "judge" and start.produces == "lm":  # the decoder of an 'lm' stage, a fresh score head
            _, abstract_lm, _ = abstract_params(spec.model, "lm", 0, self.run.mesh, self.run.rules)
            params = self._initialise()
            params["backbone"] = load_export(self.run.workdir, start.value, abstract_lm)
            return params
        return self._load(start)

    def _load(self, inp: Input):
        """Parameters of an 'lm'-shaped input of this stage's model: an earlier stage's export or a checkpoint."""
        if self.abstract:
            return self.abstract_policy
        if inp.kind == "hf":
            return load_pretrained_input(inp.value, self.spec.model, self.param_sh)
        return load_export(self.run.workdir, inp.value, self.abstract_policy)

    def _load_judge(self, inp: Input, host_oracle):
        if inp.kind == "oracle":
            return Judge("oracle", fn=cfg_lib.resolve_oracle(f"oracle:{inp.value}")), None
        if inp.kind == "host_oracle":
            fn = host_oracle if not inp.value else cfg_lib.resolve_oracle(f"host_oracle:{inp.value}")
            return Judge("host_oracle", fn=fn), None
        judge_cfg = cfg_lib.model_config(self.run.config, "judge_model")
        graphdef, abstract, _ = abstract_params(judge_cfg, inp.produces, 0, self.run.mesh, self.run.rules)
        params = abstract if self.abstract else load_export(self.run.workdir, inp.value, abstract)
        return Judge(inp.produces, graphdef=graphdef), params
