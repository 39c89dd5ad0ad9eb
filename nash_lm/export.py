"""Export of a trained policy: `python -m nash_lm.export --workdir=DIR --out=OUT`.

Reads the `train` job's workdir (its `config.json` and the last policy stage's params export, or
`--stage=NAME`) and writes:

  OUT/params/        params-only orbax checkpoint {"policy": ...} in bfloat16 (`--params_dtype`), the layout
                     of `nash_lm.train.checkpoint.export_params`
  OUT/hf/            model.safetensors + config.json + generation_config.json for transformers'
                     LlamaForCausalLM (float32 by default, `--hf_dtype=bfloat16` halves it) and the tokenizer:
                     `--tokenizer` (a tokenizer.json), by default a records run's own (its `data.tokenizer` or its
                     hf: checkpoint's), whose BOS / EOS / padding ids are then the defaults of `--eos_id` /
                     `--pad_id`; the tokenizer files next to it (tokenizer_config.json with the special tokens and
                     the chat template, chat_template.jinja, special_tokens_map.json) and its directory's
                     generation_config.json (the EOS ids `generate` stops at) come along, so a chat model's
                     export is prompted and stops as its base checkpoint did
  OUT/sampler/       sampler.jaxexport: the jitted sampler serialized with `jax.export` (StableHLO, for the
                     platforms in `--platforms`), and sampler.json (static shapes, sampling settings, the
                     flat parameter names it takes). Inputs: (params {name: array}, prompts int32 [B, Tp]
                     left-padded, prompt_mask int32 [B, Tp], key uint32 [2] (raw threefry key data)) ->
                     {"tokens", "mask", "logp"} [B, N].
  OUT/export.json    manifest: source stage, params SHA-256, files, settings.

A LoRA stage's params export is already its adapters merged into the base (a plain tree), so the above is the
merged model. `--adapters_only` instead writes the adapters alone: OUT/adapters/ (orbax {policy[, ema]}: the
`nash_lm.models.lora` adapter trees), OUT/adapters.json (rank, alpha, targets, the base's SHA-256) and
OUT/export.json.

`load_sampler(OUT)` deserializes the sampler and binds the parameters of OUT/params, giving
`sample(prompts, prompt_mask, key_data) -> dict`; it needs nothing of nash-lm but jax and orbax.
Every bad input (no such workdir or stage, a stage that is not a policy) is one line and exit code 2; a failed
write (a full disk) is one line naming the path, and exit code 1. Everything is written to OUT.partial and
renamed to OUT when complete, so an export killed at any point leaves no OUT and the same command starts over.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined when run as a program, so that importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "The train job's workdir.")
    flags.DEFINE_string("out", None, "Output directory (created; must not hold an earlier export unless --overwrite).")
    flags.DEFINE_string("stage", "", "Stage to export (default: the last policy stage of the pipeline).")
    flags.DEFINE_enum("which", "policy", ["policy", "ema"], "Which parameters of the stage's export.")
    flags.DEFINE_enum("params_dtype", "bfloat16", ["bfloat16", "float32"], "dtype of OUT/params.")
    flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16"], "dtype of OUT/hf/model.safetensors.")
    flags.DEFINE_string("tokenizer", "", "tokenizer.json copied to OUT/hf ('': a records run's own, if any).")
    flags.DEFINE_integer("batch_size", 8, "Sampler batch size (static).")
    flags.DEFINE_integer("prompt_len", 0, "Sampler prompt length (static; 0 = the config's data.prompt_len).")
    flags.DEFINE_integer("max_new_tokens", 0, "Tokens to sample (0 = the config's data.response_len).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus filter (1 = off).")
    flags.DEFINE_integer("eos_id", None, "End-of-sequence id (-1 = never stop early; default: the tokenizer's, else 2).")
    flags.DEFINE_integer("pad_id", None, "Padding id (default: the tokenizer's, else 0).")
    flags.DEFINE_string("platforms", "cpu,cuda,tpu", "Comma-separated platforms to lower the sampler for.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing OUT.")
    flags.DEFINE_bool("adapters_only", False, "Write a LoRA stage's adapters alone (OUT/adapters, OUT/adapters.json).")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def flatten(pure: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested pure dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in pure.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        keys = name.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def run_tokenizer_json(config: dict) -> str:
    """The tokenizer.json a `train` run tokenized its records with ('' when none: synthetic data, or a
    SentencePiece model): `data.tokenizer`, or with '' the first `hf:` checkpoint's in pipeline order."""
    from nash_lm.train import config as cfg_lib
    from nash_lm.train import data as data_lib

    data = config.get("data", {})
    if data.get("kind") != "records":
        return ""
    stages = config.get("stages", {})
    hf_dirs = [v[len(cfg_lib.HF_PREFIX):] for s in str(config.get("pipeline", "")).split(",") if s in stages
               for v in (stages[s].get("init", ""), stages[s].get("ref", "")) if str(v).startswith(cfg_lib.HF_PREFIX)]
    path = data_lib.tokenizer_path(data.get("tokenizer", ""), hf_dirs)
    return path if path.endswith(".json") and os.path.isfile(path) else ""


def find_policy_stage(workdir: str, stage: str = ""):
    """(stage name, its ModelConfig, the resolved config dict) of the stage to export."""
    from nash_lm.models import ModelConfig
    from nash_lm.train import config as cfg_lib

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"--workdir={workdir}: no config.json (not a train job's workdir)")
    config = _read_json(cfg_path)
    stages = config.get("stages", {})
    order = [s for s in str(config.get("pipeline", "")).split(",") if s]
    if stage:
        if stage not in stages:
            raise ValueError(f"--stage={stage}: not a stage of this workdir (stages: {', '.join(sorted(stages))})")
        if cfg_lib.produces(stages[stage]["algorithm"]) != "lm":
            raise ValueError(f"--stage={stage}: algorithm {stages[stage]['algorithm']!r} does not produce a policy")
    else:
        policies = [s for s in order if cfg_lib.produces(stages[s]["algorithm"]) == "lm"
                    and os.path.exists(os.path.join(workdir, "stages", s, "done.json"))]
        if not policies:
            raise ValueError(f"--workdir={workdir}: no completed policy stage to export")
        stage = policies[-1]
    export_dir = os.path.join(workdir, "stages", stage, "export")
    if not os.path.isdir(export_dir):
        raise ValueError(f"stage {stage!r}: {export_dir} does not exist (the stage has not finished)")
    model = {k: v for k, v in config["model"].items() if k != "architecture"}  # read by export_llama's check
    return stage, ModelConfig.from_config(model), config


def load_stage_params(workdir: str, stage: str, cfg, which: str = "policy"):
    """(graphdef, params) of a stage's params export, on the default device."""
    from nash_lm import models
    from nash_lm.train import checkpoint as ckpt_lib

    graphdef, shapes = models.abstract_init(cfg, "lm")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = ckpt_lib.abstract(shapes, jax.tree.map(lambda _: dev, shapes))
    export_dir = os.path.join(workdir, "stages", stage, "export")
    if which == "ema":
        meta = _read_json(os.path.join(workdir, "stages", stage, "done.json"))
        if "ema_params_sha256" not in meta:
            raise ValueError(f"--which=ema: stage {stage!r} has no EMA parameters")
    params = ckpt_lib.load_params(export_dir, {which: abstract})[which]
    return graphdef, params


def export_sampler(graphdef, params, *, batch_size: int, prompt_len: int, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = 2,
                   pad_id: int = 0, platforms=("cpu",)):
    """`jax.export.Exported` of the sampler with the parameters (a flat {name: array} dict) as an input."""
    from nash_lm import sampling
    from nash_lm.train import checkpoint as ckpt_lib

    template = params

    def serve(flat_params, prompts, prompt_mask, key_data):
        tree = ckpt_lib.from_pure_dict(template, unflatten(flat_params))
        s = sampling.sample(graphdef, tree, prompts, prompt_mask, jax.random.wrap_key_data(key_data),
                            max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                            top_k=top_k, top_p=top_p)
        return {"tokens": s.tokens, "mask": s.mask, "logp": s.logp_sample}

    flat = flatten(ckpt_lib.to_pure_dict(params))
    args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
            jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*args)


def load_sampler(out: str):
    """The exported sampler of OUT with OUT/params bound: `fn(prompts, prompt_mask, key_data) -> dict`."""
    import orbax.checkpoint as ocp

    with open(os.path.join(out, "sampler", "sampler.jaxexport"), "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    meta = _read_json(os.path.join(out, "sampler", "sampler.json"))
    ckptr = ocp.StandardCheckpointer()
    restored = ckptr.restore(os.path.abspath(os.path.join(out, "params")))
    ckptr.close()
    flat = flatten(restored["policy"])
    missing = sorted(set(meta["param_names"]) - set(flat))
    if missing:
        raise ValueError(f"{out}/params: missing parameter {missing[0]!r} that the sampler takes")
    flat = {k: jnp.asarray(flat[k], dtype=meta["param_dtype"]) for k in meta["param_names"]}

    def fn(prompts, prompt_mask, key_data):
        return exp.call(flat, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                        jnp.asarray(key_data, jnp.uint32))

    return fn


def run(workdir: str, out: str, *, stage: str = "", which: str = "policy", params_dtype: str = "bfloat16",
        hf_dtype: str = "float32", tokenizer: str = "", batch_size: int = 8, prompt_len: int = 0,
        max_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        eos_id: int | None = None, pad_id: int | None = None, platforms=("cpu", "cuda", "tpu"),
        overwrite: bool = False, adapters_only: bool = False) -> dict:
    """Writes OUT/params, OUT/hf, OUT/sampler and OUT/export.json (or, `adapters_only`, a LoRA stage's adapters
    alone); returns the manifest. `tokenizer` '' takes the run's own tokenizer.json (a records run's, see
    `run_tokenizer_json`); `eos_id` / `pad_id` None take that tokenizer's ids (else 2 / 0)."""
    from nash_lm.interop import hf
    from nash_lm.train import checkpoint as ckpt_lib

    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    stage, cfg, config = find_policy_stage(workdir, stage)
    data = config.get("data", {})
    prompt_len = prompt_len or int(data.get("prompt_len", 0))
    max_new_tokens = max_new_tokens or int(data.get("response_len", 0))
    if prompt_len < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"--prompt_len={prompt_len}, --max_new_tokens={max_new_tokens}, --batch_size={batch_size}: "
                         f"all must be positive")
    if prompt_len + max_new_tokens > cfg.max_len:
        raise ValueError(f"--prompt_len + --max_new_tokens = {prompt_len + max_new_tokens} exceeds "
                         f"ModelConfig.max_len={cfg.max_len}")
    tokenizer = tokenizer or run_tokenizer_json(config)
    if tokenizer:
        from nash_lm.data import tokenizer as tokenizer_lib

        tok = tokenizer_lib.HFTokenizer(tokenizer)
        eos_id = tok.eos_id if eos_id is None else eos_id
        pad_id = tok.pad_id if pad_id is None else pad_id
        bos_id = tok.bos_id
    else:
        bos_id = 1
    eos_id = 2 if eos_id is None else eos_id
    pad_id = 0 if pad_id is None else pad_id
    if tokenizer:
        hf.load_tokenizer(tokenizer, cfg, {"eos_token_id": eos_id if eos_id >= 0 else None, "pad_token_id": pad_id})
    adapters_dir = os.path.join(workdir, "stages", stage, "adapters")
    if adapters_only and not os.path.isdir(adapters_dir):
        raise ValueError(f"--adapters_only: stage {stage!r} trained no adapters (lora_rank = 0)")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"--out={out} exists; pass --overwrite to replace it")
    final, out = out, out + ".partial"  # written there, renamed to OUT when complete
    if os.path.exists(out):  # left by an export that was killed
        shutil.rmtree(out)
    if adapters_only:
        os.makedirs(out)
        shutil.copytree(adapters_dir, os.path.join(out, "adapters"))
        shutil.copy(os.path.join(workdir, "stages", stage, "adapters.json"), os.path.join(out, "adapters.json"))
        manifest = {"workdir": workdir, "stage": stage, "adapters": _read_json(os.path.join(out, "adapters.json")),
                    "model": cfg.to_dict(), "files": ["adapters", "adapters.json"]}
        with open(os.path.join(out, "export.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _commit(out, final)
        return manifest
    graphdef, params = load_stage_params(workdir, stage, cfg, which)
    sha = ckpt_lib.params_sha256(params)
    os.makedirs(out)

    low = jax.tree.map(lambda x: x.astype(jnp.dtype(params_dtype)), params)
    ckpt_lib.export_params(os.path.join(out, "params"), {"policy": low})

    hf.export_llama(graphdef, params, os.path.join(out, "hf"), dtype=hf_dtype,
                    bos_token_id=bos_id, eos_token_id=eos_id if eos_id >= 0 else None, pad_token_id=pad_id,
                    tokenizer_json=tokenizer or None)

    settings = dict(batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id if eos_id >= 0 else None,
                    pad_id=pad_id)
    exp = export_sampler(graphdef, low, platforms=platforms, **settings)
    os.makedirs(os.path.join(out, "sampler"))
    with open(os.path.join(out, "sampler", "sampler.jaxexport"), "wb") as f:
        f.write(exp.serialize())
    names = sorted(flatten(ckpt_lib.to_pure_dict(low)))
    with open(os.path.join(out, "sampler", "sampler.json"), "w") as f:
        json.dump({**settings, "platforms": list(exp.platforms), "param_names": names, "param_dtype": params_dtype,
                   "inputs": ["params {name: array}", "prompts int32 [B, Tp] (left-padded)",
                              "prompt_mask int32 [B, Tp]", "key_data uint32 [2]"],
                   "outputs": {"tokens": "int32 [B, N]", "mask": "int32 [B, N]", "logp": "float32 [B, N]"}},
                  f, indent=2)
    manifest = {"workdir": workdir, "stage": stage, "which": which, "params_sha256": sha,
                "model": cfg.to_dict(), "params_dtype": params_dtype, "hf_dtype": hf_dtype,
                "sampler": settings, "platforms": list(exp.platforms), "tokenizer": tokenizer,
                "files": ["params"] + sorted(f"hf/{n}" for n in os.listdir(os.path.join(out, "hf")))
                         + ["sampler/sampler.jaxexport", "sampler/sampler.json"]}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    _commit(out, final)
    return manifest


def _commit(partial: str, out: str) -> None:
    """OUT.partial -> OUT (an earlier OUT, with --overwrite, is removed first)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)


def main(argv):
    del argv
    if not FLAGS.workdir or not FLAGS.out:
        print("error: --workdir and --out are required", file=sys.stderr)
        sys.exit(2)
    try:
        manifest = run(FLAGS.workdir, FLAGS.out, stage=FLAGS.stage, which=FLAGS.which,
                       params_dtype=FLAGS.params_dtype, hf_dtype=FLAGS.hf_dtype, tokenizer=FLAGS.tokenizer,
                       batch_size=FLAGS.batch_size, prompt_len=FLAGS.prompt_len, max_new_tokens=FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, eos_id=FLAGS.eos_id,
                       pad_id=FLAGS.pad_id, platforms=[p for p in FLAGS.platforms.split(",") if p],
                       overwrite=FLAGS.overwrite, adapters_only=FLAGS.adapters_only)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk or another write error: one line, exit 1
        from nash_lm.train.checkpoint import write_error_line

        print(f"error: {write_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({k: manifest[k] for k in ("stage", "params_sha256", "platforms", "adapters") if k in manifest}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
