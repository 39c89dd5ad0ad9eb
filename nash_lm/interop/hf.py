"""Hugging Face checkpoints in and out: Llama, Gemma and Qwen2 safetensors + config.json + tokenizer.json.

Import (`load_pretrained(path)`): reads `config.json`, maps it onto a `ModelConfig` (or checks it against the
one you give), checks every tensor's name, shape and dtype from the safetensors headers *before* reading any
data, converts the weights to nash-lm's fused layout and returns `(graphdef, params)` usable by every
`nash_lm.models` / `nash_lm.sampling` / training entry point, plus the checked `tokenizer.json`. Only local
directories are read (never a hub) and only safetensors (pickled `*.bin` checkpoints are refused, never
loaded). Every problem is a `ValueError` (or `FileNotFoundError`) with one line naming what differs.

`check_pretrained(path, config)` runs every one of those checks without reading tensor data (the training loop's
validation of `init="hf:/dir"` uses it), and `checkpoint_sha256(path)` hashes the checkpoint's files for stage
fingerprints.

Export (`export_llama(graphdef, params, out_dir)`): Llama-architecture parameters -> `model.safetensors` +
`config.json` loadable by `transformers.LlamaForCausalLM.from_pretrained(out_dir)`.

Weight layout (HF `nn.Linear.weight` is [out, in]; query head h belongs to key/value head h // group):
  model.embed_tokens.weight [V, D]                  -> embed [V, D]
  layers.i.self_attn.{q,k,v}_proj.weight            -> blocks.i.attn.qkv [D, KV, group + 2, hd]
      (slots 0..group-1: that kv head's query heads; slot group: key; slot group + 1: value)
  layers.i.self_attn.{q,k,v}_proj.bias (Qwen2)      -> blocks.i.attn.qkv_bias [KV, group + 2, hd]
  layers.i.self_attn.o_proj.weight [D, H*hd]        -> blocks.i.attn.out [KV, group, hd, D]
  layers.i.mlp.{gate,up}_proj.weight [F, D]         -> blocks.i.mlp.gate_up [D, 2, F]
  layers.i.mlp.down_proj.weight [D, F]              -> blocks.i.mlp.down [F, D]
  layers.i.{input,post_attention}_layernorm.weight  -> blocks.i.{attn_norm, mlp_norm}.scale
  model.norm.weight                                 -> final_norm.scale
  lm_head.weight [V, D] (untied)                    -> head [D, V]
Both conventions agree on RoPE (rotate-half over the head dimension, frequencies theta^(-2i/hd)), on the
RMSNorm (float32, weight applied after normalising) and on the attention scale hd^-0.5.

Gemma, folded at import: RMSNorm scale = 1 + w; the input embedding is multiplied by sqrt(d_model), which
needs an untied copy (`tie_embeddings=False`: embed = sqrt(d) * E, head = E^T); the GeLU-tanh gate uses
`activation="gelu_tanh"`. Qwen2 uses `qkv_bias=True` (`nash_lm.interop.variants`). Neither variant can be exported back (Llama only).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from nash_lm.interop import safetensors_io as st
from nash_lm.interop import variants
from nash_lm.models import ModelConfig

MODEL_TYPES = {"llama": "llama", "gemma": "gemma", "qwen2": "qwen2"}
ACTIVATIONS = {"llama": ("silu",), "qwen2": ("silu",), "gemma": ("gelu_pytorch_tanh", "gelu")}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


class Pretrained(NamedTuple):
    graphdef: Any
    params: Any
    config: ModelConfig
    architecture: str
    tokenizer: Any        # tokenizers.Tokenizer, or None when not requested
    hf_config: dict


# ---------------------------------------------------------------------------------------------------------------
# config.json


def read_config(path: str) -> dict:
    """The checkpoint directory's config.json as a dict."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face checkpoint directory)")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    return hf


def architecture(hf: dict) -> str:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"config.json model_type={mt!r}: unsupported architecture (supported: "
                         f"{', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[mt]


def rope_theta(hf: dict) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta`; scaled RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for where, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(f"config.json {where}.rope_type={kind!r}: only unscaled ('default') RoPE is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _need(hf: dict, key: str):
    if key not in hf:
        raise ValueError(f"config.json: missing field {key!r}")
    return hf[key]


def model_config_from_hf(hf: dict, *, max_len: int | None = None, dtype: str = "float32",
                         param_dtype: str = "float32", scan_layers: bool = False,
                         remat: bool = False) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json (refusing features nash-lm's decoder does not have)."""
    arch = architecture(hf)
    d = int(_need(hf, "hidden_size"))
    heads = int(_need(hf, "num_attention_heads"))
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        raise ValueError(f"config.json head_dim={head_dim}: nash-lm needs head_dim = hidden_size / "
                         f"num_attention_heads = {d}/{heads}")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if arch == "gemma":
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS[arch]:
        raise ValueError(f"config.json hidden_act={act!r}: {arch} import supports {ACTIVATIONS[arch]}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json {flag}=true: biases are not supported for {arch}")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true: sliding-window attention is not supported")
    tied = bool(hf.get("tie_word_embeddings", arch == "gemma"))
    cfg = ModelConfig(
        vocab_size=int(_need(hf, "vocab_size")), d_model=d, n_layers=int(_need(hf, "num_hidden_layers")),
        n_heads=heads, n_kv_heads=kv, d_ff=int(_need(hf, "intermediate_size")),
        max_len=int(max_len or hf.get("max_position_embeddings") or 2048), rope_theta=rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tied and arch != "gemma",  # Gemma's scaled input embedding needs an untied copy
        dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
    return cfg.validate()


ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "norm_eps",
               "tie_embeddings")


def check_config(expected: ModelConfig, found: ModelConfig, where: str) -> None:
    """One-line ValueError naming the first architecture field where the checkpoint differs from the config."""
    for f in ARCH_FIELDS:
        a, b = getattr(expected, f), getattr(found, f)
        if (float(a) != float(b)) if isinstance(a, float) else a != b:
            raise ValueError(f"{where}: checkpoint has {f}={b!r} but the config says ModelConfig.{f}={a!r}")


# ---------------------------------------------------------------------------------------------------------------
# Tensor names and shapes


def expected_tensors(cfg: ModelConfig, arch: str, tied_in_file: bool) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} that a checkpoint of this architecture must contain."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not tied_in_file:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (cfg.n_heads * hd, d),
            p + "self_attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, cfg.n_heads * hd),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
        if arch == "qwen2":
            out.update({p + "self_attn.q_proj.bias": (cfg.n_heads * hd,),
                        p + "self_attn.k_proj.bias": (cfg.n_kv_heads * hd,),
                        p + "self_attn.v_proj.bias": (cfg.n_kv_heads * hd,)})
    return out


def check_tensors(path: str, cfg: ModelConfig, arch: str, tied_in_file: bool) -> dict[str, str]:
    """Checks names, shapes and dtypes from the headers only; returns {name: file}. One-line errors."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for f in st.checkpoint_files(path):
        for name, (dtype, shape) in st.read_header(f).items():
            found[name] = (dtype, shape, f)
    want = expected_tensors(cfg, arch, tied_in_file)
    for name, shape in want.items():
        if name not in found:
            raise ValueError(f"{path}: missing tensor {name!r} (expected shape {list(shape)} for {arch})")
        dtype, got, f = found[name]
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{f}: tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(FLOAT_DTYPES)}")
        if tuple(got) != tuple(shape):
            raise ValueError(f"{f}: tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}")
    extra = sorted(n for n in found if n not in want and not n.endswith(IGNORED_SUFFIXES)
                   and not (tied_in_file and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"{found[extra[0]][2]}: unexpected tensor {extra[0]!r} for {arch} "
                         f"(the checkpoint does not match its config.json)")
    return {n: found[n][2] for n in want}


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def hf_to_pure(tensors: dict[str, np.ndarray], cfg: ModelConfig, arch: str, tied_in_file: bool) -> dict:
    """HF tensors -> nash-lm pure parameter dict (float32 numpy; blocks keyed 0..L-1, unscanned)."""
    d, kv, g, hd, f = cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.d_ff
    emb = _f32(tensors["model.embed_tokens.weight"])
    norm = (lambda w: _f32(w) + np.float32(1.0)) if arch == "gemma" else _f32
    blocks = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        q = _f32(tensors[p + "self_attn.q_proj.weight"]).T.reshape(d, kv, g, hd)
        k = _f32(tensors[p + "self_attn.k_proj.weight"]).T.reshape(d, kv, 1, hd)
        v = _f32(tensors[p + "self_attn.v_proj.weight"]).T.reshape(d, kv, 1, hd)
        o = _f32(tensors[p + "self_attn.o_proj.weight"]).T.reshape(kv, g, hd, d)
        attn = {"qkv": np.concatenate([q, k, v], axis=2), "out": o}
        if arch == "qwen2":
            qb = _f32(tensors[p + "self_attn.q_proj.bias"]).reshape(kv, g, hd)
            kb = _f32(tensors[p + "self_attn.k_proj.bias"]).reshape(kv, 1, hd)
            vb = _f32(tensors[p + "self_attn.v_proj.bias"]).reshape(kv, 1, hd)
            attn["qkv_bias"] = np.concatenate([qb, kb, vb], axis=1)
        gate = _f32(tensors[p + "mlp.gate_proj.weight"]).T
        up = _f32(tensors[p + "mlp.up_proj.weight"]).T
        blocks[i] = {
            "attn": attn,
            "attn_norm": {"scale": norm(tensors[p + "input_layernorm.weight"])},
            "mlp": {"gate_up": np.stack([gate, up], axis=1), "down": _f32(tensors[p + "mlp.down_proj.weight"]).T},
            "mlp_norm": {"scale": norm(tensors[p + "post_attention_layernorm.weight"])},
        }
    pure = {"blocks": blocks, "final_norm": {"scale": norm(tensors["model.norm.weight"])}}
    if arch == "gemma":
        pure["embed"] = emb * np.float32(math.sqrt(d))  # torch: embedding * sqrt(d) in the weight dtype
        pure["head"] = emb.T.copy()
    else:
        pure["embed"] = emb
        if not tied_in_file:
            pure["head"] = _f32(tensors["lm_head.weight"]).T
    if cfg.scan_layers:
        pure["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in range(cfg.n_layers)])
    return pure


def _unscanned_blocks(pure: dict, n_layers: int) -> list[dict]:
    blocks = pure["blocks"]
    if 0 in blocks or "0" in blocks:
        return [blocks[i] if i in blocks else blocks[str(i)] for i in range(n_layers)]
    return [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n_layers)]


def pure_to_hf(pure: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """nash-lm pure parameter dict (Llama architecture) -> HF Llama tensors (float32)."""
    d, kv, g, hd = cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    out = {"model.embed_tokens.weight": _f32(pure["embed"]), "model.norm.weight": _f32(pure["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _f32(pure["head"]).T
    for i, b in enumerate(_unscanned_blocks(pure, cfg.n_layers)):
        p = f"model.layers.{i}."
        qkv = _f32(b["attn"]["qkv"])
        out[p + "self_attn.q_proj.weight"] = qkv[:, :, :g].reshape(d, kv * g * hd).T
        out[p + "self_attn.k_proj.weight"] = qkv[:, :, g].reshape(d, kv * hd).T
        out[p + "self_attn.v_proj.weight"] = qkv[:, :, g + 1].reshape(d, kv * hd).T
        out[p + "self_attn.o_proj.weight"] = _f32(b["attn"]["out"]).reshape(kv * g * hd, d).T
        gate_up = _f32(b["mlp"]["gate_up"])
        out[p + "mlp.gate_proj.weight"] = gate_up[:, 0].T
        out[p + "mlp.up_proj.weight"] = gate_up[:, 1].T
        out[p + "mlp.down_proj.weight"] = _f32(b["mlp"]["down"]).T
        out[p + "input_layernorm.weight"] = _f32(b["attn_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = _f32(b["mlp_norm"]["scale"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str, cfg: ModelConfig, hf: dict):
    """Loads tokenizer.json and checks it fits the model: every id < vocab_size, special ids are its tokens."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (pass tokenizer=False to import weights only)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises its own Exception type
        raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    largest = max(vocab.values()) if vocab else -1
    if largest >= cfg.vocab_size:
        token = max(vocab, key=vocab.get)
        raise ValueError(f"{path}: token {token!r} has id {largest}, which does not fit the model's vocab_size="
                         f"{cfg.vocab_size}")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = hf.get(field)
        for i in ([] if ids is None else ids if isinstance(ids, list) else [ids]):
            if tok.id_to_token(int(i)) is None:
                raise ValueError(f"{path}: config.json {field}={i} is not a token of this tokenizer "
                                 f"({len(vocab)} tokens)")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Import / export


def check_pretrained(path: str, config: ModelConfig | None = None, *, tokenizer: bool | str = True,
                     max_len: int | None = None, dtype: str = "float32", param_dtype: str = "float32",
                     scan_layers: bool = False):
    """Every check of `load_pretrained` without reading any tensor data: config.json (architecture, fields,
    against `config` when given), the tokenizer and the safetensors headers. Returns (hf dict, architecture,
    ModelConfig, tokenizer or None); raises a one-line ValueError / FileNotFoundError naming what differs."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    hf = read_config(path)
    arch = architecture(hf)
    found = model_config_from_hf(hf, max_len=max_len, dtype=dtype, param_dtype=param_dtype,
                                 scan_layers=scan_layers)
    if config is not None:
        check_config(config, found, path)
        cfg = config.validate()
    else:
        cfg = found
    tied_in_file = bool(hf.get("tie_word_embeddings", arch == "gemma"))
    tok = None
    if tokenizer:
        tok_path = tokenizer if isinstance(tokenizer, str) else os.path.join(path, "tokenizer.json")
        tok = load_tokenizer(tok_path, cfg, hf)
    check_tensors(path, cfg, arch, tied_in_file)  # headers only: fails before any data is read
    return hf, arch, cfg, tok


def checkpoint_files(path: str) -> list[str]:
    """The files that determine an import: config.json, the safetensors index (if any) and shards, and
    tokenizer.json (if present), as absolute paths in a fixed order."""
    files = [os.path.join(path, "config.json")]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files.append(index)
    files += st.checkpoint_files(path)
    tok = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok):
        files.append(tok)
    return [os.path.abspath(f) for f in files]


_HASHES: dict = {}


def checkpoint_sha256(path: str) -> str:
    """SHA-256 over the names and bytes of `checkpoint_files(path)` (`files_sha256`)."""
    return files_sha256(checkpoint_files(path))


def files_sha256(files: list[str]) -> str:
    """SHA-256 over the base names and bytes of `files`, in order. Memoised per process on (file, size, mtime) so
    that validating and fingerprinting large files several times reads them once."""
    key = tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files)
    if key not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.basename(f).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            h.update(b"\0")
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def load_pretrained(path: str, config: ModelConfig | None = None, *, tokenizer: bool | str = True,
                    max_len: int | None = None, dtype: str = "float32", param_dtype: str = "float32",
                    scan_layers: bool = False, shardings=None) -> Pretrained:
    """Imports a local Llama/Gemma/Qwen2 safetensors checkpoint directory.

    Args:
      path: directory with config.json, model.safetensors (or an index + shards) and tokenizer.json.
      config: when given, the checkpoint must match its architecture fields (`ARCH_FIELDS`); its max_len,
        dtypes, scan_layers and remat are used. Otherwise they come from the arguments below.
      tokenizer: True -> `path/tokenizer.json` (checked against the model), a path -> that file, False -> none.
      shardings: optional tree (from `nash_lm.parallel.param_shardings`) to place the parameters.
    """
    hf, arch, cfg, tok = check_pretrained(path, config, tokenizer=tokenizer, max_len=max_len, dtype=dtype,
                                          param_dtype=param_dtype, scan_layers=scan_layers)
    tied_in_file = bool(hf.get("tie_word_embeddings", arch == "gemma"))
    tensors = st.load(path)
    pure = hf_to_pure(tensors, cfg, arch, tied_in_file)
    graphdef, abstract = variants.build_abstract(cfg, arch)
    dt = cfg.weight_dtype
    pure = jax.tree.map(lambda x: np.asarray(x).astype(dt), pure)
    state = nnx.State(abstract)
    nnx.replace_by_pure_dict(state, pure)
    if shardings is not None:  # each process places only its own shards (works across processes too)
        params = jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx]),
                              state, shardings)
    else:
        params = jax.tree.map(jax.numpy.asarray, state)
    return Pretrained(graphdef, params, cfg, arch, tok, hf)


def hf_llama_config(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id=None, eos_token_id=None,
                    pad_token_id=None) -> dict:
    """config.json for transformers' LlamaForCausalLM (both the >= 5 and the older RoPE fields)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
    }


def export_llama(graphdef, params, out_dir: str, *, dtype: str = "float32", bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, tokenizer_json: str | None = None) -> str:
    """Writes model.safetensors + config.json + generation_config.json for transformers' LlamaForCausalLM, and with
    `tokenizer_json` the tokenizer files of its directory (`copy_tokenizer`). generation_config.json is the one next
    to `tokenizer_json` (a checkpoint's: its EOS ids, where `generate` stops, and sampling defaults) when there is
    one, over the given token ids, else those ids alone."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: must be 'float32' or 'bfloat16'")
    arch = variants.architecture_of(graphdef, params)
    if arch != "llama":
        raise ValueError(f"export to Hugging Face supports the llama architecture only; this model is {arch}")
    cfg = nnx.merge(graphdef, params).cfg
    pure = jax.device_get(params if isinstance(params, dict) else nnx.to_pure_dict(params))
    tensors = pure_to_hf(pure, cfg)
    if dtype == "bfloat16":
        tensors = {k: v.astype(st.DTYPES["BF16"]) for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    st.save(os.path.join(out_dir, "model.safetensors"), tensors, metadata={"format": "pt"})
    hf = hf_llama_config(cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer_json:
        copy_tokenizer(tokenizer_json, out_dir)
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
    base = os.path.join(os.path.dirname(tokenizer_json), GENERATION_CONFIG) if tokenizer_json else ""
    if base and os.path.isfile(base):
        with open(base, encoding="utf-8") as f:
            generation = {**generation, **json.load(f)}
    with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    return out_dir


# What makes a directory's tokenizer a complete chat tokenizer for transformers, beside tokenizer.json: the
# special tokens and the chat template (tokenizer_config.json; transformers >= 4.43 may put the template in
# chat_template.jinja or chat_template.json instead).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def copy_tokenizer(tokenizer_json: str, out_dir: str) -> list[str]:
    """Copies `tokenizer_json` to out_dir/tokenizer.json and the tokenizer files of `TOKENIZER_FILES` found next to
    it (a checkpoint directory's), so that transformers' `AutoTokenizer.from_pretrained(out_dir)` gives the same
    special tokens and chat template as the source directory. Returns the names written."""
    written = []
    src_dir = os.path.dirname(os.path.abspath(tokenizer_json))
    for name in TOKENIZER_FILES:
        src = tokenizer_json if name == "tokenizer.json" else os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            written.append(name)
    return written


def describe(p: Pretrained) -> str:
    """One line summarising an import (for logs)."""
    c = p.config
    return (f"{p.architecture}: vocab {c.vocab_size}, d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads "
            f"({c.n_kv_heads} kv), d_ff {c.d_ff}, rope_theta {c.rope_theta:g}, tied {c.tie_embeddings}")


__all__ = ["Pretrained", "read_config", "architecture", "model_config_from_hf", "check_config", "check_pretrained",
           "checkpoint_files", "checkpoint_sha256",
           "expected_tensors", "check_tensors", "hf_to_pure", "pure_to_hf", "load_tokenizer", "load_pretrained",
           "hf_llama_config", "export_llama", "describe", "ARCH_FIELDS"]
