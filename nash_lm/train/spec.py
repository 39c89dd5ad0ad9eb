"""Stage specifications: a training config resolved once into typed, validated specs, with one error style.

`resolve(config, workdir)` is the one place where a training config (`nash_lm.train.config`'s schema) is read
and checked; every job (`train`, the task jobs) calls it before anything is compiled or written. It returns a
`RunSpec` (mesh, rules, data shapes, peak FLOP/s setting, the stages in pipeline order) whose `StageSpec`s carry
everything a stage needs: its algorithm's registry record, its fields, model config and architecture, its
resolved inputs (`init`, `ref`, `judge`: an earlier stage, a `hf:` checkpoint or an oracle), its seed and its
fingerprint. Every problem is a `ValueError` whose message starts with the field it names
(`config.stages.md1.beta: must be in [0, 1], got 1.5`); `nash_lm.main` prints it as one line, exit code 2.

What is checked: top-level fields, the mesh and the logical-axis rules, model and data configs, each stage's
fields (unknown or missing names, types, ranges, its algorithm's own rules, its adapters: targets, rank against
the model's projections, a base to adapt), its inputs (they exist, run
earlier or are complete in the workdir, produce the right kind of parameters; `hf:` checkpoints against
`config.model` without reading tensor data), batch divisibility by the data-parallel size, and every existing
stage directory's fingerprint in the workdir (a workdir holding a checkpoint of an incompatible config is
refused, naming the differing fields). The number of examples is checked against the batch size here for the
synthetic data of the `train` job; data a job provides is checked when a stage receives it
(`nash_lm.train.pipeline`).

`origins` maps a stage name to the config path its fields came from (a task job's template), so that an error
names the field the user wrote: `config.online.policy.lr (stage enh_main2): ...`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable

import numpy as np

from nash_lm import parallel
from nash_lm.data import synthetic
from nash_lm.data import tokenizer as tokenizer_lib
from nash_lm.train import algorithms, schedules
from nash_lm.train import config as cfg_lib
from nash_lm.train import data as data_lib
from nash_lm.train.config import HF_PREFIX, HOST_ORACLE, ORACLE_PREFIXES, _fail


@dataclasses.dataclass(frozen=True)
class Input:
    """A resolved stage input: `kind` 'stage' (value: its name), 'hf' (value: the checkpoint directory),
    'oracle' / 'host_oracle' (value: 'module:function', or '' for the job's host oracle)."""

    kind: str
    value: str
    produces: str = ""  # 'lm' | 'preference' | 'reward' for stage and hf inputs


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    algorithm: algorithms.Algorithm
    st: Any  # the stage's ConfigDict (every field present and checked)
    model: Any  # nash_lm.models.ModelConfig of the model this stage trains
    architecture: str
    seed: int
    init: Input | None
    ref: Input | None
    judge: Input | None
    fingerprint: dict
    fingerprint_hash: str
    lora: Any = None  # nash_lm.models.lora.LoRAConfig of a stage that trains adapters, else None

    @property
    def role(self) -> str:
        return self.algorithm.role

    @property
    def steps(self) -> int:
        return int(self.st.steps)

    @property
    def batch_size(self) -> int:
        return int(self.st.batch_size)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    config: Any  # the training ConfigDict
    workdir: str
    mesh: Any
    rules: Any
    data: Any  # nash_lm.data.synthetic.SyntheticConfig: the array shapes (and the synthetic data of `train`)
    stages: dict  # name -> StageSpec, in pipeline order
    data_parallel: int
    decode_rules: Any = None  # the sampler's layout of the policy steps (None: the training layout)
    pad_id: int = synthetic.PAD_ID  # the token ids of the data's tokenizer (the sampler's padding and stop)
    eos_id: int = synthetic.EOS_ID
    sources: dict = dataclasses.field(default_factory=dict)  # stage -> {split: data.RecordSource} (records runs)
    tokenizer: Any = None  # the records run's tokenizer
    frozen_dtype: Any = None  # storage dtype of the policy stages' reference and judge (None: as trained)

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    def peak_flops(self) -> float:
        """Peak FLOP/s per device for MFU: `config.peak_tflops`, or a matmul measured now when it is 0."""
        from nash_lm.train import metrics

        if self.config.peak_tflops > 0:
            return float(self.config.peak_tflops) * 1e12
        return metrics.measure_peak_flops()


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", name)


def stage_seed(config, name: str) -> int:
    return (int(config.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def data_parallel_size(mesh, rules) -> int:
    """Number of shards of the batch dimension under the rules."""
    spec = parallel.batch_sharding(mesh, rules, ndim=1).spec
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


# ---------------------------------------------------------------------------------------------------------------
# Field rules shared by every algorithm that has the field: (predicate, message)

_RANGES = {
    "steps": (lambda v, st: v > 0, "must be > 0"),
    "batch_size": (lambda v, st: v > 0, "must be > 0"),
    "lr": (lambda v, st: v >= 0, "must be >= 0"),
    "warmup_steps": (lambda v, st: 0 <= v <= st.steps, "must be in [0, steps={steps}]"),
    "weight_decay": (lambda v, st: v >= 0, "must be >= 0"),
    "grad_clip": (lambda v, st: v >= 0, "must be >= 0"),
    "b1": (lambda v, st: 0 <= v < 1, "must be in [0, 1)"),
    "b2": (lambda v, st: 0 <= v < 1, "must be in [0, 1)"),
    "log_every": (lambda v, st: v >= 1, "must be >= 1"),
    "checkpoint_every": (lambda v, st: v >= 1, "must be >= 1"),
    "keep_checkpoints": (lambda v, st: v >= 1, "must be >= 1"),
    "eval_batches": (lambda v, st: v >= 1, "must be >= 1"),
    "eval_every": (lambda v, st: v >= 0, "must be >= 0"),
    "prompt_loss_weight": (lambda v, st: v >= 0, "must be >= 0"),
    "beta": (lambda v, st: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "tau": (lambda v, st: v >= 0, "must be >= 0"),
    "ema_decay": (lambda v, st: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "temperature": (lambda v, st: v > 0, "must be > 0"),
    "max_new_tokens": (lambda v, st: v >= 1, "must be >= 1"),
    "microbatches": (lambda v, st: v >= 1 and st.batch_size % v == 0,
                     "must be a positive divisor of batch_size={batch_size}"),
    "missing_eos_penalty": (lambda v, st: v >= 0, "must be >= 0"),
    "lora_rank": (lambda v, st: v >= 0, "must be > 0 (or 0: no adapters)"),
    "lora_alpha": (lambda v, st: v > 0, "must be > 0"),
}
_CHOICES = {"lr_schedule": cfg_lib.LR_SCHEDULES, "labels": ("soft", "hard")}
_SCHEDULES = {"beta_schedule": (0.0, 1.0), "tau_schedule": (0.0, float("inf"))}  # the values' range


def _check_types(st, allowed: dict, where: Callable) -> None:
    for key, default in allowed.items():
        val = st[key]
        if isinstance(default, bool) or isinstance(default, str):
            ok = isinstance(val, type(default))
        elif isinstance(default, int):
            ok = isinstance(val, int) and not isinstance(val, bool)
        else:
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        if not ok:
            _fail(where(key), f"expected {type(default).__name__}, got {val!r}")


def _check_fields(name: str, st, where: Callable, stage_where: str) -> algorithms.Algorithm:
    algorithm = st.get("algorithm")
    if algorithm not in algorithms.REGISTRY:
        _fail(where("algorithm"), f"unknown algorithm {algorithm!r}; known: {list(algorithms.NAMES)}")
    alg = algorithms.REGISTRY[algorithm]
    allowed = cfg_lib.stage_fields(algorithm)
    unknown = sorted(set(st.keys()) - set(allowed))
    if unknown:
        _fail(stage_where, f"unknown field(s) {unknown} for algorithm {algorithm!r}")
    missing = sorted(set(allowed) - set(st.keys()))
    if missing:
        _fail(stage_where, f"missing field(s) {missing} (build stages with nash_lm.train.config.stage())")
    _check_types(st, allowed, where)
    for key in allowed:
        if key in _RANGES:
            ok, msg = _RANGES[key]
            if not ok(st[key], st):
                _fail(where(key), f"{msg.format(steps=st.steps, batch_size=st.batch_size)}, got {st[key]!r}")
        if key in _CHOICES and st[key] not in _CHOICES[key]:
            _fail(where(key), f"{st[key]!r} not in {list(_CHOICES[key])}")
        if key in _SCHEDULES:
            schedules.parse(st[key], where(key), *_SCHEDULES[key], st.steps)
    alg.check(st, where)
    return alg


def _check_lora(st, alg, model, init, where):
    """The stage's LoRAConfig (None without adapters), checked against its model and its inputs."""
    lora = cfg_lib.lora_config(st)
    if lora is None:
        return None
    if alg.role == "judge" and (init is None or init.produces != "lm"):
        _fail(where("init"), f"{st.init!r}: an adapted {alg.produces} model adapts a language model's decoder "
                             f"(its backbone, frozen): name an earlier 'lm' stage such as the SFT stage")
    try:
        lora.validate(model)
    except ValueError as e:
        field, msg = str(e).split(": ", 1)
        _fail(where(f"lora_{field}"), msg)
    if alg.role == "policy" and st.init and st.init != st.ref:
        _fail(where("init"), f"{st.init!r}: with adapters the policy is its reference {st.ref!r} (the frozen base) "
                             f"plus the adapters; leave init empty")
    if alg.role == "sft" and not st.init:
        _fail(where("init"), "adapters need a base to adapt: name the stage or 'hf:' checkpoint it starts from")
    return lora


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _completed(config, workdir) -> set:
    if not os.path.isdir(workdir):
        return set()
    return {name for name in config.stages.keys()
            if os.path.exists(os.path.join(stage_dir(workdir, name), "done.json"))}


def _stage_input(config, name: str, field: str, kinds: tuple, order: list, completed: set, where) -> Input:
    ref = config.stages[name][field]
    if ref.startswith(HF_PREFIX):
        if "lm" not in kinds:
            _fail(where(field), f"{ref!r}: a Hugging Face checkpoint holds 'lm' parameters, expected one of "
                                f"{list(kinds)}")
        return Input("hf", cfg_lib.hf_path(ref, where(field)), "lm")
    if ref not in config.stages:
        _fail(where(field), f"missing stage input {ref!r}: no such stage in config.stages")
    if ref in order[: order.index(name)] or ref in completed:
        kind = cfg_lib.produces(config.stages[ref].algorithm)
    elif ref in order:
        _fail(where(field), f"stage {ref!r} runs after {name!r} in config.pipeline")
    else:
        _fail(where(field), f"missing stage input {ref!r}: not an earlier stage of config.pipeline and not a "
                            f"completed stage in the workdir")
    if kind not in kinds:
        _fail(where(field), f"stage {ref!r} produces {kind!r} parameters, expected one of {list(kinds)}")
    return Input("stage", ref, kind)


def _judge_input(config, name, alg, order, completed, where, host_oracle: bool) -> Input:
    judge = config.stages[name].judge
    if judge == HOST_ORACLE or judge.startswith(ORACLE_PREFIXES):
        if not alg.oracles:
            _fail(where("judge"), f"{alg.name} trains against a Bradley-Terry reward stage, not a preference "
                                  f"oracle")
        if judge == HOST_ORACLE:
            if not host_oracle:
                _fail(where("judge"), "'host_oracle' is the oracle a task job hands to its stages; this job has "
                                      "none (name one as 'host_oracle:module:function')")
            return Input("host_oracle", "")
        if judge.count(":") != 2:
            _fail(where("judge"), f"expected 'oracle:module:function', got {judge!r}")
        if not callable(cfg_lib.resolve_oracle(judge)):
            _fail(where("judge"), f"{judge!r} is not callable")
        kind, value = judge.split(":", 1)
        return Input(kind, value)
    if not judge:
        _fail(where("judge"), "a policy-optimisation stage needs a judge (preference/reward stage or oracle)")
    return _stage_input(config, name, "judge", alg.judges, order, completed, where)


def _check_workdir(config, workdir, order) -> None:
    """Every stage directory that exists must have been written by a config with the same fingerprint."""
    needed = []  # inputs before the stages that read them, so the first mismatch reported is the root cause
    for name in order:
        st = config.stages[name]
        for ref in (st.get(f, "") for f in ("init", "ref", "judge")):
            if ref in config.stages and ref not in needed:
                needed.append(ref)
        if name not in needed:
            needed.append(name)
    for name in needed:
        path = os.path.join(stage_dir(workdir, name), "fingerprint.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            old = json.load(f)
        new = cfg_lib.stage_fingerprint(config, name)
        if old != new:
            diff = cfg_lib.fingerprint_diff(old, new)
            raise ValueError(
                f"workdir {workdir}: stage {name!r} holds a checkpoint of an incompatible config "
                f"(differs in {', '.join(diff[:6])}); use a fresh --workdir")


# ---------------------------------------------------------------------------------------------------------------
# The config as a whole


def _check_top_level(config) -> None:
    unknown = sorted(set(config.keys()) - set(cfg_lib.TOP_LEVEL) - set(cfg_lib.OPTIONAL_TOP_LEVEL))
    if unknown:
        _fail("config", f"unknown top-level field(s) {unknown}")
    missing = sorted(set(cfg_lib.TOP_LEVEL) - set(config.keys()))
    if missing:
        _fail("config", f"missing top-level field(s) {missing}")
    if not isinstance(config.seed, int) or config.seed < 0:
        _fail("config.seed", f"must be a non-negative int, got {config.seed!r}")
    if config.peak_tflops < 0:
        _fail("config.peak_tflops", f"must be >= 0 (0 = measure), got {config.peak_tflops}")


def resolve(config, workdir: str, *, origins: dict | None = None, host_oracle: bool = False,
            provided_data: bool = False, devices=None) -> RunSpec:
    """The validated `RunSpec` of training config `config` run in `workdir` (read, never written).

    `host_oracle`: the job hands a host oracle to the pipeline (stages may say `judge = 'host_oracle'`).
    `provided_data`: the job provides the stages' data (the batch sizes are checked against it on handover).
    `devices`: the mesh's devices (default `jax.devices()`; `nash_lm.aot` passes a TPU topology's)."""
    origins = origins or {}

    def wheres(name):
        prefix = origins.get(name)
        if prefix:
            return (lambda field: f"{prefix}.{field} (stage {name})"), f"{prefix} (stage {name})"
        return (lambda field: f"config.stages.{name}.{field}"), f"config.stages.{name}"

    workdir = os.path.abspath(workdir)
    _check_top_level(config)
    try:
        mesh = parallel.make_mesh(config.mesh, devices=devices)
        rules = parallel.validate_rules(cfg_lib.parse_rules(config.rules), mesh)
    except (TypeError, KeyError) as e:
        raise ValueError(f"config.mesh: {e}") from None
    dp = data_parallel_size(mesh, rules)
    decode_rules = cfg_lib.decode_rules(config, mesh)
    frozen_dtype = cfg_lib.frozen_dtype(config)
    data = cfg_lib.data_config(config)
    records = isinstance(data, data_lib.RecordsConfig)
    for key in ("model", "judge_model"):
        mc = cfg_lib.model_config(config, key)
        if not records and mc.vocab_size != data.vocab_size:
            _fail(f"config.{key}.vocab_size", f"{mc.vocab_size} != config.data.vocab_size {data.vocab_size}")
        arch = cfg_lib.model_architecture(config, key)
        if key == "judge_model" and arch != "llama":
            _fail(f"config.{key}.architecture", f"{arch!r}: preference and reward models are 'llama' only")
        if arch != "llama" and mc.scan_layers:
            _fail(f"config.{key}.scan_layers", f"True is not supported for architecture {arch!r} (llama only)")
    order = cfg_lib.pipeline(config)
    if not order:
        _fail("config.pipeline", "empty")
    if len(set(order)) != len(order):
        _fail("config.pipeline", f"repeats a stage: {order}")
    for name in order:
        if name not in config.stages:
            _fail("config.pipeline", f"stage {name!r} is not defined in config.stages")
    completed = _completed(config, workdir)

    stages = {}
    for name in order:
        st = config.stages[name]
        where, stage_where = wheres(name)
        alg = _check_fields(name, st, where, stage_where)
        model_key = "judge_model" if alg.role == "judge" else "model"
        init = ref = judge = None
        if st.init:  # a policy stage without init starts from its reference
            if alg.role == "judge" and st.init.startswith(HF_PREFIX):
                _fail(where("init"), f"{st.init!r}: a judge starts from an earlier stage of the pipeline (e.g. "
                                     f"the SFT stage), not from a Hugging Face checkpoint")
            # a judge may start from an 'lm' stage: its decoder becomes the judge's backbone, the head starts fresh
            kinds = (alg.produces,) + (("lm",) if alg.role == "judge" else ())
            init = _stage_input(config, name, "init", kinds, order, completed, where)
            if (alg.role == "judge" and init.produces == "lm"
                    and cfg_lib.model_config(config, "judge_model") != cfg_lib.model_config(config, "model")):
                _fail(where("init"), f"{st.init!r} is a language model: starting a judge from its decoder needs "
                                     f"config.judge_model == config.model")
        if alg.role == "policy":
            if not st.ref:
                _fail(where("ref"), "a policy-optimisation stage needs a reference stage (e.g. the SFT stage)")
            ref = _stage_input(config, name, "ref", ("lm",), order, completed, where)
            if alg.judged != "label":
                judge = _judge_input(config, name, alg, order, completed, where, host_oracle)
            elif st.judge:
                _fail(where("judge"), f"{st.judge!r}: {alg.name} learns from the labels of its pairs and takes no "
                                      f"judge; leave it empty")
        for field, inp in (("init", init), ("ref", ref)):
            if inp is not None and inp.kind == "hf":
                cfg_lib.check_hf_input(config, name, field, where(field))
        if st.batch_size % dp:
            _fail(where("batch_size"), f"{st.batch_size} is not divisible by the data-parallel size {dp}")
        for field in data_lib.SPLIT_FIELD.values():
            if st[field] and not records:
                _fail(where(field), "names records files, which need config.data.kind = 'records'")
            if records and not provided_data and not st[field]:
                _fail(where(field), f"required with config.data.kind = 'records' (JSONL or ArrayRecord files of "
                                    f"{data_lib.RECORD_KIND[alg.data]!r} records)")
        if not records and not provided_data and st.batch_size > data.n_examples:
            _fail(where("batch_size"), f"{st.batch_size} exceeds data.n_examples {data.n_examples}")
        if "max_new_tokens" in st and st.max_new_tokens > data.response_len:
            _fail(where("max_new_tokens"), f"{st.max_new_tokens} exceeds data.response_len {data.response_len}")
        lora = _check_lora(st, alg, cfg_lib.model_config(config, model_key), init, where)
        fp = cfg_lib.stage_fingerprint(config, name)
        stages[name] = StageSpec(
            name=name, algorithm=alg, st=st, model=cfg_lib.model_config(config, model_key),
            architecture=cfg_lib.model_architecture(config, model_key), seed=stage_seed(config, name),
            init=init, ref=ref, judge=judge, fingerprint=fp, fingerprint_hash=cfg_lib.fingerprint_hash(fp),
            lora=lora)
    tokens = {}
    if records:
        tokens = _records(config, data, stages, wheres)
    if os.path.isdir(workdir):
        _check_workdir(config, workdir, order)
    return RunSpec(config=config, workdir=workdir, mesh=mesh, rules=rules, data=data, stages=stages,
                   data_parallel=dp, decode_rules=decode_rules, frozen_dtype=frozen_dtype, **tokens)


def _records(config, data, stages: dict, wheres) -> dict:
    """The tokenizer of a records run checked against the models, and every stage's records read and checked."""
    hf_dirs = [inp.value for s in stages.values() for inp in (s.init, s.ref) if inp is not None and inp.kind == "hf"]
    tok = data_lib.run_tokenizer(data, hf_dirs)
    for key in ("model", "judge_model"):
        tokenizer_lib.check_fits(tok, cfg_lib.model_config(config, key).vocab_size, "config.data.tokenizer")
    p, r = data.prompt_len, data.response_len
    needs = {"model": p + r}
    if any(s.algorithm.produces == "preference" for s in stages.values()):
        needs["judge_model"] = p + 2 * r  # the preference model reads (x, y, y') in one sequence
    for key, length in needs.items():
        max_len = cfg_lib.model_config(config, key).max_len
        if length > max_len:
            _fail("config.data.prompt_len", f"prompt_len {p} + {'2 x ' if length > p + r else ''}response_len {r} = "
                                            f"{length} tokens exceed config.{key}.max_len {max_len}")
    chat = bool(data.chat_template and tok.chat_template)
    fmt = data_lib.TextFormat(tok, p, r, chat, data.truncation)
    read, reported = {}, set()
    for name, s in stages.items():
        if s.st.train_data:
            read[name] = data_lib.read_stage(name, s.st, s.algorithm.data, data, fmt, s.seed, wheres(name)[0],
                                             reported)
    data_lib.report_bad_rows(reported)
    return dict(sources=read, tokenizer=tok, pad_id=int(tok.pad_id), eos_id=int(tok.eos_id))
