"""Runs a module as `python -m` would, after arranging for this process to SIGKILL itself at one chosen call.

    KILL_AT=orbax.checkpoint:StandardCheckpointer.save python tests/killpoint.py nash_lm.main --config=...

`KILL_AT` is `module:attribute.path`, optionally `@N` (the N-th call, default 1) and `+` (kill after the call
returns instead of on entry), e.g. `nash_lm.tasks.pipeline:TextSampler.__call__@2+`. The kill is a real
`kill -9` of the real program at a point the test chooses, so a fault-injection test does not depend on timing.
"""
import functools
import importlib
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arm(spec: str) -> None:
    after = spec.endswith("+")
    spec = spec.rstrip("+")
    spec, _, nth = spec.partition("@")
    nth = int(nth or 1)
    module_name, _, path = spec.partition(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for attr in owners:
        owner = getattr(owner, attr)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if calls[0] == nth and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapped)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    arm(os.environ["KILL_AT"])
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
