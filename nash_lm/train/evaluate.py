"""Held-out evaluation of a stage: SFT NLL/accuracy, judge accuracy, policy win rate against mu and KL.

`Evaluator(spec, inputs, program, eval_data)` jits its functions once per stage and uses fixed keys
(`PRNGKey(stage seed + batch index)`), so an evaluation never touches the training RNG. A policy stage's
policy (and, for an algorithm with an EMA, the averaged policy, reported with the prefix `ema_`) samples y,
mu samples y', and the stage's judge scores the pair: in the same compiled function for an in-jit judge,
between a compiled rollout and compiled metrics for a host oracle. An algorithm on labelled pairs (DPO, offline
IPO: no judge) reports its loss and metrics on held-out pairs instead (`step.eval_labelled`).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from nash_lm import distributed
from nash_lm.data import synthetic
from nash_lm.train import scoring
from nash_lm.train import step as step_lib
from nash_lm.train.compile import policy_hparams


def mean(results: list[dict]) -> dict:
    return {k: float(np.mean([float(r[k]) for r in results])) for k in results[0]}


class Evaluator:
    def __init__(self, spec, inputs, program, eval_data: dict):
        self.spec, self.inputs, self.program, self.eval_data = spec, inputs, program, eval_data
        self._fn = None

    def __call__(self, mut) -> dict:
        spec = self.spec
        it = synthetic.BatchIterator(self.eval_data, spec.batch_size, spec.seed, "eval")
        batches = [distributed.global_batch_from_full(next(it), self.program.batch_sh)
                   for _ in range(spec.st.eval_batches)]
        if self._fn is None:
            self._fn = self._build()
        if spec.role != "policy":
            return mean([self._fn(self.inputs.full_params(mut.policy), x) for x in batches])
        out = {}
        for label, params in [("", mut.policy)] + ([("ema_", mut.ema)] if mut.ema is not None else []):
            res = mean([self._fn(params, x, self._key(i)) for i, x in enumerate(batches)])
            out.update({f"{label}{k}": v for k, v in res.items()})
        return out

    def _key(self, i):
        """The fixed evaluation key of batch i, replicated on the mesh (the same on every process)."""
        key = np.asarray(jax.random.PRNGKey(self.spec.seed + i))
        return distributed.global_batch_from_full(key, self.program.replicated)

    def _build(self):
        spec, graphdef, inputs = self.spec, self.inputs.graphdef, self.inputs
        if spec.role == "sft":
            return jax.jit(functools.partial(step_lib.eval_sft, graphdef))
        if spec.role == "judge":
            return jax.jit(functools.partial(step_lib.eval_judge, spec.algorithm.produces, graphdef))
        hp, judge, ref = policy_hparams(spec, self.program.run), inputs.judge, inputs.ref
        if spec.algorithm.judged == "label":  # labelled pairs: the loss and its metrics on held-out pairs
            fn = jax.jit(functools.partial(step_lib.eval_labelled, hp, graphdef))
            return lambda params, batch, key: fn(params, inputs.frozen, batch)
        if judge.in_jit:
            fn = jax.jit(functools.partial(step_lib.eval_policy, hp, graphdef, judge))
            return lambda params, batch, key: fn(params, ref, inputs.judge_params, batch, key)
        rollout = jax.jit(functools.partial(step_lib.eval_policy_rollout, hp, graphdef))
        metrics = jax.jit(functools.partial(step_lib.eval_policy_metrics, graphdef))

        def host_judged(params, batch, key):
            samples = rollout(params, ref, batch, key)
            host = distributed.fetch({**batch, **samples})
            win = distributed.global_batch_from_full(scoring.call_host_oracle(judge.fn, host),
                                                     self.program.batch_sharding(1))
            return metrics(params, ref, batch, samples, win)

        return host_judged
