"""One stage run to completion: restore or initialise, the step loop with its cadence, export, `done.json`.

`Stage(spec, run, data, writer, host_oracle).run(stop_flag)`, in `WORKDIR/stages/<name>/`:

1. `fingerprint.json`; the inputs (`nash_lm.train.inputs.StageInputs`) and the compiled program
   (`nash_lm.train.compile.StageProgram`);
2. the latest checkpoint restored if there is one (exact resume: parameters, optimizer state, RNG and data
   position; a checkpoint of another fingerprint, or of another software stack (`nash_lm.stack`), is refused;
   one that cannot be read is moved aside and the previous one restored, `Checkpointer.restore_latest`),
   otherwise the state at step 0;
3. the loop: metrics every `log_every` steps (tokens/s, TFLOP/s per device, MFU from the analytic FLOPs of the
   algorithm's record), evaluation every `eval_every`, checkpoints every `checkpoint_every` (async, keep-N);
   `stop_flag()` true on any process (SIGTERM) -> the current step is saved and `Preempted` raised;
   non-finite loss or gradients -> `FloatingPointError` naming the step, the last good checkpoint intact;
4. the final checkpoint, the params export (`export/`: policy, and the EMA when the algorithm keeps one), the
   held-out evaluation (`nash_lm.train.evaluate`) and `done.json` (final metrics, evaluation, parameter hashes).

A LoRA stage checkpoints its adapters (the train state holds nothing else of the model) with the base's content
hash in the checkpoint's meta; resuming onto a base with another hash is refused. Its `export/` holds the
adapters merged into the base (`nash_lm.models.lora.merge`: a plain tree, read by later stages and
`nash_lm.export` like any other), and `adapters/` the adapters alone ({policy[, ema]}) with `adapters.json`
(rank, alpha, targets, the base's hash).

`data` maps (kind, split) to the stage's sources (`nash_lm.train.data`: arrays or records files), kind its
algorithm's `data` ('sft', 'pairs', 'prompts') and split 'train' or 'eval'; the training batches come from the
source's iterator (a seeded permutation of arrays, or a grain pipeline over records), whose state is
checkpointed with the parameters, so a resumed stage draws the batches an uninterrupted one would.
"""
from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from nash_lm import distributed, stack
from nash_lm.models import lora as lora_lib
from nash_lm.train import algorithms
from nash_lm.train import data as data_lib
from nash_lm.train import checkpoint as ckpt_lib
from nash_lm.train.compile import StageProgram
from nash_lm.train.evaluate import Evaluator
from nash_lm.train.inputs import StageInputs
from nash_lm.train.spec import RunSpec, StageSpec, stage_dir


class Preempted(Exception):
    """Raised inside a stage after SIGTERM once the current step is checkpointed."""


def _agreed(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a SIGTERM that reached only some processes must stop
    all of them after the same step: the checkpoint saves are collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def check_data(spec: StageSpec, data: dict) -> None:
    """The stage's data (`nash_lm.train.data` sources) exists and holds at least one batch (one line naming the
    field otherwise)."""
    kind = spec.algorithm.data
    for split in ("train", "eval"):
        if (kind, split) not in data:
            raise ValueError(f"config.stages.{spec.name}: no {kind!r} data for the {split!r} split")
        n = len(data[(kind, split)])
        if spec.batch_size > n:
            raise ValueError(f"config.stages.{spec.name}.batch_size: {spec.batch_size} exceeds the {n} "
                             f"{split} examples of its {kind!r} data")


class Stage:
    def __init__(self, spec: StageSpec, run: RunSpec, data: dict, writer, host_oracle=None, peak_flops=1.0):
        self.spec, self.run_spec, self.writer, self.peak_flops = spec, run, writer, peak_flops
        self.host_oracle = host_oracle
        self._bar = None  # the step loop's progress bar
        self.dir = stage_dir(run.workdir, spec.name)
        kind = spec.algorithm.data
        self.train_data, self.eval_data = (data_lib.as_source(data[(kind, split)]) for split in ("train", "eval"))

    def build(self):
        """Inputs and program (reads the input exports; compiles nothing)."""
        self.inputs = StageInputs(self.spec, self.run_spec, self.host_oracle)
        self.program = StageProgram(self.spec, self.run_spec, self.inputs, self.train_data.example())
        self.evaluate = Evaluator(self.spec, self.inputs, self.program, self.eval_data.arrays())
        return self

    def step_flops(self) -> float:
        spec, data = self.spec, self.run_spec.data
        judge = self.inputs.judge.kind if self.inputs.judge is not None else ""
        return algorithms.step_flops(spec.algorithm, spec.st, spec.model, data.prompt_len, data.response_len, judge)

    def run(self, stop_flag) -> dict:
        spec = self.spec
        if distributed.is_primary():
            os.makedirs(self.dir, exist_ok=True)
        distributed.write_json(os.path.join(self.dir, "fingerprint.json"), spec.fingerprint)
        self.build()
        st = spec.st
        ckpt = ckpt_lib.Checkpointer(os.path.join(self.dir, "checkpoints"), keep=st.keep_checkpoints,
                                     async_save=bool(self.run_spec.config.async_checkpoints))
        try:
            mut = self._resume_and_train(ckpt, stop_flag)
            ckpt.close()
        except BaseException:
            if self._bar is not None:  # cleared before the error's one line is printed
                self._bar.close()
            ckpt.abandon()  # no orbax thread outlives a failure (its own error is reported by this one)
            raise
        return self._finish(mut)

    def _resume_and_train(self, ckpt, stop_flag):
        spec, st = self.spec, self.spec.st
        iterator = self.train_data.batches(st.batch_size, spec.seed, self.program.batch_sh)
        restored = ckpt.restore_latest(self.program.abstract_mut, f"stage {spec.name}")
        latest = None if restored is None else restored[0]
        if restored is not None:
            _, mut, data_state, meta = restored
            stack.check(meta.get("stack"), f"stage {spec.name}: checkpoint {latest} in {ckpt.directory}")
            if meta.get("fingerprint") != spec.fingerprint_hash:
                raise ValueError(f"stage {spec.name}: checkpoint {latest} has fingerprint {meta.get('fingerprint')}, "
                                 f"expected {spec.fingerprint_hash}")
            if meta.get("base_sha256") != self.inputs.base_sha256:
                raise ValueError(f"stage {spec.name}: checkpoint {latest} adapts a base with sha256 "
                                 f"{meta.get('base_sha256')}, but the base is now {self.inputs.base_sha256}")
            iterator.set_state(data_state)
            logging.info("stage %s: resumed from step %d", spec.name, latest)
        else:
            mut = self.program.init_state(self.inputs.init_policy())
        step = latest or 0
        self.writer.truncate(spec.name, step)
        meta = {"fingerprint": spec.fingerprint_hash, "stage": spec.name, "stack": stack.versions()}
        if self.inputs.base_sha256 is not None:
            meta["base_sha256"] = self.inputs.base_sha256
        if step < st.steps:
            mut = self._train(self.program.compile(), mut, iterator, ckpt, step, meta, stop_flag)
        return mut

    def _train(self, train_step, mut, iterator, ckpt, step, meta, stop_flag):
        from tqdm import tqdm

        spec, st = self.spec, self.spec.st
        flops = self.step_flops()
        n_dev = self.run_spec.mesh.size
        tokens_per_step = st.batch_size * spec.algorithm.sequences * (
            self.run_spec.data.prompt_len + int(st.get("max_new_tokens", self.run_spec.data.response_len)))
        bar = self._bar = tqdm(total=st.steps, initial=step, desc=spec.name, unit="step", dynamic_ncols=True,
                               leave=False, disable=not distributed.is_primary())
        t_last, steps_since = time.perf_counter(), 0
        while step < st.steps:
            batch = next(iterator)
            mut, metrics = train_step(mut, batch)
            step += 1
            steps_since += 1
            if not bool(metrics["finite"]):
                ckpt.wait()
                last = ckpt.latest_step()
                bar.close()
                raise FloatingPointError(
                    f"stage {spec.name}: non-finite loss or gradients at step {step} (loss={float(metrics['loss'])},"
                    f" grad_norm={float(metrics['grad_norm'])}); stopped. Last good checkpoint: "
                    f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}")
            bar.update(1)
            if step % st.log_every == 0 or step == st.steps:
                dt = time.perf_counter() - t_last
                rate = steps_since / dt
                flops_per_s_dev = flops * rate / n_dev
                record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                record.update(tokens_per_s=tokens_per_step * rate, steps_per_s=rate,
                              tflops_per_s_per_device=flops_per_s_dev / 1e12,
                              mfu=flops_per_s_dev / self.peak_flops)
                self.writer.write(spec.name, step, record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                logging.info("stage %s step %d: %s", spec.name, step, {k: round(v, 5) for k, v in record.items()})
                t_last, steps_since = time.perf_counter(), 0
            if st.eval_every and step % st.eval_every == 0 and step < st.steps:
                self.writer.write(spec.name, step, {f"eval/{k}": v for k, v in self.evaluate(mut).items()})
            if step % st.checkpoint_every == 0 or step == st.steps:
                ckpt.save(step, mut, iterator.get_state(), {**meta, "step": step})
            if _agreed(stop_flag()):
                if step % st.checkpoint_every and step != st.steps:
                    ckpt.save(step, mut, iterator.get_state(), {**meta, "step": step}, force=True)
                ckpt.close()
                bar.close()
                logging.warning("stage %s: SIGTERM, saved step %d, exiting", spec.name, step)
                raise Preempted(f"stage {spec.name} preempted at step {step}")
        bar.close()
        return mut

    def _adapters_dir(self) -> str:
        return os.path.join(self.dir, "adapters")

    def _merged(self, trained: dict) -> dict:
        """{name: the base with those adapters merged in} (a plain tree, on the base's shardings)."""
        base = lora_lib.split(self.inputs.ref)[1]
        merge = jax.jit(lambda ad, base: lora_lib.merge(self.spec.model, self.spec.lora, lora_lib.join(ad, base)),
                        out_shardings=self.inputs.plain_shardings())
        return {name: merge(ad, base) for name, ad in trained.items()}

    def _finish(self, mut) -> dict:
        spec = self.spec
        export = os.path.join(self.dir, "export")
        if distributed.is_primary():  # leftovers of an export cut short by a kill (export.partial, orbax's
            # temporary export.partial.orbax-checkpoint-tmp*, the same of adapters); the final checkpoint is complete
            for name in os.listdir(self.dir):
                path = os.path.join(self.dir, name)
                if name.split(".")[0] in ("export", "adapters") and os.path.isdir(path):
                    shutil.rmtree(path)
        distributed.barrier(f"{spec.name}:export_clean")
        trained = {"policy": mut.policy, **({"ema": mut.ema} if mut.ema is not None else {})}
        tree = trained if spec.lora is None else self._merged(trained)
        for path, content in [(export, tree)] + ([] if spec.lora is None else [(self._adapters_dir(), trained)]):
            ckpt_lib.export_params(path + ".partial", content)  # collective: every process writes its shards
            distributed.barrier(f"{spec.name}:exported:{os.path.basename(path)}")
            if distributed.is_primary():
                os.replace(path + ".partial", path)
            distributed.barrier(f"{spec.name}:export_renamed:{os.path.basename(path)}")
        evaluation = self.evaluate(mut)
        self.writer.write(spec.name, spec.steps, {"final": True, **{f"eval/{k}": v for k, v in evaluation.items()}})
        done = {
            "stage": spec.name,
            "algorithm": spec.algorithm.name,
            "produces": spec.algorithm.produces,
            "steps": int(mut.step),
            "fingerprint": spec.fingerprint_hash,
            "final_metrics": self.writer.last(spec.name),
            "eval": {k: float(v) for k, v in evaluation.items()},
            "policy_params_sha256": ckpt_lib.params_sha256(tree["policy"]),
            "stack": stack.versions(),
        }
        reports = {split: data_lib.report_json(src) for split, src in (("train", self.train_data),
                                                                       ("eval", self.eval_data))}
        if any(reports.values()):
            done["data"] = reports
        if mut.ema is not None:
            done["ema_params_sha256"] = ckpt_lib.params_sha256(tree["ema"])
        if spec.lora is not None:
            adapters = {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "targets": list(spec.lora.targets),
                        "base_sha256": self.inputs.base_sha256,
                        "adapters_sha256": ckpt_lib.params_sha256(mut.policy)}
            distributed.write_json(os.path.join(self.dir, "adapters.json"), adapters)
            done["adapters"] = adapters
        distributed.write_json(os.path.join(self.dir, "done.json"), done)
        return done
