"""Reading and writing `.safetensors` files (single or sharded with an index), without ever unpickling.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`
(plus an optional `__metadata__` of strings) and the raw little-endian tensor bytes. It is parsed here
directly so that every failure is one line naming the file and the tensor, unknown dtypes are refused by
name, and bfloat16 is read through `ml_dtypes` (numpy has no bfloat16 of its own). Arrays are memory-mapped,
so reading a large checkpoint only touches the tensors that are used.

  read_header(path) -> {name: (dtype str, shape)}
  load(path_or_dir) -> {name: np.ndarray}   a file, or a directory with model.safetensors or
                                            model.safetensors.index.json (sharded checkpoints)
  save(path, tensors, metadata=None)        writes one file (float32, bfloat16, float16, int*)
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from nash_lm import distributed

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _read_raw_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype string, shape)} of one file, without reading any tensor data."""
    header, _ = _read_raw_header(path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _load_file(path: str) -> dict[str, np.ndarray]:
    header, start = _read_raw_header(path)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros((0,), np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        shape = tuple(int(s) for s in info["shape"])
        lo, hi = (int(x) for x in info["data_offsets"])
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if hi - lo != want or start + hi > size:
            raise ValueError(f"{path}: tensor {name!r} {dtype}{list(shape)} needs {want} bytes at [{lo}, {hi}) "
                             f"but the data section has {size - start} bytes")
        out[name] = mm[start + lo:start + hi].view(DTYPES[dtype]).reshape(shape)
    return out


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, or a directory (index.json first, then *.safetensors)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such safetensors file or checkpoint directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index}: names shard {missing[0]!r}, which is not in {path}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found {pickles[0]!r}: pickled checkpoints are never loaded; convert it to safetensors)" \
            if pickles else ""
        raise FileNotFoundError(f"{path}: no *.safetensors file{hint}")
    return [os.path.join(path, f) for f in found]


def load(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint (memory-mapped numpy arrays). Duplicate names across shards are an error."""
    out: dict[str, np.ndarray] = {}
    for f in checkpoint_files(path):
        for name, arr in _load_file(f).items():
            if name in out:
                raise ValueError(f"{f}: tensor {name!r} appears in more than one shard")
            out[name] = arr
    return out


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy or jax arrays) to one safetensors file, names in sorted order (process 0, atomically:
    `nash_lm.distributed.write_file`)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype.newbyteorder("<") in _NAMES and arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype not in _NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store here")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned

    def fill(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())

    distributed.write_file(path, fill, sync=False)  # process 0, atomically
