"""Metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, analytic FLOPs and MFU.

- `MetricsWriter` appends one JSON line per log step (`{"stage", "step", ...}`) and mirrors every numeric
  scalar, tagged `{stage}/{metric}`, into a TensorBoard event file under `WORKDIR/tensorboard/`, written with
  tensorboardX (pure Python: numpy and protobuf; TensorFlow, TensorBoard and torch are not needed), so
  `tensorboard --logdir WORKDIR/tensorboard` reads it wherever TensorBoard is installed.
- On resume the lines of a stage after its restored step are dropped, so the file never holds a step twice.
- With several processes (`nash_lm.distributed`) only process 0 writes, truncates and mirrors to TensorBoard;
  every other process's `write` only builds the record it returns.
- `lm_forward_flops` counts matmul FLOPs analytically (2 per multiply-add; causal attention scores and values
  counted over the attended prefix; the embedding gather excluded, the LM head included). The training step
  cost is the sum of the forwards and backwards it runs (`nash_lm.train.algorithms.step_flops`).
- `measure_peak_flops` times a jitted square matmul in the model's dtype on the first device; MFU uses
  `config.peak_tflops` when it is set and this measurement otherwise (shared CPU hosts fluctuate, so the peak is
  measured in the same run).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import distributed

# ---------------------------------------------------------------------------------------------------------------
# TensorBoard event files (tensorboardX: no TensorFlow, no torch needed)

_WRITERS = itertools.count()


class TensorBoardWriter:
    """Scalars to a TensorBoard event file (`events.out.tfevents.<time>.<host>.<pid>.<n>`), one `Event` per
    `scalars` call holding every tag of that step, written with tensorboardX's `FileWriter`.

    tensorboardX is imported here, on the first write of process 0, not with this module: it imports torch
    whenever torch is installed, which no other process (and no run that writes no metrics) should pay for."""

    def __init__(self, logdir: str):
        from tensorboardX import FileWriter

        # tensorboardX names the file after the second only; the suffix keeps two writers in one second apart.
        self._w = FileWriter(logdir, flush_secs=10, filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

    def scalars(self, step: int, values: dict) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        # Summary.Value directly (not `SummaryWriter.add_scalar`, which rewrites characters it dislikes in a tag).
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._w.add_summary(summary, global_step=int(step), walltime=time.time())
        self._w.flush()

    def close(self) -> None:
        self._w.close()  # drains the writer thread's queue, then closes the file


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
        distributed.write_text(self.path, "".join(keep), sync=False)

    def write(self, stage: str, step: int, metrics: dict) -> dict:
        record = {"stage": stage, "step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        if "loss" in record:
            self._last[stage] = json.loads(json.dumps(record))
        if not distributed.is_primary():
            return record
        distributed.append_line(self.path, json.dumps(record))
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
