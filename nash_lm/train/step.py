"""The compiled training steps: one `jax.jit` function per stage, with explicit shardings and donation.

A Nash-MD-PG step (`policy_step` with algorithm 'nash_md_pg'), top to bottom, all inside one compiled function:

  1. split the state's RNG;
  2-3. `sample_y_y2`: y ~ pi_theta(.|x) and y' ~ the token-level mixture pi_theta^(1-beta) mu^beta, both from one
     KV-cached decode loop (`nash_lm.sampling.sample_pair`: the policy on the y and y' rows, mu on the y' rows);
     beta = 0 samples pi_theta alone (self-play), beta = 1 samples mu alone (best response), Nash-EMA-PG samples
     the EMA parameters; no gradient flows through either sample. The trees the decode runs are first re-laid
     once to `PolicyHParams.decode_rules` (`sampling.decode_layout`; default `parallel.DEFAULT_DECODE_RULES`,
     None keeps the training layout), so that the decode loop moves no weights per token;
  4. `judge`: P(y > y'|x) from the preference head (`nash_lm.models.preference_prob`), or sigmoid(r(y) - r(y'))
     from a reward model, or a JAX oracle;
  5. `ref_logprobs`: log mu(y_n | x, y_<n) (`nash_lm.models.lm_logits` of the frozen reference);
  6. `policy_grad`: log pi_theta(y_n | .) and the loss (`losses.nash_md_pg_loss`: the KL enters each token as a
     reward-to-go), value_and_grad, accumulated over `PolicyHParams.microbatches` (`accumulate_gradients`);
  7. `optimizer_update` (optax AdamW) and `ema_update` (theta_bar <- d theta_bar + (1 - d) theta).

The mutable part of the state (step, rng, policy, opt_state, ema) is donated; the reference and the judge's
parameters are a separate, non-donated argument. A `host_oracle` judge (any Python callable) cannot be traced, so
its stage compiles two halves, `rollout` (steps 1-3) and `update` (steps 5-7), and calls the oracle between them.

Prompts are left-padded (`nash_lm.data.synthetic`), so logits at prompt column P-1 predict response token 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nash_lm import models, parallel, sampling
from nash_lm.data.synthetic import EOS_ID, PAD_ID
from nash_lm.train import losses
from nash_lm.train.state import TrainState

scope = jax.named_scope


@dataclasses.dataclass(frozen=True)
class Judge:
    """How pairs are scored: 'preference' / 'reward' (a trained model), 'oracle' (a JAX function traced into
    the step) or 'host_oracle' (a Python callable on numpy arrays, called between two compiled halves)."""

    kind: str
    graphdef: Any = None
    fn: Callable | None = None

    @property
    def in_jit(self) -> bool:
        return self.kind != "host_oracle"


# ---------------------------------------------------------------------------------------------------------------
# Scoring helpers (pure; shared by the steps and the evaluations)


def response_logprobs(graphdef, params, prompt, prompt_mask, response, response_mask, temperature=1.0):
    """`(logp [B, N], greedy_correct [B, N])`: log pi(y_n | x, y_<n) of the response tokens (masked) under
    teacher forcing at `temperature`, and whether the argmax prediction equals the token."""
    p_len, n = prompt.shape[1], response.shape[1]
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    logits = models.lm_logits(graphdef, params, tokens, mask, slice(p_len - 1, p_len + n - 1))
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, response[..., None], axis=-1)[..., 0]
    return logp * response_mask, jnp.argmax(logits, axis=-1) == response


def sequence_reward(graphdef, params, prompt, prompt_mask, response, response_mask):
    """Reward-model score `[B]` of prompt + response."""
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    return models.reward(graphdef, params, tokens, mask).astype(jnp.float32)


def pair_rewards(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask):
    """`(r(x, y), r(x, y2))`, each `[B]`, from one reward-model pass over the 2B sequences."""
    b = prompt.shape[0]
    cat = lambda a, c: jnp.concatenate([a, c], axis=0)
    r = sequence_reward(graphdef, params, cat(prompt, prompt), cat(prompt_mask, prompt_mask), cat(y, y2),
                        cat(y_mask, y2_mask))
    return r[:b], r[b:]


def judge_pair(judge: Judge, judge_params, prompt, prompt_mask, y, y_mask, y2, y2_mask):
    """P(y > y2 | x) `[B]` from an in-jit judge."""
    if judge.kind == "preference":
        return models.preference_prob(judge.graphdef, judge_params, prompt, prompt_mask, y, y_mask, y2,
                                      y2_mask).astype(jnp.float32)
    if judge.kind == "reward":
        r1, r2 = pair_rewards(judge.graphdef, judge_params, prompt, prompt_mask, y, y_mask, y2, y2_mask)
        return jax.nn.sigmoid(r1 - r2)
    if judge.kind == "oracle":
        return jnp.asarray(judge.fn(prompt, prompt_mask, y, y_mask, y2, y2_mask), jnp.float32)
    raise ValueError(f"judge kind {judge.kind!r} cannot run inside a compiled step")


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


def _apply_gradients(tx, mut: TrainState, loss_fn, rng, ema_decay=None, data=None, microbatches: int = 1):
    """value_and_grad of `loss_fn(params)` (or, with `data`, of `loss_fn(params, data)` accumulated over
    `microbatches`, see `accumulate_gradients`), one optimizer update and the EMA update; returns (state,
    metrics)."""
    with scope("policy_grad"):
        if data is None:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(mut.policy)
        else:
            (loss, metrics), grads = accumulate_gradients(loss_fn, mut.policy, data, microbatches)
    grad_norm = optax.tree.norm(grads)
    with scope("optimizer_update"):
        updates, opt_state = tx.update(grads, mut.opt_state, mut.policy)
        policy = optax.apply_updates(mut.policy, updates)
    ema = mut.ema
    if ema is not None:
        with scope("ema_update"):
            ema = optax.incremental_update(policy, ema, step_size=1.0 - ema_decay)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new = mut.replace(step=mut.step + 1, rng=rng, policy=policy, opt_state=opt_state, ema=ema)
    return new, metrics


# ---------------------------------------------------------------------------------------------------------------
# SFT and judge training


def sft_step(graphdef, tx, prompt_loss_weight: float, mut: TrainState, frozen, batch):
    """Teacher forcing on the response; with `prompt_loss_weight` w > 0 the loss is NLL(response) + w NLL(prompt)
    (per-token means; the prompt's own tokens after the first, so the model also learns the prompts' language)."""
    del frozen
    prompt, pmask, response, rmask = batch["prompt"], batch["prompt_mask"], batch["response"], batch["response_mask"]

    def loss_fn(params):
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


def judge_step(kind: str, labels: str, graphdef, tx, mut: TrainState, frozen, batch):
    del frozen
    label = batch["label"] if labels == "soft" else batch["hard_label"]
    return _apply_gradients(tx, mut, lambda p: judge_loss(kind, graphdef, p, batch, label), mut.rng)


# ---------------------------------------------------------------------------------------------------------------
# Policy optimisation: Nash-MD-PG (+ self-play, best response), Nash-EMA-PG, RLHF, online IPO, IPO-MD


@dataclasses.dataclass(frozen=True)
class PolicyHParams:
    algorithm: str
    tau: float
    beta: float = 0.0
    ema_decay: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 8
    decode_rules: Any = parallel.DEFAULT_DECODE_RULES  # the sampler's layout (None: the training layout)
    microbatches: int = 1  # the update's gradient accumulation: the batch in this many equal microbatches


def _sample(graphdef, params, batch, key, hp: PolicyHParams):
    out = sampling.sample(graphdef, params, batch["prompt"], batch["prompt_mask"], key,
                          max_new_tokens=hp.max_new_tokens, eos_id=EOS_ID, pad_id=PAD_ID, temperature=hp.temperature)
    return out.tokens, out.mask.astype(jnp.float32)


def _sample_pair(graphdef, params, batch, keys, hp: PolicyHParams, mix_params=None, beta=0.0, beta_y=None):
    """`{y, y_mask, y2, y2_mask}`: y ~ params and y2 ~ params^(1-beta) mix^beta from one decode loop
    (`sampling.sample_pair`); with `beta_y` set (IPO-MD), both are samples of that mixture."""
    kw = dict(max_new_tokens=hp.max_new_tokens, eos_id=EOS_ID, pad_id=PAD_ID, temperature=hp.temperature)
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    if beta_y is None:
        y, y2 = sampling.sample_pair(graphdef, params, prompt, pmask, keys, mix_params=mix_params, beta=beta, **kw)
    else:  # both rows are mixture samples: one loop over the prompts twice, one key per copy
        b = prompt.shape[0]
        if beta_y in (0.0, 1.0):  # one model alone
            params, mix_params = (params if beta_y == 0.0 else mix_params), None
        out = sampling.sample(graphdef, params, jnp.concatenate([prompt, prompt]), jnp.concatenate([pmask, pmask]),
                              keys, mix_params=mix_params, beta=beta_y, **kw)
        y, y2 = out.split(b)
    return {"y": y.tokens, "y_mask": y.mask.astype(jnp.float32),
            "y2": y2.tokens, "y2_mask": y2.mask.astype(jnp.float32)}


def rollout(hp: PolicyHParams, graphdef, mut: TrainState, frozen, batch):
    """Steps 1-3: `(rng', samples)` with samples {y, y_mask[, y2, y2_mask]}; no gradient flows through them.

    y and y' come from one decode loop (`sampling.sample_pair`); with keys (k_y, k_y2) its tokens are those of two
    separate calls, y with k_y and y' with k_y2."""
    ref, _ = frozen
    rng, k_y, k_y2 = jax.random.split(mut.rng, 3)
    algo = hp.algorithm
    with scope("sample_y_y2"), sampling.decode_layout(graphdef, hp.decode_rules) as to_decode:
        policy, ref, ema = to_decode(mut.policy), to_decode(ref), to_decode(mut.ema)  # once, before the decode
        if algo == "rlhf":
            samples = dict(zip(("y", "y_mask"), _sample(graphdef, policy, batch, k_y, hp)))
        elif algo == "nash_md_pg":
            samples = _sample_pair(graphdef, policy, batch, (k_y, k_y2), hp, mix_params=ref, beta=hp.beta)
        elif algo == "ipo_md":
            samples = _sample_pair(graphdef, policy, batch, (k_y, k_y2), hp, mix_params=ref, beta_y=hp.beta)
        elif algo == "nash_ema_pg":
            samples = _sample_pair(graphdef, policy, batch, (k_y, k_y2), hp, mix_params=ema, beta=1.0)
        else:  # online_ipo: two policy samples
            samples = _sample_pair(graphdef, policy, batch, (k_y, k_y2), hp)
    samples = jax.lax.stop_gradient(samples)
    return rng, samples


def score(hp: PolicyHParams, judge: Judge, frozen, batch, samples):
    """Step 4: P(y > y') `[B]` (or the reward r(y) for RLHF), computed inside the compiled step."""
    _, judge_params = frozen
    with scope("judge"):
        if hp.algorithm == "rlhf":
            return sequence_reward(judge.graphdef, judge_params, batch["prompt"], batch["prompt_mask"],
                                   samples["y"], samples["y_mask"])
        return judge_pair(judge, judge_params, batch["prompt"], batch["prompt_mask"], samples["y"],
                          samples["y_mask"], samples["y2"], samples["y2_mask"])


def update(hp: PolicyHParams, graphdef, tx, mut: TrainState, frozen, batch, samples, judged, rng):
    """Steps 5-7: reference log-probs, the algorithm's loss, gradients, optimizer and EMA updates."""
    ref, _ = frozen
    judged = jax.lax.stop_gradient(judged)
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    y, y_mask = samples["y"], samples["y_mask"]
    t = hp.temperature
    with scope("ref_logprobs"):
        ref_y, _ = response_logprobs(graphdef, ref, prompt, pmask, y, y_mask, t)
        if hp.algorithm in ("online_ipo", "ipo_md"):
            ref_y2, _ = response_logprobs(graphdef, ref, prompt, pmask, samples["y2"], samples["y2_mask"], t)
    ref_y = jax.lax.stop_gradient(ref_y)
    if hp.microbatches > 1 and hp.algorithm == "rlhf":  # its leave-one-out baseline spans the whole batch
        raise ValueError(f"microbatches={hp.microbatches}: RLHF's batch baseline needs microbatches=1")
    # The per-example arrays the loss reads; `accumulate_gradients` splits them into microbatches.
    data = {"prompt": prompt, "pmask": pmask, "y": y, "y_mask": y_mask, "ref_y": ref_y, "judged": judged}
    if hp.algorithm in ("online_ipo", "ipo_md"):
        data.update(y2=samples["y2"], y2_mask=samples["y2_mask"], ref_y2=jax.lax.stop_gradient(ref_y2))

    def loss_fn(params, d):
        logp_y, _ = response_logprobs(graphdef, params, d["prompt"], d["pmask"], d["y"], d["y_mask"], t)
        if hp.algorithm in ("nash_md_pg", "nash_ema_pg"):
            return losses.nash_md_pg_loss(logp_y, d["ref_y"], d["y_mask"], d["judged"], hp.tau)
        if hp.algorithm == "rlhf":
            return losses.rlhf_pg_loss(logp_y, d["ref_y"], d["y_mask"], d["judged"], hp.tau)
        logp_y2, _ = response_logprobs(graphdef, params, d["prompt"], d["pmask"], d["y2"], d["y2_mask"], t)
        return losses.ipo_loss(logp_y, d["ref_y"], d["y_mask"], logp_y2, d["ref_y2"], d["y2_mask"], d["judged"],
                               hp.tau)

    new, metrics = _apply_gradients(tx, mut, loss_fn, rng, hp.ema_decay if mut.ema is not None else None,
                                    data=data, microbatches=hp.microbatches)
    metrics["response_len"] = jnp.mean(jnp.sum(y_mask, axis=-1))
    return new, metrics


def policy_step(hp: PolicyHParams, graphdef, judge: Judge, tx, mut: TrainState, frozen, batch):
    """The whole policy-optimisation step (rollout, judge, update) as one function, for one jax.jit."""
    rng, samples = rollout(hp, graphdef, mut, frozen, batch)
    # The judge and the update read their weights after the decode: XLA:TPU would otherwise overlap their
    # (training-layout) gathers with the decode loop's compute, inside the loop, at every token.
    samples, mut, frozen = jax.lax.optimization_barrier((samples, mut, frozen))
    judged = score(hp, judge, frozen, batch, samples)
    return update(hp, graphdef, tx, mut, frozen, batch, samples, judged, rng)


# ---------------------------------------------------------------------------------------------------------------
# Evaluations (no donation, fixed keys: they never touch the training trajectory)


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
    with sampling.decode_layout(graphdef, hp.decode_rules) as to_decode:
        return _sample_pair(graphdef, to_decode(params), batch, keys, dataclasses.replace(hp, temperature=1.0),
                            mix_params=to_decode(ref), beta=1.0)


def eval_policy(hp: PolicyHParams, graphdef, judge: Judge, params, ref, judge_params, batch, key):
    """In-jit judge: rollout, P(y > y'), KL, in one compiled evaluation. RLHF's reward model judges as BT."""
    samples = eval_policy_rollout(hp, graphdef, params, ref, batch, key)
    samples, params, ref, judge_params = jax.lax.optimization_barrier((samples, params, ref, judge_params))
    if judge.kind == "reward" or hp.algorithm == "rlhf":
        judge = Judge("reward", graphdef=judge.graphdef)
    win = judge_pair(judge, judge_params, batch["prompt"], batch["prompt_mask"], samples["y"], samples["y_mask"],
                     samples["y2"], samples["y2_mask"])
    return eval_policy_metrics(graphdef, params, ref, batch, samples, win)


def eval_policy_metrics(graphdef, params, ref, batch, samples, win_prob):
    logp, _ = response_logprobs(graphdef, params, batch["prompt"], batch["prompt_mask"], samples["y"],
                                samples["y_mask"])
    ref_logp, _ = response_logprobs(graphdef, ref, batch["prompt"], batch["prompt_mask"], samples["y"],
                                    samples["y_mask"])
    return {"win_rate_vs_ref": jnp.mean(win_prob), "kl_to_ref": jnp.mean(jnp.sum(logp - ref_logp, axis=-1)),
            "response_len": jnp.mean(jnp.sum(samples["y_mask"], axis=-1))}
