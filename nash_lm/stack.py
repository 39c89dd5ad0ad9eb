"""The software stack a run records, and the check that a resume stays on it.

`versions()` is {name: version} of Python and of the installed packages that decide a run's bits (jax, jaxlib,
flax, optax, orbax-checkpoint, and the accelerator plugins libtpu / jax-cuda*-plugin when installed). The `train`
pipeline stores it in every stage's checkpoint metadata and `done.json` and in `summary.json`.

A resume is exact only within one stack (XLA, the optimizers and the checkpoint format all change between
releases), so `check(recorded, where)` refuses a workdir written by another stack with one ValueError line
naming what differs, unless told to go on: `--allow_stack_change` on the command line (`nash_lm.main`), or the
environment variable `NASH_LM_ALLOW_STACK_CHANGE=1` for library use. Going on is then logged in one line.
A record without a stack (a workdir from before stacks were recorded) is accepted.
"""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

from absl import logging

ENV_ALLOW = "NASH_LM_ALLOW_STACK_CHANGE"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "libtpu", "jax-cuda12-plugin",
            "jax-cuda13-plugin")


@functools.lru_cache(maxsize=None)
def _versions() -> tuple:
    out = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(out)


def versions() -> dict:
    """{'python': '3.12.1', 'jax': '0.12.1', ...} of this process (packages that are not installed omitted)."""
    return dict(_versions())


def allowed() -> bool:
    return os.environ.get(ENV_ALLOW, "").lower() in ("1", "true", "yes")


def difference(recorded: dict, current: dict | None = None) -> str:
    """'' when `recorded` is this stack, else e.g. 'jax 0.10.2 -> 0.12.1, libtpu (none) -> 0.0.52'."""
    current = versions() if current is None else current
    names = [n for n in dict.fromkeys(list(recorded) + list(current)) if recorded.get(n) != current.get(n)]
    return ", ".join(f"{n} {recorded.get(n, '(none)')} -> {current.get(n, '(none)')}" for n in names)


def check(recorded: dict | None, where: str) -> None:
    """Refuses (ValueError, one line) to go on from `where` (e.g. "stage nash_md: checkpoint 4") when it was
    written by another stack, unless allowed (see the module docstring)."""
    if not recorded:
        return
    diff = difference(recorded)
    if not diff:
        return
    if allowed():
        logging.warning("%s was written by another software stack (%s); going on as told (%s=1): the result "
                        "will differ from an uninterrupted run's", where, diff, ENV_ALLOW)
        return
    raise ValueError(f"{where} was written by another software stack ({diff}); a resume is exact only within "
                     f"one stack: rerun with --allow_stack_change to go on anyway")
