"""Training configuration: the stage schema, `stage()` to build one, `validate()` and stage fingerprints.

A training config (`configs/*.py`, `job = "train"`) holds

    seed, model, judge_model, data, mesh, rules (logical-axis rules, e.g. "batch=data+fsdp,embed=fsdp"; "" = the
    defaults of nash_lm.parallel), peak_tflops, async_checkpoints,
    pipeline  "sft,pm,rm,nash_md"   (comma-separated stage names, run in this order)
    stages    {name: stage config}

Each stage config is built by `stage(algorithm, **overrides)` from the defaults below, so every field exists in
the file and `--config.stages.<name>.<field>=v` overrides are checked by ml_collections; `validate()` rejects
unknown fields and out-of-range values with one ValueError naming the field, before anything is compiled or
written.

Stage inputs are stage names: `init` (parameters to start from), `ref` (the frozen reference mu) and `judge`
(a 'preference' or 'reward' stage, or `oracle:module:function` for a JAX preference function traced into the
step, or `host_oracle:module:function` for any Python callable called between two compiled halves). A judge
stage's `init` may name an 'lm' stage (e.g. the SFT stage, with `judge_model == model`): its decoder becomes the
judge's backbone and only the score head starts from random.

`init` of an 'lm' stage (SFT or policy) and `ref` of a policy stage may instead be `hf:/abs/dir`, a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json; Llama, Gemma or Qwen2; never a
hub name). It is checked here, before anything is compiled or written: the directory and files exist, its
model_type is `config.model.architecture` ('llama' when the field is absent), its shapes match `config.model`,
every tensor name/shape/dtype from the safetensors headers, and the tokenizer fits the vocabulary. Its path
and a SHA-256 of its files go into the stage fingerprint, so a changed checkpoint is refused on resume.
`config.model.architecture` ('llama' | 'gemma' | 'qwen2', optional) selects the decoder variant the loop builds
(`nash_lm.interop.variants`); judge models are Llama-architecture only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os

import ml_collections

from nash_lm.data.synthetic import SyntheticConfig

POLICY_ALGORITHMS = ("nash_md_pg", "nash_ema_pg", "rlhf", "online_ipo", "ipo_md")
JUDGE_ALGORITHMS = ("preference", "reward")
ALGORITHMS = ("sft",) + JUDGE_ALGORITHMS + POLICY_ALGORITHMS
LR_SCHEDULES = ("constant", "linear", "cosine")

_COMMON = dict(
    algorithm="",
    steps=100,
    batch_size=8,
    lr=1e-4,
    lr_schedule="constant",  # constant | linear (decay to 0) | cosine (decay to 0); after linear warmup
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip=1.0,  # global-norm clip; 0 disables
    b1=0.9,
    b2=0.999,
    init="",  # stage whose output parameters initialise this one ('' = random init), or 'hf:/abs/checkpoint_dir'
    log_every=10,
    checkpoint_every=50,
    keep_checkpoints=2,
    eval_every=0,  # 0 = evaluate at the end only
    eval_batches=2,
)
_EXTRA = {
    "sft": dict(prompt_loss_weight=0.0),  # > 0: also teacher-force the prompt tokens, with this weight
    "preference": dict(labels="soft"),  # soft | hard
    "reward": dict(labels="soft"),
    "nash_md_pg": dict(ref="", judge="", tau=0.1, beta=0.125, temperature=1.0, max_new_tokens=8),
    "nash_ema_pg": dict(ref="", judge="", tau=0.1, ema_decay=0.999, temperature=1.0, max_new_tokens=8),
    "rlhf": dict(ref="", judge="", tau=0.05, temperature=1.0, max_new_tokens=8),
    "online_ipo": dict(ref="", judge="", tau=1.0, temperature=1.0, max_new_tokens=8),
    "ipo_md": dict(ref="", judge="", tau=1.0, beta=0.125, temperature=1.0, max_new_tokens=8),
}
# Fields that change how a run is observed, not what it computes: excluded from the stage fingerprint.
OPERATIONAL = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches")
HF_PREFIX = "hf:"  # init/ref from a local Hugging Face checkpoint directory
ARCHITECTURES = ("llama", "gemma", "qwen2")
TOP_LEVEL = ("job", "seed", "model", "judge_model", "data", "mesh", "rules", "pipeline", "stages", "peak_tflops",
             "async_checkpoints")


def stage_fields(algorithm: str) -> dict:
    if algorithm not in _EXTRA:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    return {**_COMMON, "algorithm": algorithm, **_EXTRA[algorithm]}


def stage(algorithm: str, **overrides) -> ml_collections.ConfigDict:
    """A stage config with every field of `algorithm` at its default, then `overrides` (unknown names raise)."""
    fields = stage_fields(algorithm)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"stage({algorithm!r}): unknown field(s) {unknown}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def pipeline(config) -> list[str]:
    return [s.strip() for s in str(config.pipeline).split(",") if s.strip()]


def produces(algorithm: str) -> str:
    """What a stage of `algorithm` exports: 'lm', 'preference' or 'reward' parameters."""
    return algorithm if algorithm in JUDGE_ALGORITHMS else "lm"


def resolve_oracle(spec: str):
    """`oracle:pkg.mod:fn` / `host_oracle:pkg.mod:fn` -> the callable."""
    _, module_name, fn_name = spec.split(":")
    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import {module_name}:{fn_name} ({e})") from None


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _check_stage(name: str, st, stages, order: list[str], completed: set):
    where = f"config.stages.{name}"
    algorithm = st.get("algorithm")
    if algorithm not in ALGORITHMS:
        _fail(f"{where}.algorithm", f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    allowed = stage_fields(algorithm)
    unknown = sorted(set(st.keys()) - set(allowed))
    if unknown:
        _fail(where, f"unknown field(s) {unknown} for algorithm {algorithm!r}")
    missing = sorted(set(allowed) - set(st.keys()))
    if missing:
        _fail(where, f"missing field(s) {missing} (build stages with nash_lm.train.config.stage())")
    for key, default in allowed.items():
        val = st[key]
        if isinstance(default, bool) or isinstance(default, str):
            ok = isinstance(val, type(default))
        elif isinstance(default, int):
            ok = isinstance(val, int) and not isinstance(val, bool)
        else:
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        if not ok:
            _fail(f"{where}.{key}", f"expected {type(default).__name__}, got {val!r}")
    if st.steps <= 0:
        _fail(f"{where}.steps", f"must be > 0, got {st.steps}")
    if st.batch_size <= 0:
        _fail(f"{where}.batch_size", f"must be > 0, got {st.batch_size}")
    if algorithm == "rlhf" and st.batch_size < 2:
        _fail(f"{where}.batch_size", "rlhf needs >= 2 sequences per batch (leave-one-out baseline)")
    if st.lr < 0:
        _fail(f"{where}.lr", f"must be >= 0, got {st.lr}")
    if st.lr_schedule not in LR_SCHEDULES:
        _fail(f"{where}.lr_schedule", f"{st.lr_schedule!r} not in {list(LR_SCHEDULES)}")
    if not 0 <= st.warmup_steps <= st.steps:
        _fail(f"{where}.warmup_steps", f"must be in [0, steps={st.steps}], got {st.warmup_steps}")
    for key in ("weight_decay", "grad_clip"):
        if st[key] < 0:
            _fail(f"{where}.{key}", f"must be >= 0, got {st[key]}")
    for key in ("b1", "b2"):
        if not 0 <= st[key] < 1:
            _fail(f"{where}.{key}", f"must be in [0, 1), got {st[key]}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        if st[key] < 1:
            _fail(f"{where}.{key}", f"must be >= 1, got {st[key]}")
    if st.eval_every < 0:
        _fail(f"{where}.eval_every", f"must be >= 0, got {st.eval_every}")
    if "labels" in st and st.labels not in ("soft", "hard"):
        _fail(f"{where}.labels", f"must be 'soft' or 'hard', got {st.labels!r}")
    if st.get("prompt_loss_weight", 0.0) < 0:
        _fail(f"{where}.prompt_loss_weight", f"must be >= 0, got {st.prompt_loss_weight}")
    if "beta" in st and not 0.0 <= st.beta <= 1.0:
        _fail(f"{where}.beta", f"must be in [0, 1], got {st.beta}")
    if "tau" in st:
        if st.tau < 0:
            _fail(f"{where}.tau", f"must be >= 0, got {st.tau}")
        if algorithm in ("online_ipo", "ipo_md") and st.tau == 0:
            _fail(f"{where}.tau", "must be > 0 for IPO (the target is 1/(2 tau))")
    if "ema_decay" in st and not 0.0 <= st.ema_decay < 1.0:
        _fail(f"{where}.ema_decay", f"must be in [0, 1), got {st.ema_decay}")
    if "temperature" in st and st.temperature <= 0:
        _fail(f"{where}.temperature", f"must be > 0, got {st.temperature}")
    if "max_new_tokens" in st and st.max_new_tokens < 1:
        _fail(f"{where}.max_new_tokens", f"must be >= 1, got {st.max_new_tokens}")

    def check_input(field: str, kinds: tuple[str, ...]):
        ref = st[field]
        if ref.startswith(HF_PREFIX):  # the checkpoint itself is checked by check_hf_input (needs config.model)
            if "lm" not in kinds:
                _fail(f"{where}.{field}", f"{ref!r}: a Hugging Face checkpoint holds 'lm' parameters, expected one "
                                          f"of {list(kinds)}")
            hf_path(ref, f"{where}.{field}")
            return
        if ref not in stages:
            _fail(f"{where}.{field}", f"missing stage input {ref!r}: no such stage in config.stages")
        if ref in order[: order.index(name)] or ref in completed:
            kind = produces(stages[ref].algorithm)
        elif ref in order:
            _fail(f"{where}.{field}", f"stage {ref!r} runs after {name!r} in config.pipeline")
        else:
            _fail(f"{where}.{field}", f"missing stage input {ref!r}: not an earlier stage of config.pipeline "
                                      f"and not a completed stage in the workdir")
        if kind not in kinds:
            _fail(f"{where}.{field}", f"stage {ref!r} produces {kind!r} parameters, expected one of {list(kinds)}")

    if st.init:  # a policy stage without init starts from its reference
        # a judge may start from an 'lm' stage: its decoder becomes the judge's backbone, the head starts fresh
        if algorithm in JUDGE_ALGORITHMS and st.init.startswith(HF_PREFIX):
            _fail(f"{where}.init", f"{st.init!r}: a judge starts from an earlier stage of the pipeline (e.g. the "
                                   f"SFT stage), not from a Hugging Face checkpoint")
        check_input("init", (produces(algorithm),) + (("lm",) if algorithm in JUDGE_ALGORITHMS else ()))
    if algorithm in POLICY_ALGORITHMS:
        if not st.ref:
            _fail(f"{where}.ref", "a policy-optimisation stage needs a reference stage (e.g. the SFT stage)")
        check_input("ref", ("lm",))
        judge = st.judge
        if judge.startswith(("oracle:", "host_oracle:")):
            if algorithm == "rlhf":
                _fail(f"{where}.judge", "rlhf trains against a Bradley-Terry reward stage, not a preference oracle")
            if judge.count(":") != 2:
                _fail(f"{where}.judge", f"expected 'oracle:module:function', got {judge!r}")
            if not callable(resolve_oracle(judge)):
                _fail(f"{where}.judge", f"{judge!r} is not callable")
        elif not judge:
            _fail(f"{where}.judge", "a policy-optimisation stage needs a judge (preference/reward stage or oracle)")
        else:
            check_input("judge", ("reward",) if algorithm == "rlhf" else ("preference", "reward"))


def validate(config, *, completed=(), data_parallel: int = 1) -> None:
    """Raises ValueError naming the first bad field. `completed`: stages complete in the workdir."""
    completed = set(completed)
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL))
    if unknown:
        _fail("config", f"unknown top-level field(s) {unknown}")
    missing = sorted(set(TOP_LEVEL) - set(config.keys()))
    if missing:
        _fail("config", f"missing top-level field(s) {missing}")
    if not isinstance(config.seed, int) or config.seed < 0:
        _fail("config.seed", f"must be a non-negative int, got {config.seed!r}")
    data = data_config(config)
    for key in ("model", "judge_model"):
        mc = model_config(config, key)
        if mc.vocab_size != data.vocab_size:
            _fail(f"config.{key}.vocab_size", f"{mc.vocab_size} != config.data.vocab_size {data.vocab_size}")
    if config.peak_tflops < 0:
        _fail("config.peak_tflops", f"must be >= 0 (0 = measure), got {config.peak_tflops}")
    order = pipeline(config)
    if not order:
        _fail("config.pipeline", "empty")
    if len(set(order)) != len(order):
        _fail("config.pipeline", f"repeats a stage: {order}")
    for name in order:
        if name not in config.stages:
            _fail("config.pipeline", f"stage {name!r} is not defined in config.stages")
    for key in ("model", "judge_model"):
        arch = model_architecture(config, key)
        if key == "judge_model" and arch != "llama":
            _fail(f"config.{key}.architecture", f"{arch!r}: preference and reward models are 'llama' only")
        if arch != "llama" and model_config(config, key).scan_layers:
            _fail(f"config.{key}.scan_layers", f"True is not supported for architecture {arch!r} (llama only)")
    for name in order:
        st = config.stages[name]
        _check_stage(name, st, config.stages, order, completed)
        for field in ("init", "ref"):
            if str(st.get(field, "")).startswith(HF_PREFIX):
                check_hf_input(config, name, field)
        if (st.algorithm in JUDGE_ALGORITHMS and st.init in config.stages
                and produces(config.stages[st.init].algorithm) == "lm"
                and model_config(config, "judge_model") != model_config(config, "model")):
            _fail(f"config.stages.{name}.init", f"{st.init!r} is a language model: starting a judge from its "
                                                f"decoder needs config.judge_model == config.model")
        if st.batch_size % data_parallel:
            _fail(f"config.stages.{name}.batch_size",
                  f"{st.batch_size} is not divisible by the data-parallel size {data_parallel}")
        if st.batch_size > data.n_examples:
            _fail(f"config.stages.{name}.batch_size", f"{st.batch_size} exceeds data.n_examples {data.n_examples}")
        if "max_new_tokens" in st and st.max_new_tokens > data.response_len:
            _fail(f"config.stages.{name}.max_new_tokens",
                  f"{st.max_new_tokens} exceeds data.response_len {data.response_len}")


def model_config(config, key: str = "model"):
    """The `ModelConfig` of `config.<key>` (its optional `architecture` field is read by `model_architecture`)."""
    from nash_lm.models import ModelConfig

    fields = config[key].to_dict() if hasattr(config[key], "to_dict") else dict(config[key])
    fields.pop("architecture", None)
    try:
        return ModelConfig.from_config(fields)
    except (TypeError, ValueError) as e:
        _fail(f"config.{key}", str(e).splitlines()[0])


def model_architecture(config, key: str = "model") -> str:
    """`config.<key>.architecture`: 'llama' (the default, also when the field is absent), 'gemma' or 'qwen2'."""
    arch = config[key].get("architecture", "llama")
    if arch not in ARCHITECTURES:
        _fail(f"config.{key}.architecture", f"{arch!r} not in {list(ARCHITECTURES)}")
    return arch


def hf_path(spec: str, where: str) -> str:
    """`hf:/abs/dir` -> '/abs/dir' (`~` expanded). Only local absolute paths: nothing is fetched from a hub."""
    path = os.path.expanduser(spec[len(HF_PREFIX):])
    if not path or not os.path.isabs(path):
        _fail(where, f"{spec!r}: expected 'hf:/absolute/path/to/checkpoint_dir' (a local directory; nothing is "
                     f"downloaded from a hub)")
    return os.path.normpath(path)


def check_hf_input(config, name: str, field: str) -> None:
    """Checks a `hf:` stage input against `config.model` without reading any tensor data (one-line errors)."""
    from nash_lm.interop import hf

    where = f"config.stages.{name}.{field}"
    path = hf_path(config.stages[name][field], where)
    mc, arch = model_config(config, "model"), model_architecture(config, "model")
    try:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        found = hf.architecture(hf.read_config(path))
        if found != arch:
            raise ValueError(f"{path}: checkpoint is a {found!r} model (config.json model_type) but "
                             f"config.model.architecture is {arch!r}")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json (a checkpoint used for training needs its tokenizer)")
        hf.check_pretrained(path, mc)
    except (ValueError, OSError) as e:
        _fail(where, str(e).strip().splitlines()[0])


def hf_input_fingerprint(spec: str, where: str) -> dict:
    """{'hf': path, 'sha256': content hash of the checkpoint's files} of a `hf:` stage input."""
    from nash_lm.interop import hf

    path = hf_path(spec, where)
    try:
        return {"hf": path, "sha256": hf.checkpoint_sha256(path)}
    except (ValueError, OSError) as e:
        _fail(where, str(e).strip().splitlines()[0])


def parse_rules(text: str):
    """'batch=data+fsdp,embed=fsdp,kv=' -> (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('kv', None));
    '' -> None (the defaults of nash_lm.parallel). Priority is the order given."""
    if not text:
        return None
    rules = []
    for item in text.split(","):
        if "=" not in item:
            _fail("config.rules", f"expected 'logical=mesh_axis[+mesh_axis]', got {item!r}")
        logical, axes = (t.strip() for t in item.split("=", 1))
        parts = tuple(a for a in axes.split("+") if a)
        rules.append((logical, parts if len(parts) > 1 else (parts[0] if parts else None)))
    return tuple(rules)


def data_config(config) -> SyntheticConfig:
    given = dict(config.data)
    kind = given.pop("kind", "synthetic")
    if kind != "synthetic":
        _fail("config.data.kind", f"only 'synthetic' is available here, got {kind!r}")
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        _fail("config.data", f"unknown field(s) {unknown}; known: {sorted(fields | {'kind'})}")
    try:
        return SyntheticConfig(**given).validate()
    except ValueError as e:
        _fail("config.data", str(e))


def to_jsonable(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(config), sort_keys=True).encode()).hexdigest()


def stage_fingerprint(config, name: str) -> dict:
    """Everything that determines a stage's result: its computational fields, the model and data configs, the
    seed and (recursively) the fingerprints of its input stages. Operational fields are left out."""
    st = config.stages[name]
    fp = {
        "stage": {k: v for k, v in to_jsonable(st).items() if k not in OPERATIONAL},
        "model": to_jsonable(config.judge_model if st.algorithm in JUDGE_ALGORITHMS else config.model),
        "data": to_jsonable(config.data),
        "seed": config.seed,
        "inputs": {},
    }
    for field in ("init", "ref", "judge"):
        ref = st.get(field, "")
        if field in ("init", "ref") and ref.startswith(HF_PREFIX):
            fp["inputs"][field] = hf_input_fingerprint(ref, f"config.stages.{name}.{field}")
        elif ref and ref in config.stages and not ref.startswith(("oracle:", "host_oracle:")):
            fp["inputs"][field] = fingerprint_hash(stage_fingerprint(config, ref))
    return fp


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
