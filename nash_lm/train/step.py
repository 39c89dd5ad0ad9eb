"""The compiled training steps: one `jax.jit` function per stage, with explicit shardings and donation.

A policy step (`policy_step`) runs `phases(hp)` through `run_phases`, all inside one compiled function:

  1. `rollout`: split the state's RNG; the algorithm's `sample` (its family module in
     `nash_lm.train.algorithms`) draws y (and y') from the policy, mu and the state's extra trees (a `Trees`),
     first re-laid once to `PolicyHParams.decode_rules` (`sampling.decode_layout`; default
     `parallel.DEFAULT_DECODE_RULES`, None keeps the training layout) so that the decode loop moves no weights
     per token; no gradient flows through the samples;
  2. `score`: the judge, P(y > y'|x) from the preference head, sigmoid(r(y) - r(y')) from a reward model, a JAX
     oracle (`nash_lm.train.scoring.judge_pair`), or r(x, y) for an algorithm judged by reward;
  3. for an algorithm with `lookahead` rounds (EGPO), `lookahead`: a provisional step and new samples from it,
     judged again;
  4. `update`: the log-probs of the scored responses under the algorithm's `against` trees (mu, an anchor, ...)
     as constants, log pi_theta and the algorithm's loss, value_and_grad accumulated over
     `PolicyHParams.microbatches` (`accumulate_gradients`), the optimizer (optax AdamW), then the algorithm's
     `advance` of the state's extra trees (the EMA, an anchor, a magnet).

Reading one Nash-MD-PG step: this file (`policy_step` -> `run_phases` -> `rollout`, `score`, `update`) ->
`nash_lm.train.algorithms.nash_md_pg` (y ~ pi_theta, y' ~ the token-level mixture pi_theta^(1-beta) mu^beta;
the loss) -> `nash_lm.train.losses.common` (the reward-to-go surrogate); the sampler (`nash_lm.sampling`), the
judge and the model (`nash_lm.train.scoring`, `nash_lm.models`) are called from these. What differs between
policy algorithms is read from the algorithm's record (`PolicyHParams.algorithm`); this file has no special case.

LoRA stages (`nash_lm.models.lora`): the state's policy (and its extra trees) hold the adapters only, so the
gradient, Adam and the EMA cover the adapters alone; `Frozen.ref` is the base in the adapted structure with zero
adapters (mu = the base, exactly), and pi_theta is that base joined with the trained adapters (`_policy`). The
decode samples the mixture with `sampling.ADAPTERS_OFF` (pi's and mu's rows in one pass over the base weights)
and an extra tree with `sampling.Adapters(tree)` (pi's rows and the tree's in one pass).

The mutable state (step, rng, policy, opt_state, extra trees) is donated; the frozen inputs (`Frozen`: the
reference, the judge's parameters, a LoRA base) are a separate, non-donated argument. A `host_oracle` judge (any
Python callable) cannot be traced, so its stage compiles the pieces of `phases` and runs them with the same
`run_phases`, the oracle called between them (`nash_lm.train.scoring.call_host_oracle`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nash_lm import models, parallel, sampling
from nash_lm.data.synthetic import EOS_ID, PAD_ID
from nash_lm.models import lora
from nash_lm.train import algorithms, losses, schedules
from nash_lm.train.scoring import (Judge, judge_pair, pair_rewards, response_logprobs, sample_pair,
                                  sequence_reward)
from nash_lm.train.state import Frozen, TrainState

scope = jax.named_scope

__all__ = ["Frozen", "Judge", "PolicyHParams", "eval_judge", "eval_policy", "eval_policy_metrics",
           "eval_policy_rollout", "accumulate_gradients", "judge_step", "phases", "policy_step", "rollout",
           "bound_phases", "run_phases", "score", "sft_step", "update"]


# ---------------------------------------------------------------------------------------------------------------
# Gradients, optimizer and EMA


def _policy(trained, ref):
    """The parameters pi_theta runs with: the trained tree, or, when it holds LoRA adapters, the frozen base
    (`ref`, with its zero adapters) joined with them."""
    if trained is None or not lora.is_adapters(trained):
        return trained
    return lora.join(trained, lora.split(ref)[1])


def accumulate_gradients(loss_fn, params, data, microbatches: int = 1):
    """`((loss, metrics), grads)` of `loss_fn(params, data)` (`data` a pytree of [B, ...] per-example arrays),
    accumulated over `microbatches` equal microbatches: one `lax.scan` step per microbatch, the losses, metrics
    and gradients summed and divided by their number. For a loss that is a mean over the B examples (and
    metrics that are means) this is the full-batch result up to rounding, with the activations of B /
    microbatches rows live at a time. Microbatch j holds rows j, j + M, j + 2M, ... (M = microbatches), so
    each device keeps its own rows of a batch sharded in contiguous blocks."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn(params, data)
    b = jax.tree.leaves(data)[0].shape[0]
    if microbatches < 1 or b % microbatches:
        raise ValueError(f"microbatches={microbatches}: must be a positive divisor of the batch size {b}")
    m = microbatches
    xs = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1), data)

    def body(acc, mb):
        mb = jax.tree.map(lambda x: parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
        return jax.tree.map(jnp.add, acc, grad_fn(params, mb)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], xs))
    acc, _ = jax.lax.scan(body, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), xs)
    return jax.tree.map(lambda a: a / m, acc)


def _apply_gradients(tx, mut: TrainState, loss_fn, rng, data=None, microbatches: int = 1):
    """value_and_grad of `loss_fn(params)` (or, with `data`, of `loss_fn(params, data)` accumulated over
    `microbatches`, see `accumulate_gradients`) and one optimizer update; returns (state, metrics)."""
    with scope("policy_grad"):
        if data is None:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(mut.policy)
        else:
            (loss, metrics), grads = accumulate_gradients(loss_fn, mut.policy, data, microbatches)
    grad_norm = optax.tree.norm(grads)
    with scope("optimizer_update"):
        updates, opt_state = tx.update(grads, mut.opt_state, mut.policy)
        policy = optax.apply_updates(mut.policy, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new = mut.replace(step=mut.step + 1, rng=rng, policy=policy, opt_state=opt_state)
    return new, metrics


# ---------------------------------------------------------------------------------------------------------------
# SFT and judge training


def sft_step(graphdef, tx, prompt_loss_weight: float, mut: TrainState, frozen: Frozen, batch):
    """Teacher forcing on the response; with `prompt_loss_weight` w > 0 the loss is NLL(response) + w NLL(prompt)
    (per-token means; the prompt's own tokens after the first, so the model also learns the prompts' language).
    With LoRA, `frozen.base` is the base the trained adapters are joined with."""
    base = frozen.base
    prompt, pmask, response, rmask = batch["prompt"], batch["prompt_mask"], batch["response"], batch["response_mask"]

    def loss_fn(params):
        params = _policy(params, base)
        if not prompt_loss_weight:
            logp, correct = response_logprobs(graphdef, params, prompt, pmask, response, rmask)
            return losses.sft_loss(logp, rmask, correct)
        p_len = prompt.shape[1]
        tokens = jnp.concatenate([prompt, response], axis=1)
        logits = models.lm_logits(graphdef, params, tokens, jnp.concatenate([pmask, rmask], axis=1))
        logits = logits[:, :-1].astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, 1:, None], axis=-1)[..., 0]
        correct = jnp.argmax(logits[:, p_len - 1:], axis=-1) == response
        loss, metrics = losses.sft_loss(logp[:, p_len - 1:] * rmask, rmask, correct)
        target_mask = pmask[:, 1:] * pmask[:, :-1]  # prompt tokens 1.. predicted from a real prefix
        prompt_nll = -jnp.sum(logp[:, :p_len - 1] * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)
        return loss + prompt_loss_weight * prompt_nll, {**metrics, "prompt_nll_per_token": prompt_nll}

    return _apply_gradients(tx, mut, loss_fn, mut.rng)


def judge_loss(kind: str, graphdef, params, batch, label):
    if kind == "preference":
        prob = models.preference_prob(graphdef, params, batch["prompt"], batch["prompt_mask"], batch["y"],
                                      batch["y_mask"], batch["y2"], batch["y2_mask"]).astype(jnp.float32)
        return losses.preference_ce_loss(prob, label)
    r1, r2 = pair_rewards(graphdef, params, batch["prompt"], batch["prompt_mask"], batch["y"], batch["y_mask"],
                          batch["y2"], batch["y2_mask"])
    return losses.bradley_terry_loss(r1, r2, label)


def judge_step(kind: str, labels: str, graphdef, tx, mut: TrainState, frozen: Frozen, batch):
    """One step of the preference or reward loss. With LoRA, `frozen.base` is the judge's frozen base (its
    backbone) the trained adapters and head are joined with."""
    base = frozen.base
    label = batch["label"] if labels == "soft" else batch["hard_label"]
    return _apply_gradients(tx, mut, lambda p: judge_loss(kind, graphdef, _policy(p, base), batch, label), mut.rng)


# ---------------------------------------------------------------------------------------------------------------
# Policy optimisation: every algorithm of `nash_lm.train.algorithms` with role 'policy'


@dataclasses.dataclass(frozen=True)
class PolicyHParams:
    algorithm: algorithms.Algorithm  # its record (a registered name is looked up)
    tau: float
    beta: float = 0.0
    ema_decay: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 8
    decode_rules: Any = parallel.DEFAULT_DECODE_RULES  # the sampler's layout (None: the training layout)
    microbatches: int = 1  # the update's gradient accumulation: the batch in this many equal microbatches
    beta_schedule: tuple = ()  # `nash_lm.train.schedules.parse` of the stage's beta_schedule / tau_schedule
    tau_schedule: tuple = ()
    steps: int = 1  # the stage's steps (the schedules' length)
    missing_eos_penalty: float = 0.0
    eos_id: int = EOS_ID  # the tokenizer's end of sequence (the sampler stops there) and padding
    pad_id: int = PAD_ID
    own: tuple = ()  # ((field, value), ...): the algorithm's other numeric fields (`get`)

    def __post_init__(self):
        if isinstance(self.algorithm, str):
            object.__setattr__(self, "algorithm", algorithms.get(self.algorithm))

    def get(self, field: str):
        """One of the algorithm's own numeric fields (`own`)."""
        return dict(self.own)[field]

    def at(self, step) -> "PolicyHParams":
        """These hyper-parameters at `step` (a traced int): beta and tau from their schedules (then cleared, so
        calling `at` again changes nothing); unchanged without schedules."""
        if not (self.beta_schedule or self.tau_schedule):
            return self
        return dataclasses.replace(
            self, beta=schedules.value(self.beta_schedule, self.beta, step, self.steps),
            tau=schedules.value(self.tau_schedule, self.tau, step, self.steps), beta_schedule=(), tau_schedule=())


def missing_eos(tokens, mask, eos_id: int):
    """1.0 for a sampled completion `[B, N]` that has no EOS within its tokens (it ran to max_new_tokens), else 0."""
    return 1.0 - jnp.any((tokens == eos_id) & (mask > 0), axis=-1).astype(jnp.float32)


def penalize_missing_eos(hp: PolicyHParams, judged, samples):
    """The judgment with the missing-EOS penalty c: a reward r(y) - c m(y); a preference
    P(y > y') - c m(y) + c m(y'), which stays antisymmetric (swapping y and y' gives one minus it), with m the
    indicator of a completion without EOS (`missing_eos`). For Nash-MD-PG only y is scored, so the + c m(y')
    term is a baseline that does not depend on y (its gradient vanishes in expectation)."""
    c = hp.missing_eos_penalty
    if not c:
        return judged
    judged = judged - c * missing_eos(samples["y"], samples["y_mask"], hp.eos_id)
    if hp.algorithm.judged == "pair":
        judged = judged + c * missing_eos(samples["y2"], samples["y2_mask"], hp.eos_id)
    return judged


def rollout(hp: PolicyHParams, graphdef, mut: TrainState, frozen: Frozen, batch):
    """`(rng', samples)` with samples {y, y_mask[, y2, y2_mask]}; no gradient flows through them."""
    hp = hp.at(mut.step)
    rng, k_y, k_y2 = jax.random.split(mut.rng, 3)
    ref = frozen.ref
    policy, extras = _policy(mut.policy, ref), mut.extras()
    if lora.is_adapters(mut.policy):  # LoRA: mu (adapters off) and the extra trees (their adapters) in pi's pass
        ref, extras = sampling.ADAPTERS_OFF, {k: sampling.Adapters(v) for k, v in extras.items()}
    with scope("sample_y_y2"), sampling.decode_layout(graphdef, hp.decode_rules) as to_decode:
        trees = algorithms.Trees(to_decode(policy), to_decode(ref),  # once, before the decode
                                 **{k: to_decode(v) for k, v in extras.items()})
        samples = hp.algorithm.sample(hp, graphdef, trees, batch, (k_y, k_y2))
    samples = jax.lax.stop_gradient(samples)
    return rng, samples


def judge_arrays(hp: PolicyHParams, batch, samples, xp=jnp) -> dict:
    """{prompt, prompt_mask, y, y_mask, y2, y2_mask} of the algorithm's judged pairs, the M pairs stacked along
    the batch (M B rows; `xp` jnp inside a compiled step, numpy for a host oracle)."""
    pairs = hp.algorithm.judged_pairs(hp)
    rows = lambda x: xp.concatenate([x] * len(pairs)) if len(pairs) > 1 else x
    cat = lambda key, i: (samples[f"{pairs[0][i]}{key}"] if len(pairs) == 1
                          else xp.concatenate([samples[f"{p[i]}{key}"] for p in pairs]))
    return {"prompt": rows(batch["prompt"]), "prompt_mask": rows(batch["prompt_mask"]), "y": cat("", 0),
            "y_mask": cat("_mask", 0), "y2": cat("", 1), "y2_mask": cat("_mask", 1)}


def unstack_judged(hp: PolicyHParams, judged, xp=jnp):
    """The judgments of `judge_arrays`' M B rows as `[B]` (one pair) or `[B, M]`."""
    m = len(hp.algorithm.judged_pairs(hp))
    return judged if m == 1 else xp.transpose(judged.reshape((m, -1)))


def score(hp: PolicyHParams, judge: Judge, frozen: Frozen, batch, samples):
    """The judgment inside the compiled step: P(y > y') of the algorithm's pairs (`[B]`, or `[B, M]`), the
    reward r(y) of an algorithm judged by reward, or the labels of an algorithm on labelled pairs."""
    alg = hp.algorithm
    if alg.judged == "label":
        return samples["label"]
    with scope("judge"):
        if alg.judged == "reward":
            return sequence_reward(judge.graphdef, frozen.judge, batch["prompt"], batch["prompt_mask"],
                                   samples["y"], samples["y_mask"])
        a = judge_arrays(hp, batch, samples)
        return unstack_judged(hp, judge_pair(judge, frozen.judge, a["prompt"], a["prompt_mask"], a["y"],
                                             a["y_mask"], a["y2"], a["y2_mask"]))


def _loss_and_data(hp: PolicyHParams, graphdef, extras: dict, frozen: Frozen, batch, samples, judged):
    """(loss_fn(params, data) -> (loss, metrics), data): `data` holds the per-example arrays the loss reads (the
    prompt, the scored responses with their log-probs under the algorithm's `against` trees, the judgment), so
    that `accumulate_gradients` can split them into microbatches."""
    alg = hp.algorithm
    if hp.microbatches > 1 and alg.batch_coupled:
        raise ValueError(f"microbatches={hp.microbatches}: the {alg.name} loss couples the examples of a batch "
                         f"(e.g. a leave-one-out baseline) and needs microbatches=1")
    ref = frozen.ref
    against = {"ref": ref, **{k: _policy(v, ref) for k, v in extras.items()}}
    judged = penalize_missing_eos(hp, jax.lax.stop_gradient(judged), samples)
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    t = hp.temperature
    data = {"prompt": prompt, "pmask": pmask, "judged": judged}
    with scope("ref_logprobs"):
        for r in alg.responses(hp):
            data[r], data[f"{r}_mask"] = samples[r], samples[f"{r}_mask"]
            for tree in alg.against:
                data[f"{tree}_{r}"] = response_logprobs(graphdef, against[tree], prompt, pmask, samples[r],
                                                        samples[f"{r}_mask"], t)[0]
    data = jax.lax.stop_gradient(data)

    def loss_fn(params, d):
        params = _policy(params, ref)
        lp = {r: response_logprobs(graphdef, params, d["prompt"], d["pmask"], d[r], d[f"{r}_mask"], t)[0]
              for r in alg.responses(hp)}
        return alg.loss(hp, lp, d)

    return loss_fn, data


def lookahead(hp: PolicyHParams, graphdef, tx, mut: TrainState, frozen: Frozen, batch, samples, judged, rng):
    """An extragradient round: the provisional step theta' = theta_t - lr grad L(theta_t; samples) (the optimizer
    applied to the current state, its new state discarded), then `(rng', samples')` drawn with theta' in place of
    theta_t. The update that follows takes its gradient at theta_t on samples' (mirror prox)."""
    hp = hp.at(mut.step)
    with scope("lookahead_grad"):
        loss_fn, data = _loss_and_data(hp, graphdef, mut.extras(), frozen, batch, samples, judged)
        (_, _), grads = accumulate_gradients(loss_fn, mut.policy, data, hp.microbatches)
        updates, _ = tx.update(grads, mut.opt_state, mut.policy)
        provisional = optax.apply_updates(mut.policy, updates)
    return rollout(hp, graphdef, mut.replace(rng=rng, policy=provisional), frozen, batch)


def update(hp: PolicyHParams, graphdef, tx, mut: TrainState, frozen: Frozen, batch, samples, judged, rng):
    """Log-probs under the `against` trees, the algorithm's loss, gradients, the optimizer, then the algorithm's
    `advance` of the extra trees."""
    scheduled = bool(hp.beta_schedule or hp.tau_schedule)
    hp = hp.at(mut.step)
    loss_fn, data = _loss_and_data(hp, graphdef, mut.extras(), frozen, batch, samples, judged)
    new, metrics = _apply_gradients(tx, mut, loss_fn, rng, data=data, microbatches=hp.microbatches)
    if hp.algorithm.advance is not None:
        new = hp.algorithm.advance(hp, mut, new)
    metrics["response_len"] = jnp.mean(jnp.sum(samples["y_mask"], axis=-1))
    metrics["missing_eos_rate"] = jnp.mean(missing_eos(samples["y"], samples["y_mask"], hp.eos_id))
    if scheduled:
        metrics.update(beta=jnp.float32(hp.beta), tau=jnp.float32(hp.tau))
    return new, metrics


def phases(hp: PolicyHParams) -> tuple:
    """The step's pieces between two judge calls: `rollout(hp, graphdef, mut, frozen, batch)`, then each
    `f(hp, graphdef, tx, mut, frozen, batch, samples, judged, rng)`: the algorithm's lookahead rounds (returning
    `(rng, samples)`) and `update` (returning `(state, metrics)`)."""
    return (rollout,) + (lookahead,) * hp.algorithm.lookahead + (update,)


def bound_phases(hp: PolicyHParams, graphdef, tx) -> list:
    """`phases(hp)` with (hp, graphdef[, tx]) bound: the pieces `run_phases` runs (traced, or each compiled)."""
    first, *rest = phases(hp)
    return [functools.partial(first, hp, graphdef)] + [functools.partial(f, hp, graphdef, tx) for f in rest]


def run_phases(pieces, judged, mut: TrainState, frozen: Frozen, batch, barrier=lambda trees: trees):
    """The one phase loop, for the compiled step and the host-oracle path alike: `pieces` are `bound_phases`
    (traced functions, or their compiled programs), `judged(frozen, batch, samples)`
    the judge between them (`score` traced, or a host oracle), and `barrier` what separates a decode from what
    reads weights after it (inside one compiled step: `jax.lax.optimization_barrier`)."""
    first, *middle, last = pieces
    rng, samples = first(mut, frozen, batch)
    samples, mut, frozen = barrier((samples, mut, frozen))
    for piece in middle:
        rng, samples = piece(mut, frozen, batch, samples, judged(frozen, batch, samples), rng)
        samples, mut, frozen = barrier((samples, mut, frozen))
    return last(mut, frozen, batch, samples, judged(frozen, batch, samples), rng)


def policy_step(hp: PolicyHParams, graphdef, judge: Judge, tx, mut: TrainState, frozen: Frozen, batch):
    """The whole policy-optimisation step (rollout, judge, [lookahead, judge,] update) as one function, for one
    jax.jit."""
    # The judge and the update read their weights after each decode: XLA:TPU would otherwise overlap their
    # (training-layout) gathers with the decode loop's compute, inside the loop, at every token.
    return run_phases(bound_phases(hp, graphdef, tx), functools.partial(score, hp, judge), mut, frozen, batch,
                      barrier=jax.lax.optimization_barrier)


# ---------------------------------------------------------------------------------------------------------------
# Evaluations (no donation, fixed keys: they never touch the training trajectory)


def eval_labelled(hp: PolicyHParams, graphdef, params, frozen: Frozen, batch):
    """An algorithm on labelled pairs (DPO, offline IPO), evaluated by its loss and metrics on held-out pairs."""
    samples = hp.algorithm.sample(hp, graphdef, None, batch, None)
    loss_fn, data = _loss_and_data(hp, graphdef, {}, frozen, batch, samples, score(hp, None, frozen, batch, samples))
    loss, metrics = loss_fn(params, data)
    return {"loss": loss, **metrics}


def eval_sft(graphdef, params, batch):
    logp, correct = response_logprobs(graphdef, params, batch["prompt"], batch["prompt_mask"], batch["response"],
                                      batch["response_mask"])
    return losses.sft_loss(logp, batch["response_mask"], correct)[1]


def eval_judge(kind: str, graphdef, params, batch):
    loss, metrics = judge_loss(kind, graphdef, params, batch, batch["label"])
    hard_loss, hard = judge_loss(kind, graphdef, params, batch, batch["hard_label"])
    return {"loss": loss, "accuracy": metrics["accuracy"], "accuracy_vs_sampled_labels": hard["accuracy"]}


def eval_policy_rollout(hp: PolicyHParams, graphdef, params, ref, batch, key):
    """y ~ pi (the trained or the averaged policy), y' ~ mu: the pair that measures improvement over mu."""
    keys = tuple(jax.random.split(key))
    policy = _policy(params, ref)
    mu = sampling.ADAPTERS_OFF if lora.is_adapters(params) else ref
    with sampling.decode_layout(graphdef, hp.decode_rules) as to_decode:
        return sample_pair(graphdef, to_decode(policy), batch, keys, dataclasses.replace(hp, temperature=1.0),
                           mix_params=to_decode(mu), beta=1.0)


def eval_policy(hp: PolicyHParams, graphdef, judge: Judge, params, ref, judge_params, batch, key):
    """In-jit judge: rollout, P(y > y'), KL, in one compiled evaluation (a reward model judges as BT)."""
    samples = eval_policy_rollout(hp, graphdef, params, ref, batch, key)
    samples, params, ref, judge_params = jax.lax.optimization_barrier((samples, params, ref, judge_params))
    win = judge_pair(judge, judge_params, batch["prompt"], batch["prompt_mask"], samples["y"], samples["y_mask"],
                     samples["y2"], samples["y2_mask"])
    return eval_policy_metrics(graphdef, params, ref, batch, samples, win)


def eval_policy_metrics(graphdef, params, ref, batch, samples, win_prob):
    logp, _ = response_logprobs(graphdef, _policy(params, ref), batch["prompt"], batch["prompt_mask"], samples["y"],
                                samples["y_mask"])
    ref_logp, _ = response_logprobs(graphdef, ref, batch["prompt"], batch["prompt_mask"], samples["y"],
                                    samples["y_mask"])
    return {"win_rate_vs_ref": jnp.mean(win_prob), "kl_to_ref": jnp.mean(jnp.sum(logp - ref_logp, axis=-1)),
            "response_len": jnp.mean(jnp.sum(samples["y_mask"], axis=-1))}
