"""Schedules of a policy stage's beta (the mixture weight) and tau (the KL coefficient) over its steps.

A schedule is a string field of the stage (`beta_schedule`, `tau_schedule`); the stage's own `beta` / `tau` is the
value at step 0:

    ""                          constant (the default)
    "linear:END"                from the stage's value at step 0 to END at the last step, linearly
    "cosine:END"                the same with a half-cosine (flat at both ends)
    "steps:S1=V1,S2=V2,..."     piecewise constant: V1 from step S1 on, V2 from S2 on, ... (the stage's value before
                                S1; 0 < S1 < S2 < ... < steps)

`parse(text, where, lo, hi, steps)` checks a schedule (values in [lo, hi], ascending steps) and returns a hashable
tuple (part of the static `PolicyHParams`), raising one ValueError that starts with `where` otherwise. `value(sched,
start, step, steps)` is the schedule at step `step` (0-based, the step being computed; a traced int inside the
compiled step). A schedule changes its value inside one compiled program, so the sampler treats a scheduled beta
as lying strictly inside (0, 1): it always runs both the policy and mu (exact at the ends too).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

KINDS = ("linear", "cosine", "steps")


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _number(text: str, where: str, lo: float, hi: float) -> float:
    try:
        v = float(text)
    except ValueError:
        _fail(where, f"expected a number, got {text!r}")
    if not (math.isfinite(v) and lo <= v <= hi):
        _fail(where, f"value {v} outside [{lo}, {hi}]")
    return v


def parse(text: str, where: str, lo: float, hi: float, steps: int) -> tuple:
    """'' -> (); 'linear:0.05' -> ('linear', 0.05); 'steps:10=0.2,20=0.1' -> ('steps', ((10, 0.2), (20, 0.1)))."""
    if not isinstance(text, str):
        _fail(where, f"expected a string, got {text!r}")
    text = text.strip()
    if not text:
        return ()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        _fail(where, f"expected '', 'linear:END', 'cosine:END' or 'steps:S1=V1,S2=V2,...', got {text!r}")
    if kind in ("linear", "cosine"):
        return kind, _number(rest, where, lo, hi)
    points, last = [], 0
    for item in rest.split(","):
        s, eq, v = item.partition("=")
        if not eq or not s.strip().isdigit():
            _fail(where, f"expected 'STEP=VALUE' pairs, got {item!r}")
        s = int(s)
        if not last < s < steps:
            _fail(where, f"steps must increase strictly within (0, steps={steps}), got {s} after {last}")
        points.append((s, _number(v, where, lo, hi)))
        last = s
    return "steps", tuple(points)


def value(sched: tuple, start: float, step, steps: int):
    """The scheduled value at `step` (0-based) of a stage of `steps` steps; `start` when `sched` is ()."""
    if not sched:
        return start
    kind, arg = sched
    if kind == "steps":
        out = jnp.asarray(start, jnp.float32)
        for s, v in arg:
            out = jnp.where(step >= s, jnp.float32(v), out)
        return out
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps - 1, 1), 0.0, 1.0)
    if kind == "cosine":
        t = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
    return jnp.float32(start) + (jnp.float32(arg) - jnp.float32(start)) * t
