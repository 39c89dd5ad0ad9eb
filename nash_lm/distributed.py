"""Multi-host runs: `jax.distributed` set-up, per-host data sharding, and process-0-only writing.

Owns:
  * `initialize(config=None)`: starts `jax.distributed` from `config.distributed` (coordinator_address,
    num_processes, process_id, local_device_ids, initialization_timeout) or from the environment
    (`NASH_LM_COORDINATOR`, `NASH_LM_NUM_PROCESSES`, `NASH_LM_PROCESS_ID`, as set by `launch/local.py`),
    or, on a TPU pod / SLURM / a GKE JobSet, by jax's own cluster auto-detection (`NASH_LM_DISTRIBUTED=auto`,
    which the launch scripts set). With none of these it does nothing (a single process). Idempotent.
  * `host_rows(sharding, global_shape)`: the rows of a global batch that this process's devices hold, and
    `global_batch(local, sharding, global_batch_size)`: a global `jax.Array` from this process's rows via
    `jax.make_array_from_process_local_data`; `global_batch_from_full(full, sharding)` when every process can
    compute the whole batch (the synthetic sources) and keeps only its rows.
  * `shard_info(sharding, global_batch_size)`: (shard index, shard count) for a data loader that reads only
    this process's share (e.g. grain's `ShardOptions`).
  * `is_primary()`, `primary_only(fn)`, `barrier(name)`, and the one writer of every file a job writes
    (reports, figures, caches, metrics, tables): `write_file(path, fill)` and its forms `write_bytes`,
    `write_text`, `write_json`, `write_jsonl`, `write_npz`, `write_figure` write a whole file from process 0
    only, atomically (a temporary name unique to the writer, flushed, then `os.replace`; on an error the old
    file stays and the error propagates), then every process waits at a barrier (`sync=False` skips it where
    not every process gets there); `append_line` grows a log line by line from process 0. So no two processes race on one path of a shared workdir, and no reader sees
    half a file. Orbax saves and restores are collective: call them on every process (orbax itself lets
    process 0 finalise).

The entry point is `python -m nash_lm.main` on every host (it calls `initialize(config)` before anything touches
a device); this module is a library and has none of its own.
"""
from __future__ import annotations

import functools
import json
import os
import uuid
from typing import Any, Callable

import jax
import numpy as np

ENV_COORDINATOR = "NASH_LM_COORDINATOR"
ENV_NUM_PROCESSES = "NASH_LM_NUM_PROCESSES"
ENV_PROCESS_ID = "NASH_LM_PROCESS_ID"
ENV_LOCAL_DEVICES = "NASH_LM_LOCAL_DEVICE_IDS"
ENV_AUTO = "NASH_LM_DISTRIBUTED"

_STATE = {"initialized": False}


def _settings_from(config, environ) -> dict | None:
    """The `jax.distributed.initialize` keyword arguments, or None for a single process."""
    d = None
    if config is not None:
        d = config.get("distributed") if hasattr(config, "get") else getattr(config, "distributed", None)
    if d is not None and (d.get("coordinator_address") or d.get("auto")):
        if d.get("auto"):
            return {}
        out = {"coordinator_address": str(d["coordinator_address"])}
        for key, cast in (("num_processes", int), ("process_id", int), ("initialization_timeout", int)):
            if d.get(key) is not None and d.get(key) != "":
                out[key] = cast(d[key])
        if d.get("local_device_ids"):
            out["local_device_ids"] = [int(x) for x in str(d["local_device_ids"]).split(",")]
        _check(out, "config.distributed")
        return out
    if environ.get(ENV_COORDINATOR):
        out = {"coordinator_address": environ[ENV_COORDINATOR]}
        for key, env in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
            if env not in environ:
                raise ValueError(f"{ENV_COORDINATOR} is set but {env} is not")
            try:
                out[key] = int(environ[env])
            except ValueError:
                raise ValueError(f"{env}={environ[env]!r}: must be an integer") from None
        if environ.get(ENV_LOCAL_DEVICES):
            out["local_device_ids"] = [int(x) for x in environ[ENV_LOCAL_DEVICES].split(",")]
        _check(out, "environment")
        return out
    if environ.get(ENV_AUTO, "").lower() in ("1", "true", "auto"):
        return {}  # jax detects the cluster (TPU pod metadata, SLURM, Open MPI, GKE)
    return None


def _check(kw: dict, where: str) -> None:
    n, i = kw.get("num_processes"), kw.get("process_id")
    if n is not None and n < 1:
        raise ValueError(f"{where}: num_processes={n} must be at least 1")
    if n is not None and i is not None and not 0 <= i < n:
        raise ValueError(f"{where}: process_id={i} must lie in [0, num_processes={n})")
    addr = kw["coordinator_address"]
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{where}: coordinator_address={addr!r} must be host:port")


def initialize(config=None, environ=None) -> bool:
    """Starts jax.distributed when configured (see the module docstring); returns True when multi-process."""
    environ = os.environ if environ is None else environ
    # jax's own flag also covers a jax.distributed.initialize called by the user before this (e.g. in Colab).
    if _STATE["initialized"] or jax.distributed.is_initialized():
        _STATE["initialized"] = True
        return jax.process_count() > 1
    kw = _settings_from(config, environ)
    if kw is None:
        return False
    jax.distributed.initialize(**kw)
    _STATE["initialized"] = True
    return jax.process_count() > 1


# ---------------------------------------------------------------------------------------------------------------
# Data


def host_rows(sharding, global_shape) -> np.ndarray:
    """Sorted indices along axis 0 of the global rows held by this process's devices."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        sl = idx[0] if idx else slice(None)
        rows.update(range(*sl.indices(global_shape[0])))
    return np.asarray(sorted(rows), np.int64)


def shard_info(sharding, global_batch_size: int) -> tuple[int, int]:
    """(index, count): this process reads rows [index * n, (index + 1) * n) of every global batch, n = B / count.

    Raises ValueError when this process's rows are not one contiguous block of equal size on every process
    (the mesh then needs a different device order for host-sharded loading)."""
    rows = host_rows(sharding, (global_batch_size,))
    n = len(rows)
    if n == 0 or global_batch_size % n or rows[-1] - rows[0] + 1 != n or rows[0] % n:
        raise ValueError(f"this process holds rows {rows.tolist()[:8]} of a batch of {global_batch_size}: not one "
                         f"contiguous equal block")
    return int(rows[0] // n), global_batch_size // n


def _per_leaf(fn, tree, sharding):
    """Maps fn(leaf, sharding) with one sharding for every leaf or a tree of shardings matching `tree`."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: fn(x, sharding), tree)
    return jax.tree.map(fn, tree, sharding)


def global_batch(local, sharding, global_batch_size: int | None = None):
    """A global jax.Array (tree) from this process's rows (`jax.make_array_from_process_local_data`).
    `sharding`: one sharding for every leaf, or a tree of them matching `local`."""
    def one(x, sh):
        x = np.asarray(x)
        shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sh, x, shape)

    return _per_leaf(one, local, sharding)


def global_batch_from_full(full, sharding):
    """A global jax.Array (tree) from the whole batch, which every process computes identically (only this
    process's rows are transferred)."""
    def one(x, sh):
        x = np.asarray(x)
        rows = host_rows(sh, x.shape)
        return jax.make_array_from_process_local_data(sh, x[rows], x.shape)

    return _per_leaf(one, full, sharding)


def fetch(tree):
    """Host numpy copies of a tree of (possibly multi-process, sharded) arrays; collective when any array spans
    processes, so call it on every process."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------------------------
# Writing from process 0 only


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_only(fn: Callable) -> Callable:
    """Runs `fn` on process 0 only, then a barrier; other processes get None."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs) if is_primary() else None
        barrier(f"primary_only:{fn.__name__}")
        return out

    return wrapped


def _atomic_write(path: str, fill: Callable[[Any], Any]) -> None:
    """`fill(f)` writes the file's bytes to `f`; `path` gets them all or nothing: they go to a temporary name in
    the same directory that no other process or host can pick (a random suffix, created exclusively), are
    flushed to disk, then renamed over `path`. On any error the temporary file is removed and `path` keeps what
    it held; the error (an `OSError` such as ENOSPC) propagates to the caller."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_file(path: str, fill: Callable[[Any], Any], *, sync: bool = True) -> None:
    """The one writer of a job's files: process 0 writes `path` atomically, `fill(f)` streaming its bytes into
    the binary file `f` (see `_atomic_write`); with `sync`, every process waits at a barrier until it is there
    (so call it on every process, or pass sync=False where not every process gets here). The functions below
    are this for bytes, text, JSON, JSON lines, NumPy arrays and figures."""
    if is_primary():
        _atomic_write(path, fill)
    if sync:
        barrier(f"write:{os.path.basename(path)}")


def write_bytes(path: str, data: bytes, *, sync: bool = True) -> None:
    write_file(path, lambda f: f.write(data), sync=sync)


def write_text(path: str, text: str, *, sync: bool = True) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"), sync=sync)


def write_json(path: str, obj: Any, *, sync: bool = True, indent: int | None = 2, sort_keys: bool = True,
               ensure_ascii: bool = True) -> None:
    """`write_text` of `json.dumps(obj)` (indent 2, sorted keys unless told otherwise)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii), sync=sync)


def write_jsonl(path: str, rows, *, sync: bool = True) -> None:
    """`write_text` of one JSON object per line (non-ASCII kept as is)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), sync=sync)


def write_npz(path: str, arrays: dict, *, sync: bool = True) -> None:
    """`np.savez(**arrays)` (uncompressed) through `write_file`."""
    write_file(path, lambda f: np.savez(f, **arrays), sync=sync)


def write_figure(path: str, fig, *, sync: bool = True, **savefig_kwargs) -> None:
    """A matplotlib figure through `write_file`, rendered on process 0 only in the format of `path`'s extension;
    the figure is closed on every process."""
    import matplotlib.pyplot as plt

    fmt = os.path.splitext(path)[1].lstrip(".") or None
    try:
        write_file(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs), sync=False)
    finally:
        plt.close(fig)
    if sync:
        barrier(f"write:{os.path.basename(path)}")


def append_line(path: str, line: str) -> None:
    """Process 0 appends one line (a newline is added) to a log that grows during a job, e.g. metrics.jsonl;
    no barrier. A line is one `write` to a file opened for appending, so a reader sees whole lines, and a line
    cut by a crash is what a reader of the log skips."""
    if not is_primary():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
