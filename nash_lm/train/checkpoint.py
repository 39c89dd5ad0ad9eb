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
save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

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


class Checkpointer:
    """Async keep-N checkpoints of (state, data-iterator state, meta) for one stage."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self):
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> None:
        """Starts an async save of `state` (blocks only until the arrays are ready and copied off device)."""
        jax.block_until_ready(state)
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

    def read_meta(self, step: int) -> dict:
        return dict(self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def export_params(directory: str, tree) -> None:
    """Synchronous params-only export (nested pure dict) to `directory` (which must not exist yet)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), to_pure_dict(tree))
    ckptr.wait_until_finished()
    ckptr.close()


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
