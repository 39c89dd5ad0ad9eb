"""Metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, analytic FLOPs and MFU.

- `MetricsWriter` appends one JSON line per log step (`{"stage", "step", ...}`) and mirrors every scalar into a
  TensorBoard event file under `WORKDIR/tensorboard/`. TensorBoard itself is not a dependency: the event file
  (TFRecord framing with masked CRC-32C, `Event`/`Summary` protobuf messages) is written here directly, so
  `tensorboard --logdir WORKDIR/tensorboard` reads it when TensorBoard is installed elsewhere.
- On resume the lines of a stage after its restored step are dropped, so the file never holds a step twice.
- With several processes (`nash_lm.distributed`) only process 0 writes, truncates and mirrors to TensorBoard;
  every other process's `write` only builds the record it returns.
- `lm_forward_flops` counts matmul FLOPs analytically (2 per multiply-add; causal attention scores and values
  counted over the attended prefix; the embedding gather excluded, the LM head included). The training step
  cost is the sum of the forwards and backwards it runs (`step.step_flops`).
- `measure_peak_flops` times a jitted square matmul in the model's dtype on the first device; MFU uses
  `config.peak_tflops` when it is set and this measurement otherwise (shared CPU hosts fluctuate, so the peak is
  measured in the same run).
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import distributed

# ---------------------------------------------------------------------------------------------------------------
# TensorBoard event files (no TensorBoard/TensorFlow import)


def _crc32c_table():
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _len_delimited(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           scalars: dict | None = None) -> bytes:
    msg = _field(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        msg += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _len_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_delimited(1, _len_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        msg += _len_delimited(5, summary)
    return msg


class TensorBoardWriter:
    """Scalars to a TensorBoard event file (`events.out.tfevents.<time>.<host>`)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}")
        self._f = open(self.path, "ab")
        self._write(_event(time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + record
                      + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict) -> None:
        self._write(_event(time.time(), step=step, scalars=values))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------------------------------------------------------
# JSONL


def _jsonable(v):
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """`metrics.jsonl` + TensorBoard; `truncate(stage, step)` drops the lines of `stage` after `step` and its
    final-evaluation line (on resume)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tensorboard")
        self._last = {}  # stage -> its last training record (what `last` returns)

    def last(self, stage: str) -> dict:
        """The stage's last training-metrics record (the line with its loss), without the stage name."""
        return {k: v for k, v in self._last.get(stage, {}).items() if k != "stage"}

    def truncate(self, stage: str, after_step: int) -> None:
        """Drops the stage's lines after `after_step` and its final-evaluation line (on resume); every process
        remembers the last record kept, only process 0 rewrites the file."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill -9
                continue
            # A final evaluation line is rewritten whenever the stage is finished again.
            if rec.get("stage") == stage and (rec.get("step", 0) > after_step or rec.get("final")):
                continue
            if rec.get("stage") == stage and "loss" in rec:
                self._last[stage] = rec
            keep.append(line if line.endswith("\n") else line + "\n")
        if not distributed.is_primary():
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, stage: str, step: int, metrics: dict) -> dict:
        record = {"stage": stage, "step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        if "loss" in record:
            self._last[stage] = json.loads(json.dumps(record))
        if not distributed.is_primary():
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            self._tb = TensorBoardWriter(self._tb_dir)
        self._tb.scalars(int(step), {f"{stage}/{k}": v for k, v in record.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and k not in ("step", "final")})
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU


def lm_forward_flops(*, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                     vocab_size: int, tokens: int, context: int, head_tokens: int | None = None) -> float:
    """Matmul FLOPs of one decoder forward over `tokens` positions that each attend to `context` positions on
    average (full causal pass over T tokens: tokens = T, context = (T + 1) / 2; one decode step: tokens = 1,
    context = current length). SwiGLU MLP (three d_model x d_ff matmuls). The LM head runs at `head_tokens`
    of the positions (default all of them; 0 for a scalar head): a prefill needs it at the last position only,
    teacher-forced log-probs at the response positions only."""
    q = n_heads * head_dim
    kv = n_kv_heads * head_dim
    proj = d_model * (q + 2 * kv) + q * d_model
    mlp = 3 * d_model * d_ff
    attn = 2 * q * context  # scores (q . k) and the weighted sum of values
    head_tokens = tokens if head_tokens is None else head_tokens
    return 2.0 * (n_layers * (proj + mlp + attn) * tokens + d_model * vocab_size * head_tokens)


def causal_pass_flops(length: int, head_positions: int | None = None, *, seqs: int, **shape) -> float:
    """`lm_forward_flops` of one cache-free causal pass over `seqs` sequences of `length` tokens, the LM head at
    `head_positions` of each (default all; 0 for a scalar head). `shape`: the model fields of `lm_forward_flops`."""
    head = length if head_positions is None else head_positions
    return lm_forward_flops(**shape, tokens=seqs * length, context=(length + 1) / 2, head_tokens=seqs * head)


def measure_peak_flops(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a jitted n x n matmul on this process's first device (best of `repeats`)."""
    dev = jax.local_devices()[0]
    n = n or (4096 if dev.platform in ("gpu", "tpu") else 512)
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
