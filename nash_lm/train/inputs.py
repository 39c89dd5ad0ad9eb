"""Stage inputs: the parameters a stage starts from, its frozen reference and its judge, placed on the mesh.

- `abstract_params`: (graphdef, abstract sharded parameters, a jitted initialiser creating them already
  sharded) of an 'lm', 'preference' or 'reward' model, Llama or a decoder variant (`nash_lm.interop.variants`).
- `load_export` / `load_stage_params`: an earlier stage's exported parameters (`WORKDIR/stages/<name>/export`),
  read straight into the shardings; `load_pretrained_input`: a `hf:` checkpoint.
- `StageInputs(spec, run, host_oracle)`: everything a stage reads before its first step: the model, its
  parameter shardings, how to initialise the policy (random, an earlier stage, a `hf:` checkpoint, or a judge
  whose backbone is an earlier language model), the frozen reference mu and the judge (a trained model, a JAX
  oracle or a host oracle).

A LoRA stage (`spec.lora`): the model is the adapted decoder, the trained tree (`abstract_policy`,
`init_policy`) holds its adapters only (fresh: A random, B = 0; an adapted judge's fresh head too), and the frozen
base (the policy stage's `ref`, the SFT stage's `init`, a judge's `init` decoder as its backbone) is read once
into `ref` in the adapted structure with its adapters zero (which computes the base exactly: each low-rank term
is an exact 0): mu itself, and the base the step joins the trained adapters with
(`full_params`). `base_sha256` is the base's content hash (checked against a checkpoint on resume).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from nash_lm import models, parallel
from nash_lm.interop import hf as hf_interop
from nash_lm.interop import variants
from nash_lm.models import lora as lora_lib
from nash_lm.train import algorithms
from nash_lm.train import checkpoint as ckpt_lib
from nash_lm.train import config as cfg_lib
from nash_lm.train.scoring import Judge
from nash_lm.train.state import Frozen
from nash_lm.train.spec import Input, RunSpec, StageSpec, stage_dir


def abstract_params(model_cfg, kind: str, seed: int, mesh, rules, architecture: str = "llama", lora_cfg=None):
    """(graphdef, abstract params with shardings, a jitted initialiser creating params already sharded).
    `architecture` 'gemma' / 'qwen2' builds that variant of the 'lm' decoder (`nash_lm.interop.variants`).
    With `lora_cfg` the model is the adapted decoder (the abstract tree: adapters and base) and the initialiser
    creates its adapters only (the base's random values are never computed: XLA drops them from the program)."""
    if lora_cfg is not None:
        build = models.init if architecture == "llama" else (
            lambda cfg, kind, seed, lora_cfg: variants.init(cfg, architecture, seed, lora_cfg=lora_cfg))
        graphdef, shapes = (models.abstract_init(model_cfg, kind, lora_cfg) if architecture == "llama"
                            else variants.build_abstract(model_cfg, architecture, lora_cfg))
        shardings = parallel.param_shardings(shapes, mesh, rules)
        initialise = jax.jit(lambda: lora_lib.split(build(model_cfg, kind, seed, lora_cfg=lora_cfg)[1])[0],
                             out_shardings=lora_lib.split(shardings)[0])
        return graphdef, ckpt_lib.abstract(shapes, shardings), initialise
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
            spec.model, spec.algorithm.produces, spec.seed, mesh, rules, spec.architecture, spec.lora)
        self.abstract_base = self.abstract_policy  # the tree an 'lm' input is read into
        if spec.lora is not None:
            self.abstract_policy, self.abstract_base = lora_lib.split(self.abstract_policy)
        self.param_sh = jax.tree.map(lambda a: a.sharding, self.abstract_policy)
        self.judge, self.ref, self.judge_params = None, None, None
        self.base_sha256 = None
        if spec.role == "policy":
            self.ref = self._load(spec.ref)
            self.judge, self.judge_params = (None, None) if spec.judge is None else self._load_judge(spec.judge,
                                                                                                     host_oracle)
            if run.frozen_dtype:  # config.frozen_dtype: the frozen trees' matrices stored in bf16 (shardings kept)
                self.ref, self.judge_params = (None if p is None else models.cast_storage(p, run.frozen_dtype)
                                               for p in (self.ref, self.judge_params))
        if spec.lora is not None:  # the frozen base (mu), in the adapted structure with zero adapters
            base = (self.ref if spec.role == "policy" else self._load_backbone(spec.init) if spec.role == "judge"
                    else self._load(spec.init))
            if not abstract:
                self.base_sha256 = ckpt_lib.params_sha256(base)
            zeros = self.abstract_policy if abstract else jax.jit(
                lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract_policy),
                out_shardings=self.param_sh)()
            self.ref = lora_lib.join(zeros, base)
        # the step's frozen inputs: mu and the judge (policy stages), or the LoRA base (SFT and judge stages)
        self.frozen = (Frozen(ref=self.ref, judge=self.judge_params) if spec.role == "policy"
                       else Frozen(base=self.ref))

    def full_params(self, trained):
        """The parameters the stage's model runs with: `trained` itself, or the base joined with its adapters."""
        if self.spec.lora is None or trained is None:
            return trained
        return lora_lib.join(trained, lora_lib.split(self.ref)[1])

    def plain_shardings(self):
        """The shardings of the stage's model without adapters (the tree a LoRA stage exports, merged)."""
        spec, run = self.spec, self.run
        _, plain, _ = abstract_params(spec.model, spec.algorithm.produces, 0, run.mesh, run.rules, spec.architecture)
        return jax.tree.map(lambda a: a.sharding, plain)

    def init_policy(self):
        """The parameters step 0 starts from."""
        spec = self.spec
        start = spec.init or (spec.ref if spec.role == "policy" else None)
        if start is None or spec.lora is not None:  # random, or fresh adapters on the frozen base
            return self._initialise()
        if spec.role == "judge" and start.produces == "lm":  # the decoder of an 'lm' stage, a fresh score head
            return nnx.merge_state(self._initialise(), self._load_backbone(start))
        return self._load(start)

    def _load_backbone(self, inp: Input):
        """{'backbone': the decoder of the 'lm' stage `inp`}: the part of a judge read from a language model."""
        _, abstract_lm, _ = abstract_params(self.spec.model, "lm", 0, self.run.mesh, self.run.rules)
        if self.abstract:
            return nnx.State({"backbone": self.abstract_base["backbone"]})
        return nnx.State({"backbone": load_export(self.run.workdir, inp.value, abstract_lm)})

    def _load(self, inp: Input):
        """Parameters of an 'lm'-shaped input of this stage's model: an earlier stage's export or a checkpoint."""
        if self.abstract:
            return self.abstract_base
        if inp.kind == "hf":
            return load_pretrained_input(inp.value, self.spec.model,
                                         jax.tree.map(lambda a: a.sharding, self.abstract_base))
        return load_export(self.run.workdir, inp.value, self.abstract_base)

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
