"""Checkpoints: an async orbax `CheckpointManager` per stage, params-only exports, and parameter hashes.

On-disk layout of one stage (`WORKDIR/stages/<name>/`):

    checkpoints/<step>/state   the mutable train state (step, rng, policy, opt_state, ema) as a nested pure dict
    checkpoints/<step>/data    the data-iterator state (JSON)
    checkpoints/<step>/meta    the stage fingerprint hash and step (JSON)
    export/                    params-only export of the final policy (and EMA), read by later stages

Any pytree (nnx.State, optax NamedTuples, dicts) is stored as a nested dict keyed by its path strings, so the
layout does not depend on the Python classes that produced it. Restoring goes through the *abstract* target
(`jax.ShapeDtypeStruct` with shardings), which places every array straight onto the target mesh, whatever mesh
shape wrote it. The frozen reference is not stored: it is re-read from the input stage's export.

`orbax` writes each step into a temporary directory and renames it when complete, so a process killed during a
save leaves the previous checkpoint as the latest one (the temporary directory is removed when the next run
starts). A committed checkpoint that later cannot be read (a torn copy, a flaky file system) is the trainer's
to handle: `Checkpointer.restore_latest` moves it aside (`<step>.unreadable`) with one warning line and restores
the previous one, all processes agreeing on which. A save or export that cannot be written (a full disk) raises
`WriteError`, one line naming the path (`write_error_line`), with orbax's background threads stopped and their
tracebacks not printed; nothing committed is touched.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import logging as logging_lib
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from nash_lm import distributed


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def to_pure_dict(tree) -> dict:
    """Nested dict of the tree's leaves keyed by path strings."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        keys = [_key_str(k) for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1] if keys else "value"] = leaf
    return out


def from_pure_dict(target, pure: dict):
    """Inverse of `to_pure_dict`: leaves of `pure` placed into `target`'s structure."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, _ in leaves_with_path:
        node = pure
        keys = [_key_str(k) for k in path] or ["value"]
        for k in keys:
            node = node[k]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract(tree, shardings=None):
    """`ShapeDtypeStruct` tree of `tree`, with `shardings` (a matching tree) when given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def params_sha256(tree) -> str:
    """SHA-256 over (path, dtype, shape, bytes) of every leaf; independent of device placement and mesh.
    Arrays sharded across processes are gathered first (`distributed.fetch`, collective: call on every process)."""
    tree = distributed.fetch(tree)
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                             key=lambda pl: "/".join(_key_str(k) for k in pl[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update("/".join(_key_str(k) for k in path).encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class WriteError(OSError):
    """A checkpoint or export that could not be written (out of space, a broken or read-only file system):
    `path` and the one-line `reason`. Nothing committed before it is touched: orbax commits a step by renaming
    its temporary directory, which a failed save never reaches."""

    def __init__(self, path: str, reason: str, code: int | None = None):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason, self.errno = path, reason, code

    @classmethod
    def of(cls, path: str, e: BaseException) -> "WriteError":
        """From orbax's exception: tensorstore's message ends in the OS error (`[os_error_code='28']`), whose
        text is the reason when present (else the first line of the original error)."""
        cause = _root(e)
        code = getattr(cause, "errno", None)
        found = re.search(r"os_error_code='(\d+)'", str(cause))
        if found:
            code = int(found.group(1))
        return cls(path, os.strerror(code) if code else _one_line(cause), code)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_SPACE_TEXT = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota", "File too large")


def write_error_line(e: OSError) -> str:
    """One line for a failed write (`WriteError`) or any other OSError: the path, the error and what to do. A full
    disk: "free space and rerun the same command" (the run goes on from its last complete checkpoint)."""
    if isinstance(e, WriteError):
        text = str(e)
    elif e.filename is not None:
        text = f"{e.filename}: {e.strerror or _one_line(e)}"
    else:
        text = _one_line(e)
    full = e.errno in NO_SPACE or any(s in text for s in NO_SPACE_TEXT)
    return text + ("; free space and rerun the same command" if full else "; fix that and rerun the same command")


@contextlib.contextmanager
def _write_errors(path: str):
    """Any exception of an orbax write (tensorstore reports a full disk as RESOURCE_EXHAUSTED, not OSError)
    becomes a `WriteError` naming `path`."""
    _quiet_background_errors()
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001
        raise WriteError.of(path, e) from e


class _BackgroundSaveErrors(logging_lib.Filter):
    """Drops orbax's error records that carry a traceback: `logging.exception` in its save threads (and again
    when the main thread waits for them), and asyncio's "Task exception was never retrieved" for orbax's write
    coroutines that failed beside the one whose error was raised (logged whenever such a task is collected,
    often at interpreter exit, after the one line). The same failure is raised in the main thread by the next
    save or wait (or the restore), where it becomes one line."""

    def filter(self, record) -> bool:
        if record.levelno < logging_lib.ERROR or not record.exc_info:
            return True
        if record.name == "asyncio":
            return "orbax" not in record.getMessage()
        return "orbax" not in record.pathname


_FILTER = _BackgroundSaveErrors()


def _quiet_background_errors() -> None:
    for logger in (logging.get_absl_logger(), logging_lib.getLogger("asyncio")):
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _quiet_abandoned_reads() -> None:
    """A failed restore leaves orbax's other reads of that checkpoint behind: coroutines never awaited, and
    tensorstore callbacks into the event loop orbax has closed. Python prints each one as it is dropped
    ("Exception ignored in: <coroutine ...>", "RuntimeError: Event loop is closed", with tracebacks). The
    failure is reported in one line already, so these two kinds are dropped; any other unraisable error still
    reaches the previous hook. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_nash_lm_quiet", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        if unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError) and (
                "Event loop is closed" in str(unraisable.exc_value)):
            return
        previous(unraisable)

    hook._nash_lm_quiet = True
    sys.unraisablehook = hook


def _root(e: BaseException) -> BaseException:
    """The exception that started `e`'s chain (orbax wraps tensorstore's own message, e.g. 'OUT_OF_RANGE: Error
    reading ...', in an exception that only points at it)."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    return e


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of the root of `e`'s chain, cut at `limit` characters."""
    e = _root(e)
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + " ..."


def _agree_ok(ok: bool) -> bool:
    """True on every process when `ok` is True on all of them (a checkpoint one process cannot read is not
    used by any)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(ok)]))))


class Checkpointer:
    """Async keep-N checkpoints of (state, data-iterator state, meta) for one stage."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        # cleanup_tmp_directories: the temporary directories of saves cut short (kill -9, a full disk) are
        # removed when the manager starts; they were never committed
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
        self._closed, self._in_flight = False, None
        _quiet_background_errors()

    def latest_step(self):
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> None:
        """Starts an async save of `state` (blocks only until the arrays are ready and copied off device). A
        failure of this save or of the previous async one raises `WriteError`."""
        jax.block_until_ready(state)
        self.wait()  # the previous async save (orbax waits for it anyway): its failure is reported with its path
        self._in_flight = os.path.join(self.directory, str(int(step)))
        with _write_errors(self._in_flight):
            self._mngr.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(to_pure_dict(state)),
                    data=ocp.args.JsonSave(dict(data_state)),
                    meta=ocp.args.JsonSave(dict(meta)),
                ),
                force=force,
            )

    def restore(self, step: int, abstract_state):
        """`(state, data_state, meta)` of `step`, the state placed as `abstract_state`'s shardings say."""
        restored = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(to_pure_dict(abstract_state)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return from_pure_dict(abstract_state, restored["state"]), dict(restored["data"]), dict(restored["meta"])

    def restore_latest(self, abstract_state, where: str):
        """`(step, state, data_state, meta)` of the newest checkpoint that can be restored, or None when there is
        none. A newer one that cannot (any read or shape error, on any process) is named with the reason in one
        warning line and moved aside (renamed `<step>.unreadable`, beside the others: kept, but no longer a step
        orbax lists), once an older one has been restored; all processes restore the same step. When none can
        be restored, nothing is moved and a ValueError names the directory. `where` prefixes the messages."""
        _quiet_abandoned_reads()
        steps = sorted(self.all_steps(), reverse=True)
        failed = []  # (step, reason) of the newer checkpoints that could not be restored
        for step in steps:
            try:
                out, reason = self.restore(step, abstract_state), ""
            except Exception as e:  # noqa: BLE001 - a corrupt or truncated checkpoint raises from tensorstore
                out, reason = None, _one_line(e)
                gc.collect()  # the abandoned reads are dropped now, quietly
            if not _agree_ok(not reason):
                failed.append((step, reason or "unreadable on another process"))
                continue
            for bad, why in failed:
                if distributed.is_primary():
                    aside = self._move_aside(bad)
                    logging.warning("%s: checkpoint %d in %s cannot be restored (%s); moved aside to %s, restored "
                                    "checkpoint %d instead", where, bad, self.directory, why, aside, step)
            if failed:
                distributed.barrier(f"{self.directory}:moved_aside")
                self._mngr.reload()
            return (step,) + tuple(out)
        if failed:
            raise ValueError(f"{where}: no checkpoint in {self.directory} can be restored ("
                             + "; ".join(f"{s}: {why}" for s, why in failed)
                             + "); nothing was moved: fix or delete that directory, then rerun the same command")
        return None

    def _move_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `<step>.unreadable` (`.unreadable.<k>` if taken); returns the new path."""
        src = os.path.join(self.directory, str(step))
        dst, k = src + ".unreadable", 1
        while os.path.exists(dst):
            dst, k = f"{src}.unreadable.{k}", k + 1
        os.rename(src, dst)
        return dst

    def wait(self) -> None:
        """Waits for the async save in flight; `WriteError` if it failed."""
        with _write_errors(self._in_flight or self.directory):
            self._mngr.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Waits for the save in flight (`WriteError` if it failed) and stops orbax's threads, whatever happens."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            try:
                self._mngr.close()
            except Exception:  # noqa: BLE001 - the failed save was reported by wait(); nothing else to stop
                pass

    def abandon(self) -> None:
        """`close` on the way out of a failure: the save in flight is waited for, its own error dropped (the
        failure being raised is the one to report), so no orbax thread outlives the run."""
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def export_params(directory: str, tree) -> None:
    """Synchronous params-only export (nested pure dict) to `directory` (which must not exist yet); a failed
    write raises `WriteError` (what was written stays for the caller to remove)."""
    ckptr = ocp.StandardCheckpointer()
    try:
        with _write_errors(os.path.abspath(directory)):
            ckptr.save(os.path.abspath(directory), to_pure_dict(tree))
            ckptr.wait_until_finished()
    finally:
        try:
            ckptr.close()
        except Exception:  # noqa: BLE001 - reported above
            pass


def load_params(directory: str, abstract_tree: dict) -> dict:
    """Reads trees of an `export_params` directory ({name: abstract params}, e.g. {'policy': ...}) into their
    structure, dtypes and shardings. An export may hold more trees than asked for (a Nash-EMA-PG stage exports
    'policy' and 'ema', of one structure): those are read into the first asked tree's layout and dropped."""
    directory = os.path.abspath(directory)
    ckptr = ocp.StandardCheckpointer()
    try:
        on_disk = list(ckptr.metadata(directory).item_metadata.keys())
        missing = sorted(set(abstract_tree) - set(on_disk))
        if missing:
            raise ValueError(f"{directory}: the export holds {sorted(on_disk)}, not {missing}")
        first = next(iter(abstract_tree.values()))
        target = {k: abstract_tree.get(k, first) for k in on_disk}
        pure = ckptr.restore(directory, to_pure_dict(target))
    finally:
        ckptr.close()
    return {k: from_pure_dict(abstract_tree[k], pure[k]) for k in abstract_tree}
