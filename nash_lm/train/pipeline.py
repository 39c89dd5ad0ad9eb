"""The pipeline runner every job uses, and the `train` job.

`Pipeline(config, workdir, data=..., host_oracle=..., origins=...)` resolves the training config once
(`nash_lm.train.spec.resolve`: every check, nothing written), then `run(names, data=...)` runs stages in
pipeline order, each in `WORKDIR/stages/<name>/` (`nash_lm.train.stage.Stage`): a stage whose `done.json`
exists is skipped and its record returned; the others resume from their latest checkpoint or start. A job may
call `run` several times (the docstring jobs build pair data between stages), read stage outputs with
`params(name)`, and name the tokenizer of the data it hands over with `use_tokenizer` (its EOS and padding ids).

- Data (`nash_lm.train.data`): a stage that names records files (`train_data`, `eval_data`; `config.data.kind
  = 'records'`) reads those, already checked by `resolve`. Otherwise a mapping (or a callable) from (kind, split)
  to arrays, kind 'sft' | 'pairs' | 'prompts' and split 'train' | 'eval', handed over by the job; without one,
  the synthetic data of `config.data`. A stage gets its two splits through its constructor, checked against its
  batch size first.
- Host oracle: the Python callable P(y > y' | x) on numpy arrays that stages with `judge = 'host_oracle'` call
  between the compiled pieces of their step.
- SIGTERM: from construction to `close()` a SIGTERM sets a flag; the running stage checkpoints its current step
  and raises `Preempted`, and so does the next `run` when the signal came between stages. `nash_lm.main` exits 0
  on `Preempted`; the same command resumes.

`run(config, workdir)` is the `train` job (`nash_lm.main.JOBS`): the whole `config.pipeline` on synthetic data
or the stages' records files (from random initialisations or `hf:` checkpoints), `WORKDIR/config.json` first and `WORKDIR/summary.json` last (final metrics per stage,
wall time, the config hash, `policy_params_sha256` of the last language-model stage).

Several processes (`nash_lm.distributed`): every process runs this same code on one global mesh; JSON files,
metrics and TensorBoard events are written by process 0 only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Callable, Mapping

from absl import logging

from nash_lm import distributed, parallel, stack
from nash_lm.data import synthetic
from nash_lm.train import config as cfg_lib
from nash_lm.train import data as data_lib
from nash_lm.train import inputs as inputs_lib
from nash_lm.train import metrics as metrics_lib
from nash_lm.train import spec as spec_lib
from nash_lm.train.stage import Preempted, Stage, check_data

__all__ = ["Pipeline", "Preempted", "run"]


def _provider(data) -> Callable:
    if data is None or callable(data):
        return data
    if isinstance(data, Mapping):
        return lambda kind, split: data[(kind, split)] if (kind, split) in data else None
    raise TypeError(f"data: expected a mapping (kind, split) -> arrays or a callable, got {type(data).__name__}")


class Pipeline:
    def __init__(self, config, workdir: str, *, data=None, host_oracle: Callable | None = None,
                 origins: dict | None = None):
        self.spec = spec_lib.resolve(config, workdir, origins=origins, host_oracle=host_oracle is not None,
                                     provided_data=data is not None)
        self.workdir = self.spec.workdir
        self.host_oracle = host_oracle
        self._data = _provider(data) or (lambda kind, split: synthetic.dataset_for(kind, self.spec.data, split))
        self._writer = None
        self._peak = None
        self._stop = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def use_tokenizer(self, tokenizer) -> None:
        """The job's own data was tokenized by `tokenizer`: its stop and padding ids become the policy stages'
        (sampler, missing-EOS penalty). A records run takes them from its tokenizer at `resolve`."""
        self.spec = dataclasses.replace(self.spec, eos_id=int(tokenizer.eos_id), pad_id=int(tokenizer.pad_id))

    def _on_sigterm(self, signum, frame):
        self._stop = True
        logging.warning("SIGTERM received: the current step will be checkpointed, then the run stops")

    @property
    def peak_flops(self) -> float:
        if self._peak is None:
            self._peak = self.spec.peak_flops()
            logging.info("peak FLOP/s per device for MFU: %.3g (%s)", self._peak,
                         "configured" if self.spec.config.peak_tflops > 0 else "measured")
        return self._peak

    def done(self, name: str) -> dict | None:
        path = os.path.join(spec_lib.stage_dir(self.workdir, name), "done.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def run(self, names=None, data=None) -> dict:
        """Runs the named stages (default: the whole pipeline) in pipeline order; {name: done record}."""
        order = self.spec.order
        names = order if names is None else list(names)
        unknown = [n for n in names if n not in self.spec.stages]
        if unknown:
            raise ValueError(f"config.pipeline: stage(s) {unknown} are not in the pipeline {order}")
        provider = _provider(data) or self._data
        results, checked = {}, False
        if distributed.is_primary():
            os.makedirs(self.workdir, exist_ok=True)
        with parallel.activate(self.spec.mesh, self.spec.rules):
            for name in [n for n in order if n in names]:
                if self._stop:
                    raise Preempted(f"SIGTERM before stage {name}")
                record = self.done(name)
                if record is not None:
                    logging.info("stage %s: complete, skipped", name)
                    results[name] = record
                    continue
                if not checked:  # the stages to run would go on from outputs of another stack
                    for done_name, done in results.items():
                        stack.check(done.get("stack"), f"stage {name}: the complete stage {done_name} before it")
                    checked = True
                spec = self.spec.stages[name]
                kind = spec.algorithm.data
                if name in self.spec.sources:  # records files the stage names
                    stage_data = {(kind, split): src for split, src in self.spec.sources[name].items()}
                else:
                    stage_data = {(kind, split): provider(kind, split) for split in ("train", "eval")}
                stage_data = {k: data_lib.as_source(v) for k, v in stage_data.items() if v is not None}
                check_data(spec, stage_data)
                if self._writer is None:
                    self._writer = metrics_lib.MetricsWriter(self.workdir)
                stage = Stage(spec, self.spec, stage_data, self._writer, self.host_oracle, self.peak_flops)
                results[name] = stage.run(lambda: self._stop)
        return results

    def params(self, name: str, key: str = "policy"):
        """(graphdef, params) of a complete stage's export ('policy', or 'ema' for an algorithm with an EMA)."""
        return inputs_lib.load_stage_params(self.spec, name, key)

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run(config, workdir: str) -> dict:
    """`train` job: runs `config.pipeline`; returns the summary (also written to WORKDIR/summary.json)."""
    t0 = time.time()
    with Pipeline(config, workdir) as pipe:  # raises ValueError before anything is written
        distributed.write_json(os.path.join(pipe.workdir, "config.json"), cfg_lib.to_jsonable(config))
        peak = pipe.peak_flops
        results = pipe.run()
    order = pipe.spec.order
    policy_stages = [n for n in order if results[n]["produces"] == "lm"]
    summary = {
        "status": "complete",
        "wall_time_s": time.time() - t0,
        "config_hash": cfg_lib.config_hash(config),
        "pipeline": order,
        "stages": results,
        "final_stage": order[-1],
        "final_metrics": results[order[-1]]["final_metrics"],
        "final_eval": results[order[-1]]["eval"],
        "policy_params_sha256": results[policy_stages[-1]]["policy_params_sha256"] if policy_stages else None,
        "peak_flops_per_device": peak,
        "stack": stack.versions(),
    }
    distributed.write_json(os.path.join(pipe.workdir, "summary.json"), summary)
    return summary
