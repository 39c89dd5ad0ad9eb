"""Command-line entry point: `python -m nash_lm.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`.

Thin by design (all logic lives in importable modules, usable from Colab): it parses the config file with
ml_collections' `config_flags`, looks up `config.job` in `JOBS` and calls that job's `run(config, workdir)`.
Multi-host: `jax.distributed` is started here from `config.distributed` or the environment (see
`nash_lm.distributed`; `launch/local.py` and the pod/SLURM/GKE scripts set it), before any device is touched, so
`python -m nash_lm.main` is the one entry point on every host as on one machine.

Bad input (a missing or unloadable config file, an unknown flag or config field, a value out of range) ends
with one line on stderr and exit code 2, before anything is compiled or written. A job stopped by SIGTERM
(`nash_lm.train.pipeline.Preempted`: the current step is checkpointed) exits 0; the same command resumes it.
A failed write (a full disk while saving a checkpoint, an export, a report or a cache: any OSError, and
`nash_lm.train.checkpoint.WriteError` for orbax's writes) ends with one line naming the path and the error and
exit code 1; nothing committed before it is touched, so after freeing space the same command goes on.
`--allow_stack_change` lets a run go on from a workdir written by another software stack (`nash_lm.stack`).
"""
from __future__ import annotations

import importlib
import os
import sys
import threading

from absl import flags
from ml_collections import config_flags

from nash_lm import distributed, stack

# job name -> "module:function"; each function takes (config, workdir) and returns a summary dict.
JOBS = {
    "games": "nash_lm.games.report:run",
    "exact_benchmark": "nash_lm.tasks.exact_benchmark:run",
    "train": "nash_lm.train.pipeline:run",
    "own_data": "nash_lm.train.own_data:run",
    "ye_offline": "nash_lm.learning.experiments:run_offline",
    "ye_online": "nash_lm.learning.experiments:run_online",
    "token_game": "nash_lm.tasks.pipeline:run_token_game",
    "docstrings": "nash_lm.tasks.pipeline:run_docstrings",
    "docstrings_online": "nash_lm.tasks.online_lm:run_online_lm",
    "docstrings_study": "nash_lm.tasks.study:run",
}

CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and reports.")
_ALLOW_STACK_CHANGE = flags.DEFINE_bool(
    "allow_stack_change", False, "Go on from a workdir written by another software stack (python, jax, flax, "
    "optax, orbax, libtpu/cuda plugin versions); the result then differs from an uninterrupted run's.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def flag_error(e: BaseException, argv) -> str:
    """One line for a failure to parse the flags or to load the config file."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    if isinstance(e, flags.Error):
        return _one_line(e)
    if isinstance(e, AttributeError) and isinstance(e.__context__, KeyError):  # --config.<unknown>=v
        field = str(e.__context__.args[0]).strip("'\"") if e.__context__.args else ""
        bad = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and field in a.split("=", 1)[0]),
                   f"--config.{field}")
        return f"{bad}: no such field in {path}"
    if isinstance(e, SyntaxError):
        return f"--config: {e.filename}:{e.lineno}: {e.msg}"
    return f"--config: {path} cannot be loaded: {type(e).__name__}: {_one_line(e)}"


def _thread_write_error(args) -> None:
    """A background thread's failed write (e.g. TensorBoard's event writer on a full disk): the same one line as
    the main thread's, then exit 1 at once (the main thread may be waiting on that thread; nothing committed is
    touched). Other exceptions go to the default hook."""
    if not issubclass(args.exc_type, OSError):
        return threading.__excepthook__(args)
    from nash_lm.train.checkpoint import write_error_line

    print(f"error: {write_error_line(args.exc_value)}", file=sys.stderr, flush=True)
    os._exit(1)


def main(argv=None) -> dict:
    argv = list(sys.argv if argv is None else argv)
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        _fail(f"--config: {path}: no such file")
    try:
        flags.FLAGS(argv)
        config, workdir = CONFIG.value, _WORKDIR.value
    except Exception as e:  # a flag, an override or the config file itself
        _fail(flag_error(e, argv))
    if config is None:
        _fail("--config is required (e.g. --config=configs/games.py)")
    if not hasattr(config, "get"):
        _fail("--config: get_config() must return an ml_collections.ConfigDict")
    if not workdir:
        _fail("--workdir is required")
    if _ALLOW_STACK_CHANGE.value:
        os.environ[stack.ENV_ALLOW] = "1"
    job = config.get("job")
    if job not in JOBS:
        _fail(f"config.job: unknown job {job!r}; known: {sorted(JOBS)}")
    try:  # before anything touches devices; a no-op for one process without distributed settings
        distributed.initialize(config)
    except ValueError as e:
        _fail(_one_line(e))
    threading.excepthook = _thread_write_error
    module_name, fn_name = JOBS[job].split(":")
    run = getattr(importlib.import_module(module_name), fn_name)
    from nash_lm.train.pipeline import Preempted

    try:
        return run(config, workdir)
    except ValueError as e:  # validation errors from the job: one line, exit 2
        _fail(_one_line(e))
    except OSError as e:  # a write (checkpoint, export, report, cache) failed: one line, exit 1
        from nash_lm.train.checkpoint import write_error_line

        print(f"error: {write_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"preempted: {e}; rerun the same command to resume", file=sys.stderr)
        return {"status": "preempted", "message": str(e)}


if __name__ == "__main__":
    main()
