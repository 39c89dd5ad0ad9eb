"""Parameters -> the arrays the losses take: teacher-forced log-probs, rewards, judged pairs and sampled pairs.

Pure functions, shared by the compiled steps (`nash_lm.train.step`), the algorithm registry
(`nash_lm.train.algorithms`: how each algorithm draws y and y') and the evaluations.

- `response_logprobs`: log pi(y_n | x, y_<n) of a response under teacher forcing (`nash_lm.models.lm_logits`).
- `sequence_reward` / `pair_rewards`: reward-model scores.
- `Judge` and `judge_pair`: P(y > y' | x) from a preference model, a reward model (Bradley-Terry) or a JAX oracle;
  `call_host_oracle`: the one call convention of a host oracle (a Python callable on numpy arrays).
- `sample` / `sample_pair`: y (and y') from `nash_lm.sampling`, as float masks.

Prompts are left-padded (`nash_lm.data.synthetic`), so logits at prompt column P-1 predict response token 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import models, sampling


@dataclasses.dataclass(frozen=True)
class Judge:
    """How pairs are scored: 'preference' / 'reward' (a trained model), 'oracle' (a JAX function traced into
    the step) or 'host_oracle' (a Python callable on numpy arrays, called between compiled pieces)."""

    kind: str
    graphdef: Any = None
    fn: Callable | None = None

    @property
    def in_jit(self) -> bool:
        return self.kind != "host_oracle"


ORACLE_ARGS = ("prompt", "prompt_mask", "y", "y_mask", "y2", "y2_mask")  # a host oracle's positional arguments


def call_host_oracle(fn: Callable, arrays: dict) -> np.ndarray:
    """P(y > y2 | x) `[B]` float32 from a host oracle `fn(prompt, prompt_mask, y, y_mask, y2, y2_mask)` on the
    numpy arrays of `arrays` (the only place that spells the oracle's argument order)."""
    return np.asarray(fn(*(np.asarray(arrays[k]) for k in ORACLE_ARGS)), np.float32)


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


def sample(graphdef, params, batch, key, hp) -> dict:
    """`{y, y_mask}`: y ~ params (temperature and length from the policy hyper-parameters `hp`)."""
    out = sampling.sample(graphdef, params, batch["prompt"], batch["prompt_mask"], key,
                          max_new_tokens=hp.max_new_tokens, eos_id=hp.eos_id, pad_id=hp.pad_id,
                          temperature=hp.temperature)
    return {"y": out.tokens, "y_mask": out.mask.astype(jnp.float32)}


def sample_pair(graphdef, params, batch, keys, hp, mix_params=None, beta=0.0, beta_y=None) -> dict:
    """`{y, y_mask, y2, y2_mask}`: y ~ params and y2 ~ params^(1-beta) mix^beta from one decode loop
    (`sampling.sample_pair`); with `beta_y` set (IPO-MD), both are samples of that mixture. With keys
    (k_y, k_y2) the tokens are those of two separate calls, y with k_y and y' with k_y2."""
    kw = dict(max_new_tokens=hp.max_new_tokens, eos_id=hp.eos_id, pad_id=hp.pad_id, temperature=hp.temperature)
    prompt, pmask = batch["prompt"], batch["prompt_mask"]
    if beta_y is None:
        y, y2 = sampling.sample_pair(graphdef, params, prompt, pmask, keys, mix_params=mix_params, beta=beta, **kw)
    else:  # both rows are mixture samples: one loop over the prompts twice, one key per copy
        b = prompt.shape[0]
        # one model alone (a scheduled beta is traced; with LoRA, mu at beta 1 runs in the policy's pass)
        alone = beta_y == 0.0 or (beta_y == 1.0 and not sampling.same_base(mix_params))
        if isinstance(beta_y, float) and alone:
            params, mix_params = (params if beta_y == 0.0 else mix_params), None
        out = sampling.sample(graphdef, params, jnp.concatenate([prompt, prompt]), jnp.concatenate([pmask, pmask]),
                              keys, mix_params=mix_params, beta=beta_y, **kw)
        y, y2 = out.split(b)
    return {"y": y.tokens, "y_mask": y.mask.astype(jnp.float32),
            "y2": y2.tokens, "y2_mask": y2.mask.astype(jnp.float32)}
