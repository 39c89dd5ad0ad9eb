"""Training configuration: the stage schema, `stage()` to build one, and stage fingerprints.

A training config (`configs/*.py`, `job = "train"`) holds

    seed, model, judge_model, mesh, rules (logical-axis rules, e.g. "batch=data+fsdp,embed=fsdp"; "" = the
    defaults of nash_lm.parallel), peak_tflops, async_checkpoints,
    data      kind 'synthetic' (SyntheticConfig: generated token data, for tests and the tiny pipeline) or
              'records' (the user's files: every stage names its `train_data` and `eval_data`, JSONL or
              ArrayRecord; tokenizer, chat template, truncation and the bad-row policy are fields of
              `nash_lm.train.data.RecordsConfig`),
    pipeline  "sft,pm,rm,nash_md"   (comma-separated stage names, run in this order)
    stages    {name: stage config}

Each stage config is built by `stage(algorithm, **overrides)` from the common defaults below and the algorithm's
own fields (its record in `nash_lm.train.algorithms`), so every field exists in the file and
`--config.stages.<name>.<field>=v` overrides are checked by ml_collections. `nash_lm.train.spec.resolve` checks
a whole config (unknown fields, ranges, inputs) with one ValueError naming the field, before anything is
compiled or written.

Stage inputs are stage names: `init` (parameters to start from), `ref` (the frozen reference mu) and `judge`
(a 'preference' or 'reward' stage; `oracle:module:function` for a JAX preference function traced into the step;
`host_oracle:module:function` for any Python callable called between compiled pieces of the step; or
`host_oracle`, the callable the running task job hands to the pipeline). A judge stage's `init` may name an
'lm' stage (e.g. the SFT stage, with `judge_model == model`): its decoder becomes the judge's backbone and only
the score head starts from random.

`init` of an 'lm' stage (SFT or policy) and `ref` of a policy stage may instead be `hf:/abs/dir`, a local
Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json; Llama, Gemma or Qwen2; never a
hub name). `check_hf_input` checks it before anything is compiled or written: the directory and files exist,
its model_type is `config.model.architecture` ('llama' when the field is absent), its shapes match
`config.model`, every tensor name/shape/dtype from the safetensors headers, and the tokenizer fits the
vocabulary. Its path and a SHA-256 of its files go into the stage fingerprint, so a changed checkpoint is
refused on resume.

LoRA (`lora_rank` > 0, any stage): the stage trains low-rank adapters on a frozen base (its `ref` for a policy
stage, which is then also mu = the base with the adapters off; its `init` for SFT; its `init` language model's
decoder as a judge's backbone, whose fresh head trains with the adapters); only the adapters are optimised,
averaged (EMA) and checkpointed, and the stage exports the adapters merged into a plain parameter tree (and the adapters alone, `nash_lm.train.stage`). `lora_config(st)` is the stage's
`nash_lm.models.lora.LoRAConfig` (None when off). `config.model.architecture` ('llama' | 'gemma' | 'qwen2', optional) selects the decoder
variant (`nash_lm.interop.variants`); judge models are Llama-architecture only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os

import ml_collections

from nash_lm.data.synthetic import SyntheticConfig
from nash_lm.train import algorithms

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
    train_data="",  # records files (config.data.kind = 'records'): comma-separated JSONL / ArrayRecord paths
    eval_data="",
    log_every=10,
    checkpoint_every=50,
    keep_checkpoints=2,
    eval_every=0,  # 0 = evaluate at the end only
    eval_batches=2,
    lora_rank=0,  # > 0: train low-rank adapters of this rank on a frozen base (nash_lm.models.lora); 0 = off
    lora_alpha=16.0,  # the adapters' low-rank term is scaled by lora_alpha / lora_rank
    lora_targets="q,k,v,o,gate,up,down",  # the adapted projections (comma-separated)
)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")  # in a stage's fingerprint only when lora_rank > 0
# Fields that change how a run is observed, not what it computes: excluded from the stage fingerprint.
OPERATIONAL = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches")
HF_PREFIX = "hf:"  # init/ref from a local Hugging Face checkpoint directory
ORACLE_PREFIXES = ("oracle:", "host_oracle:")
HOST_ORACLE = "host_oracle"  # judge: the Python callable the running job hands to the pipeline
ARCHITECTURES = ("llama", "gemma", "qwen2")
TOP_LEVEL = ("job", "seed", "model", "judge_model", "data", "mesh", "rules", "pipeline", "stages", "peak_tflops",
             "async_checkpoints")
# Optional top-level fields: decode_rules, the layout the policy steps' sampler re-lays the policy and mu to once
# per step ('' = nash_lm.parallel.DEFAULT_DECODE_RULES, weights whole per tensor group; 'tensor' =
# parallel.tensor_decode_rules, tensor-parallel over the mesh axes that divide the model's KV heads and d_ff, for
# models whose copy does not fit a device; 'training' = the training layout itself; or
# explicit rules in the syntax of `rules`); frozen_dtype, the storage dtype of the policy stages' frozen trees (the
# reference mu and a model judge): '' (= their masters' dtype, float32) or 'bfloat16' (half the bytes per chip;
# the forward passes cast weights to the compute dtype at use either way).
OPTIONAL_TOP_LEVEL = ("decode_rules", "frozen_dtype")
FROZEN_DTYPES = ("", "float32", "bfloat16")


def stage_fields(algorithm: str) -> dict:
    """Every field of a stage of `algorithm` with its default: the common ones, then the algorithm's own."""
    return {**_COMMON, "algorithm": algorithm, **algorithms.get(algorithm).fields}


def stage(algorithm: str, **overrides) -> ml_collections.ConfigDict:
    """A stage config with every field of `algorithm` at its default, then `overrides` (unknown names raise)."""
    fields = stage_fields(algorithm)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"stage({algorithm!r}): unknown field(s) {unknown}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def lora_config(st):
    """The `LoRAConfig` of a stage (None when `lora_rank` is 0); checked against the model by `spec.resolve`."""
    from nash_lm.models import lora

    if not st.get("lora_rank", 0):
        return None
    targets = tuple(t.strip() for t in str(st.lora_targets).split(",") if t.strip())
    return lora.LoRAConfig(rank=int(st.lora_rank), alpha=float(st.lora_alpha), targets=targets)


def pipeline(config) -> list[str]:
    return [s.strip() for s in str(config.pipeline).split(",") if s.strip()]


def produces(algorithm: str) -> str:
    """What a stage of `algorithm` exports: 'lm', 'preference' or 'reward' parameters."""
    return algorithms.get(algorithm).produces


def resolve_oracle(spec: str):
    """`oracle:pkg.mod:fn` / `host_oracle:pkg.mod:fn` -> the callable."""
    _, module_name, fn_name = spec.split(":")
    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import {module_name}:{fn_name} ({e})") from None


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


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


def check_hf_input(config, name: str, field: str, where: str = "") -> None:
    """Checks a `hf:` stage input against `config.model` without reading any tensor data (one-line errors)."""
    from nash_lm.interop import hf

    where = where or f"config.stages.{name}.{field}"
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


def decode_rules(config, mesh):
    """The validated `decode_rules` of a config (see OPTIONAL_TOP_LEVEL); None = the training layout."""
    from nash_lm import parallel

    text = config.get("decode_rules", "")
    if not isinstance(text, str):
        _fail("config.decode_rules", f"expected a string, got {text!r}")
    if text == "tensor":  # over the mesh axes that divide the KV heads: the KV cache stays local
        mc = model_config(config, "model")
        return parallel.tensor_decode_rules(mesh, mc.n_kv_heads, mc.d_ff)
    named = {"": parallel.DEFAULT_DECODE_RULES, "training": None}
    if text in named:
        return named[text]
    try:
        return parallel.validate_rules(parse_rules(text, "config.decode_rules"), mesh)
    except ValueError as e:
        _fail("config.decode_rules", str(e).splitlines()[0])


def frozen_dtype(config) -> str | None:
    """The validated `frozen_dtype` of a config (see OPTIONAL_TOP_LEVEL): None (stored as trained) or 'bfloat16'."""
    value = config.get("frozen_dtype", "")
    if value not in FROZEN_DTYPES:
        _fail("config.frozen_dtype", f"{value!r} not in {list(FROZEN_DTYPES)}")
    return value if value not in ("", "float32") else None


def parse_rules(text: str, where: str = "config.rules"):
    """'batch=data+fsdp,embed=fsdp,kv=' -> (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('kv', None));
    '' -> None (the defaults of nash_lm.parallel). Priority is the order given."""
    if not text:
        return None
    rules = []
    for item in text.split(","):
        if "=" not in item:
            _fail(where, f"expected 'logical=mesh_axis[+mesh_axis]', got {item!r}")
        logical, axes = (t.strip() for t in item.split("=", 1))
        parts = tuple(a for a in axes.split("+") if a)
        rules.append((logical, parts if len(parts) > 1 else (parts[0] if parts else None)))
    return tuple(rules)


DATA_KINDS = ("synthetic", "records")


def data_config(config):
    """`config.data` checked: a `SyntheticConfig` (kind 'synthetic', the default) or a
    `nash_lm.train.data.RecordsConfig` (kind 'records': every stage names its files)."""
    given = dict(config.data)
    kind = given.pop("kind", "synthetic")
    if kind not in DATA_KINDS:
        _fail("config.data.kind", f"{kind!r} not in {list(DATA_KINDS)}")
    if kind == "records":
        from nash_lm.train import data as data_lib

        return data_lib.records_config(given)
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
    dropped = OPERATIONAL + (() if st.get("lora_rank", 0) else LORA_FIELDS)  # stages without adapters: as before
    fp = {
        "stage": {k: v for k, v in to_jsonable(st).items() if k not in dropped},
        "model": to_jsonable(config.judge_model if algorithms.get(st.algorithm).role == "judge" else config.model),
        "data": to_jsonable(config.data),
        "seed": config.seed,
        "inputs": {},
    }
    if algorithms.get(st.algorithm).role == "policy" and frozen_dtype(config):  # absent when unset: old runs resume
        fp["frozen_dtype"] = frozen_dtype(config)
    if config.data.get("kind", "synthetic") == "records":
        from nash_lm.train import data as data_lib

        for field in ("train_data", "eval_data"):
            files = data_lib.paths(st[field])
            if files and all(os.path.isfile(f) for f in files):
                fp["inputs"][field] = {"files": files, "sha256": data_lib.files_sha256(files)}
        if config.data.get("tokenizer", ""):
            tok = os.path.abspath(os.path.expanduser(config.data.tokenizer))
            if os.path.isfile(tok):
                fp["inputs"]["tokenizer"] = {"file": tok, "sha256": data_lib.files_sha256([tok])}
    for field in ("init", "ref", "judge"):
        ref = st.get(field, "")
        if field in ("init", "ref") and ref.startswith(HF_PREFIX):
            fp["inputs"][field] = hf_input_fingerprint(ref, f"config.stages.{name}.{field}")
        elif ref and ref in config.stages:
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
