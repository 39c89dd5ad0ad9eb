"""Command-line entry point: `python -m nash_lm.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`.

Thin by design (all logic lives in importable modules, usable from Colab): it parses the config file with
ml_collections' `config_flags`, looks up `config.job` in `JOBS` and calls that job's `run(config, workdir)`.
Multi-host: `jax.distributed` is started here from `config.distributed` or the environment (see
`nash_lm.distributed`; `launch/local.py` and the pod/SLURM/GKE scripts set it), before any device is touched, so
`python -m nash_lm.main` is the one entry point on every host as on one machine.
Bad input (an unknown flag or config field, a value out of range) ends with one line on stderr and exit code 2,
before anything is compiled or written.
"""
from __future__ import annotations

import importlib
import sys

from absl import flags
from ml_collections import config_flags

from nash_lm import distributed

# job name -> "module:function"; each function takes (config, workdir) and returns a summary dict.
JOBS = {
    "games": "nash_lm.games.report:run",
    "train": "nash_lm.train.loop:run",
    "ye_offline": "nash_lm.learning.experiments:run_offline",
    "ye_online": "nash_lm.learning.experiments:run_online",
    "token_game": "nash_lm.tasks.pipeline:run_token_game",
    "docstrings": "nash_lm.tasks.pipeline:run_docstrings",
    "docstrings_online": "nash_lm.tasks.online_lm:run_online_lm",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and reports.")


class ConfigError(ValueError):
    """A configuration or input error reported as one line with exit code 2."""


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> dict:
    argv = list(sys.argv if argv is None else argv)
    try:
        flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None:
        _fail("--config is required (e.g. --config=configs/games.py)")
    if not workdir:
        _fail("--workdir is required")
    job = config.get("job")
    if job not in JOBS:
        _fail(f"config.job: unknown job {job!r}; known: {sorted(JOBS)}")
    try:  # before anything touches devices; a no-op for one process without distributed settings
        distributed.initialize(config)
    except ValueError as e:
        _fail(str(e).splitlines()[0])
    module_name, fn_name = JOBS[job].split(":")
    run = getattr(importlib.import_module(module_name), fn_name)
    try:
        return run(config, workdir)
    except ValueError as e:  # validation errors from the job: one line, exit 2
        _fail(str(e).splitlines()[0])


if __name__ == "__main__":
    main()
