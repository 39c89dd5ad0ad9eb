"""Compilation: the state layout of a stage and its step, compiled ahead of time with explicit shardings.

`StageProgram(spec, run, inputs, example_batch)` owns, for one stage:

- the optimizer (`state.make_optimizer`), the abstract mutable state (step, rng, policy, Adam moments, the extra
  trees the algorithm keeps) and its sharding tree, the frozen arguments' shardings, the batch shardings;
- `init_state(policy)`: the state at step 0, created already sharded;
- `lowered()`: the step lowered for the stage's mesh, as the list of pieces it runs: one function (SFT, judges,
  policy stages with an in-jit judge) or, for a host-oracle judge, the pieces of `step.phases`, which
  `step.run_phases` (the same phase loop as the compiled step's) runs with the oracle called between them
  (`scoring.call_host_oracle`). The mutable state is donated to the last piece; the frozen inputs never are;
- `compile()`: the callable `step(mut, batch) -> (mut, metrics)` the loop runs, after logging each piece's
  compiled memory analysis.

The training loop (`nash_lm.train.stage`) and ahead-of-time inspection use this same code.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from nash_lm import distributed, parallel
from nash_lm.train import checkpoint as ckpt_lib
from nash_lm.train import schedules, scoring
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib
from nash_lm.train.spec import RunSpec, StageSpec


def policy_hparams(spec: StageSpec, run: RunSpec) -> step_lib.PolicyHParams:
    st = spec.st
    where = lambda field: f"config.stages.{spec.name}.{field}"  # already checked by spec.resolve
    named = ("tau", "beta", "ema_decay", "temperature", "max_new_tokens", "microbatches", "missing_eos_penalty",
             "ref", "judge", "beta_schedule", "tau_schedule")
    own = tuple((k, type(v)(st[k])) for k, v in sorted(spec.algorithm.fields.items())
                if k not in named and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    return step_lib.PolicyHParams(
        algorithm=spec.algorithm, own=own, tau=float(st.get("tau", 0.0)), beta=float(st.get("beta", 0.0)),
        ema_decay=float(st.get("ema_decay", 0.0)), temperature=float(st.get("temperature", 1.0)),
        max_new_tokens=int(st.get("max_new_tokens", 8)), microbatches=int(st.microbatches),
        decode_rules=run.decode_rules,
        beta_schedule=schedules.parse(st.get("beta_schedule", ""), where("beta_schedule"), 0.0, 1.0, spec.steps),
        tau_schedule=schedules.parse(st.get("tau_schedule", ""), where("tau_schedule"), 0.0, float("inf"),
                                     spec.steps),
        steps=spec.steps, missing_eos_penalty=float(st.get("missing_eos_penalty", 0.0)), eos_id=run.eos_id,
        pad_id=run.pad_id)


class StageProgram:
    def __init__(self, spec: StageSpec, run: RunSpec, inputs, example_batch: dict):
        self.spec, self.run, self.inputs = spec, run, inputs
        mesh = run.mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.tx = state_lib.make_optimizer(spec.st)
        param_sh = inputs.param_sh
        abstract_mut = jax.eval_shape(
            lambda p: state_lib.init_state(p, self.tx, spec.seed, keeps=spec.algorithm.keeps), inputs.abstract_policy)
        self.mut_sh = state_lib.state_shardings(abstract_mut, param_sh, self.tx, mesh)
        self.abstract_mut = ckpt_lib.abstract(abstract_mut, self.mut_sh)
        self.frozen_sh = jax.tree.map(lambda x: x.sharding, inputs.frozen)
        self.batch_sh = {k: self.batch_sharding(v.ndim) for k, v in example_batch.items()}
        b = spec.batch_size
        self.abstract_batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype, sharding=self.batch_sh[k])
                               for k, v in example_batch.items()}

    def batch_sharding(self, ndim: int):
        return parallel.batch_sharding(self.run.mesh, self.run.rules, ndim=ndim, batch_size=self.spec.batch_size)

    def init_state(self, policy):
        spec = self.spec
        return jax.jit(lambda p: state_lib.init_state(p, self.tx, spec.seed, keeps=spec.algorithm.keeps),
                       out_shardings=self.mut_sh)(policy)

    def _step_fn(self):
        """The whole step as one function of (mut, frozen, batch), for an in-jit judge (or none)."""
        spec, graphdef = self.spec, self.inputs.graphdef
        if spec.role == "sft":
            return functools.partial(step_lib.sft_step, graphdef, self.tx, float(spec.st.prompt_loss_weight))
        if spec.role == "judge":
            return functools.partial(step_lib.judge_step, spec.algorithm.produces, spec.st.labels, graphdef,
                                     self.tx)
        return functools.partial(step_lib.policy_step, policy_hparams(spec, self.run), graphdef, self.inputs.judge,
                                 self.tx)

    def lowered(self) -> list:
        """The step's pieces, lowered (not compiled) for the stage's mesh."""
        args = (self.abstract_mut, ckpt_lib.abstract(self.inputs.frozen), self.abstract_batch)
        if self.inputs.judge is None or self.inputs.judge.in_jit:
            return [jax.jit(self._step_fn(), in_shardings=(self.mut_sh, self.frozen_sh, self.batch_sh),
                            out_shardings=(self.mut_sh, self.replicated), donate_argnums=0).lower(*args)]
        hp, graphdef = policy_hparams(self.spec, self.run), self.inputs.graphdef
        first, *rest = step_lib.bound_phases(hp, graphdef, self.tx)
        out = [jax.jit(first, in_shardings=(self.mut_sh, self.frozen_sh, self.batch_sh)).lower(*args)]
        _, abstract_samples = jax.eval_shape(first, *args)
        samples_sh = {k: self.batch_sharding(v.ndim) for k, v in abstract_samples.items()}
        judged_shape = self._judged_shape(hp)
        vec_sh = self.batch_sharding(len(judged_shape))
        in_sh = (self.mut_sh, self.frozen_sh, self.batch_sh, samples_sh, vec_sh, self.replicated)
        between = (*args, ckpt_lib.abstract(abstract_samples, samples_sh),
                   jax.ShapeDtypeStruct(judged_shape, np.float32, sharding=vec_sh),
                   jax.ShapeDtypeStruct((2,), np.uint32, sharding=self.replicated))
        for i, fn in enumerate(rest):
            if i < len(rest) - 1:  # a lookahead round: (rng, samples) for the oracle
                out.append(jax.jit(fn, in_shardings=in_sh).lower(*between))
            else:  # the update: donates the state
                out.append(jax.jit(fn, in_shardings=in_sh, out_shardings=(self.mut_sh, self.replicated),
                                   donate_argnums=0).lower(*between))
        return out

    def _judged_shape(self, hp) -> tuple:
        """The host oracle's judgment per step: `[B]` for one pair per prompt, `[B, M]` for M."""
        m = len(hp.algorithm.judged_pairs(hp))
        return (self.spec.batch_size,) + ((m,) if m > 1 else ())

    def compile(self):
        """`step(mut, batch) -> (mut, metrics)`, compiled once (memory analysis logged)."""
        pieces = [lowered.compile() for lowered in self.lowered()]
        self._log_memory(pieces[-1])
        frozen = self.inputs.frozen
        if len(pieces) == 1:
            (compiled,) = pieces
            return lambda mut, batch: compiled(mut, frozen, batch)
        hp = policy_hparams(self.spec, self.run)
        oracle, vec_sh = self.inputs.judge.fn, self.batch_sharding(len(self._judged_shape(hp)))

        def judged(frozen, batch, samples):
            host = distributed.fetch({**batch, **samples})  # every process judges the whole global batch
            pref = scoring.call_host_oracle(oracle, step_lib.judge_arrays(hp, host, host, np))
            return distributed.global_batch_from_full(step_lib.unstack_judged(hp, pref, np), vec_sh)

        return lambda mut, batch: step_lib.run_phases(pieces, judged, mut, frozen, batch)

    def _log_memory(self, compiled):
        try:
            logging.info("stage %s: compiled step memory analysis: %s", self.spec.name, compiled.memory_analysis())
        except Exception as e:  # some backends do not implement it
            logging.info("stage %s: no memory analysis (%s)", self.spec.name, e)
