"""Deterministic synthetic data for tests and the tiny pipeline: prompts, SFT pairs, labelled preference pairs,
and a non-transitive preference oracle on token sequences.

Token conventions: 0 = PAD, 1 = BOS, 2 = EOS, content tokens are 3 .. vocab_size - 1. Prompts are BOS plus
content tokens, *left*-padded to `prompt_len` (the last prompt column is always a real token, so a response can
be appended directly). Responses are right-padded to `response_len`, end with EOS when shorter, and carry a mask
that covers the tokens up to and including EOS.

Every split is a fixed array built from `(seed, split)`; batch `k` of an epoch is a slice of a permutation drawn
from `(seed, split, epoch)`. The iterator state is therefore just the number of batches consumed
(`{"batches": k}`), which the checkpoint stores; resuming at `k` replays exactly the same batches.

The oracle (`synthetic_preference`) is a pure JAX function, so it can run inside a compiled step as a
preference model stand-in, or on the host (via numpy) as a "rater in the loop":

    P(y > y'|x) = sigmoid( a * (s(x, y) - s(x, y')) + b * cyc(y, y') )

s counts response tokens that occur in the prompt (relevance) and penalises distance from a target length;
cyc is rock-paper-scissors on (sum of response tokens mod 3). P is antisymmetric and, through cyc,
non-transitive.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_CONTENT_ID = 3
_SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    vocab_size: int = 32
    prompt_len: int = 8
    response_len: int = 8
    n_examples: int = 256
    seed: int = 0

    def validate(self):
        if self.vocab_size < FIRST_CONTENT_ID + 3:
            raise ValueError(f"data.vocab_size must be >= {FIRST_CONTENT_ID + 3}, got {self.vocab_size}")
        if self.prompt_len < 2:
            raise ValueError(f"data.prompt_len must be >= 2, got {self.prompt_len}")
        if self.response_len < 1:
            raise ValueError(f"data.response_len must be >= 1, got {self.response_len}")
        if self.n_examples < 2:
            raise ValueError(f"data.n_examples must be >= 2, got {self.n_examples}")
        return self


def _rng(cfg: SyntheticConfig, split: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLITS[split], *extra])


def _prompts(cfg: SyntheticConfig, rng: np.random.Generator):
    n, p = cfg.n_examples, cfg.prompt_len
    lengths = rng.integers(max(2, p // 2), p + 1, size=n)  # BOS + content
    tokens = np.zeros((n, p), np.int32)
    mask = np.zeros((n, p), np.float32)
    content = rng.integers(FIRST_CONTENT_ID, cfg.vocab_size, size=(n, p))
    for i, ln in enumerate(lengths):
        tokens[i, p - ln] = BOS_ID
        tokens[i, p - ln + 1:] = content[i, : ln - 1]
        mask[i, p - ln:] = 1.0
    return tokens, mask


def _random_responses(cfg: SyntheticConfig, rng: np.random.Generator, n: int):
    r = cfg.response_len
    n_content = rng.integers(0, r + 1, size=n)  # r content tokens = truncated (no EOS)
    content = rng.integers(FIRST_CONTENT_ID, cfg.vocab_size, size=(n, r))
    return _finish(content, n_content, r)


def _finish(content, n_content, r):
    """Right-pad `n_content[i]` content tokens, then EOS unless the response is truncated at `r` tokens."""
    n = content.shape[0]
    tokens = np.zeros((n, r), np.int32)
    mask = np.zeros((n, r), np.float32)
    for i, k in enumerate(n_content):
        tokens[i, :k] = content[i, :k]
        if k < r:
            tokens[i, k] = EOS_ID
        mask[i, : min(k + 1, r)] = 1.0
    return tokens, mask


def prompt_dataset(cfg: SyntheticConfig, split: str) -> dict:
    """`{"prompt", "prompt_mask"}` arrays of `n_examples` rows."""
    tokens, mask = _prompts(cfg, _rng(cfg, split, 0))
    return {"prompt": tokens, "prompt_mask": mask}


def sft_dataset(cfg: SyntheticConfig, split: str) -> dict:
    """Prompts with target responses: the prompt's content tokens reversed (up to `response_len - 1`), then EOS."""
    data = prompt_dataset(cfg, split)
    r = cfg.response_len
    content = np.zeros((cfg.n_examples, r), np.int32)
    n_content = np.zeros(cfg.n_examples, np.int64)
    for i in range(cfg.n_examples):
        c = data["prompt"][i][data["prompt_mask"][i] > 0][1:][::-1][: r - 1]
        content[i, : len(c)] = c
        n_content[i] = len(c)
    data["response"], data["response_mask"] = _finish(content, n_content, r)
    return data


def preference_dataset(cfg: SyntheticConfig, split: str) -> dict:
    """Prompts with two random responses and oracle labels: `label` (soft, P(y > y')) and `hard_label` (a draw)."""
    data = prompt_dataset(cfg, split)
    rng = _rng(cfg, split, 1)
    data["y"], data["y_mask"] = _random_responses(cfg, rng, cfg.n_examples)
    data["y2"], data["y2_mask"] = _random_responses(cfg, rng, cfg.n_examples)
    p = synthetic_preference_numpy(data["prompt"], data["prompt_mask"], data["y"], data["y_mask"], data["y2"],
                                   data["y2_mask"])
    data["label"] = p.astype(np.float32)
    data["hard_label"] = (rng.uniform(size=p.shape) < p).astype(np.float32)
    return data


def _score(prompt, prompt_mask, y, y_mask):
    in_prompt = jnp.any((y[:, :, None] == prompt[:, None, :]) & (prompt_mask[:, None, :] > 0), axis=-1)
    content = (y >= FIRST_CONTENT_ID) & (y_mask > 0)
    relevance = jnp.sum(in_prompt & content, axis=-1).astype(jnp.float32)
    length = jnp.sum(y_mask, axis=-1)
    target = 0.5 * y.shape[1]
    return relevance - 0.5 * jnp.abs(length - target)


def _cycle_class(y, y_mask):
    return jnp.sum(jnp.where(y_mask > 0, y, 0), axis=-1) % 3


def synthetic_preference(prompt, prompt_mask, y, y_mask, y2, y2_mask, *, a=1.0, b=1.5):
    """P(y > y2 | prompt) `[B]`; antisymmetric (P(y, y2) + P(y2, y) = 1) and non-transitive."""
    prompt, y, y2 = (jnp.asarray(t) for t in (prompt, y, y2))
    prompt_mask, y_mask, y2_mask = (jnp.asarray(t, jnp.float32) for t in (prompt_mask, y_mask, y2_mask))
    diff = _score(prompt, prompt_mask, y, y_mask) - _score(prompt, prompt_mask, y2, y2_mask)
    d = (_cycle_class(y, y_mask) - _cycle_class(y2, y2_mask)) % 3
    cyc = jnp.where(d == 1, 1.0, jnp.where(d == 2, -1.0, 0.0))
    return jax.nn.sigmoid(a * diff + b * cyc)


_synthetic_preference_jit = jax.jit(synthetic_preference)


def synthetic_preference_numpy(prompt, prompt_mask, y, y_mask, y2, y2_mask):
    """The same oracle called as a host (non-JAX) rater: numpy in, numpy out."""
    return np.asarray(jax.device_get(_synthetic_preference_jit(*(np.asarray(t) for t in (
        prompt, prompt_mask, y, y_mask, y2, y2_mask)))))


class BatchIterator:
    """Deterministic, resumable batches over one split. State: the number of batches consumed."""

    def __init__(self, data: dict, batch_size: int, seed: int, split: str = "train", batches: int = 0):
        self.data = data
        self.n = len(next(iter(data.values())))
        if batch_size > self.n:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n} examples of the {split} split")
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.batches = batches
        self._per_epoch = self.n // batch_size
        self._perm_epoch, self._perm = -1, None

    def get_state(self) -> dict:
        return {"batches": int(self.batches)}

    def set_state(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, k = divmod(self.batches, self._per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, _SPLITS[self.split], 2, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        idx = self._perm[k * self.batch_size:(k + 1) * self.batch_size]
        self.batches += 1
        return {key: value[idx] for key, value in self.data.items()}


def dataset_for(kind: str, cfg: SyntheticConfig, split: str) -> dict:
    """The arrays a stage of `kind` ('sft', 'pairs', 'prompts') trains or evaluates on."""
    if kind == "sft":
        return sft_dataset(cfg, split)
    if kind == "pairs":
        return preference_dataset(cfg, split)
    if kind == "prompts":
        return prompt_dataset(cfg, split)
    raise ValueError(f"unknown synthetic dataset kind {kind!r}")
