"""Records -> fixed-length token arrays in the layout the training step reads.

The layout is the one of `nash_lm.data.synthetic` (same keys, dtypes and padding), so a text task plugs into
the same compiled steps:

    prompt      int32 [prompt_len]     BOS + prompt tokens, *left*-padded with PAD; prompt_mask float32
    response    int32 [response_len]   tokens then EOS, right-padded; response_mask covers up to the EOS
    y, y2       as response (preference pairs: y = chosen, y2 = rejected), with y_mask, y2_mask
    label       float32                P(y > y2) (1.0 for a hard "chosen won" record)
    hard_label  float32                a Bernoulli(label) draw, seeded by (seed, record index)

A prompt's tokens (`prompt_ids`) are the tokenizer's own framing of the text (`encode(text, special=True)`: BOS
for SentencePiece, the post-processor's tokens for a Hugging Face tokenizer), or, with `chat=True` and a tokenizer
that has a chat template, the template's rendering of a one-turn conversation with the generation prompt
(`tokenizer.render_chat`). A prompt longer than `prompt_len` tokens is truncated as `truncation` says:

    keep_start  its first tokens (the default of the embedded tasks)
    keep_end    its last tokens, after its first token when that is BOS (chat prompts end with the generation
                prompt, which must survive)
    error       `RecordError` ("prompt has N tokens, more than prompt_len=P"), which the readers report as
                `path:line: reason`

Responses longer than `response_len - 1` tokens are cut at `response_len` without EOS (the mask then covers the
whole row), as in the synthetic data. `TextFormat` bundles the tokenizer, the lengths and these choices.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nash_lm.data import records as records_lib


TRUNCATIONS = ("keep_start", "keep_end", "error")


def prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """The prompt's token ids before padding and truncation (see the module docstring)."""
    if chat and tokenizer.chat_template:
        from nash_lm.data.tokenizer import render_chat

        return tokenizer.encode(render_chat(tokenizer, text))
    return tokenizer.encode(text, special=True)


def encode_prompt(tokenizer, text: str, prompt_len: int, *, chat: bool = False,
                  truncation: str = "keep_start") -> tuple[np.ndarray, np.ndarray]:
    if prompt_len < 2:
        raise ValueError(f"prompt_len: must be >= 2, got {prompt_len}")
    ids = prompt_ids(tokenizer, text, chat)
    if len(ids) > prompt_len:
        if truncation == "error":
            raise records_lib.RecordError(f"prompt has {len(ids)} tokens, more than prompt_len={prompt_len}")
        if truncation == "keep_end":
            ids = (ids[:1] + ids[len(ids) - prompt_len + 1:]) if ids[0] == tokenizer.bos_id else ids[-prompt_len:]
        else:
            ids = ids[:prompt_len]
    tokens = np.full(prompt_len, tokenizer.pad_id, np.int32)
    mask = np.zeros(prompt_len, np.float32)
    tokens[prompt_len - len(ids):] = ids
    mask[prompt_len - len(ids):] = 1.0
    return tokens, mask


def encode_response(tokenizer, text: str, response_len: int) -> tuple[np.ndarray, np.ndarray]:
    if response_len < 1:
        raise ValueError(f"response_len: must be >= 1, got {response_len}")
    ids = tokenizer.encode(text)[:response_len]
    if len(ids) < response_len:
        ids = ids + [tokenizer.eos_id]
    tokens = np.full(response_len, tokenizer.pad_id, np.int32)
    mask = np.zeros(response_len, np.float32)
    tokens[: len(ids)] = ids
    mask[: len(ids)] = 1.0
    return tokens, mask


def decode_response(tokenizer, tokens, mask=None) -> str:
    """Text of a response row: tokens up to the first EOS (or where the mask ends)."""
    tokens = [int(t) for t in np.asarray(tokens)]
    if mask is not None:
        tokens = tokens[: int(np.sum(np.asarray(mask) > 0))]
    if tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens)


def featurize(record: dict, kind: str, tokenizer, prompt_len: int, response_len: int, *, index: int = 0,
              seed: int = 0, chat: bool = False, truncation: str = "keep_start") -> dict:
    """One record -> dict of NumPy arrays (see the module docstring)."""
    records_lib.check_kind(kind)
    out = {}
    out["prompt"], out["prompt_mask"] = encode_prompt(tokenizer, record["prompt"], prompt_len, chat=chat,
                                                      truncation=truncation)
    if kind == "sft":
        out["response"], out["response_mask"] = encode_response(tokenizer, record["response"], response_len)
    elif kind == "preference":
        out["y"], out["y_mask"] = encode_response(tokenizer, record["chosen"], response_len)
        out["y2"], out["y2_mask"] = encode_response(tokenizer, record["rejected"], response_len)
        label = float(record.get("label", 1.0))
        out["label"] = np.float32(label)
        u = np.random.default_rng([int(seed), int(index)]).uniform()
        out["hard_label"] = np.float32(u < label)
    return out


class Featurizer:
    """A picklable `record -> features` transform for grain pipelines (`sources.dataset(transform=...)`); the
    record's `_index` (its position in the source) seeds its hard label."""

    def __init__(self, kind: str, tokenizer, prompt_len: int, response_len: int, seed: int = 0, *,
                 chat: bool = False, truncation: str = "keep_start"):
        records_lib.check_kind(kind)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation: {truncation!r} not in {list(TRUNCATIONS)}")
        self.kind, self.tokenizer, self.prompt_len, self.response_len, self.seed = (
            kind, tokenizer, prompt_len, response_len, seed)
        self.chat, self.truncation = chat, truncation

    def __call__(self, record: dict) -> dict:
        return featurize(record, self.kind, self.tokenizer, self.prompt_len, self.response_len,
                         index=int(record.get("_index", 0)), seed=self.seed, chat=self.chat,
                         truncation=self.truncation)


def to_arrays(rows, kind: str, tokenizer, prompt_len: int, response_len: int, seed: int = 0, **options) -> dict:
    """All records stacked into arrays ({key: [n, ...]}), the form `nash_lm.data.synthetic.dataset_for` returns
    (`options`: `chat`, `truncation`)."""
    feats = [featurize(r, kind, tokenizer, prompt_len, response_len, index=i, seed=seed, **options)
             for i, r in enumerate(rows)]
    if not feats:
        raise ValueError(f"to_arrays: no {kind} records")
    return {k: np.stack([f[k] for f in feats]) for k in feats[0]}


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How text becomes token rows: a tokenizer, the lengths, the chat template switch and the prompt truncation."""

    tokenizer: object
    prompt_len: int
    response_len: int
    chat: bool = False
    truncation: str = "keep_start"

    def prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return encode_prompt(self.tokenizer, text, self.prompt_len, chat=self.chat, truncation=self.truncation)

    def featurizer(self, kind: str, seed: int = 0) -> Featurizer:
        return Featurizer(kind, self.tokenizer, self.prompt_len, self.response_len, seed, chat=self.chat,
                          truncation=self.truncation)

    def arrays(self, rows, kind: str, seed: int = 0) -> dict:
        return to_arrays(rows, kind, self.tokenizer, self.prompt_len, self.response_len, seed, chat=self.chat,
                         truncation=self.truncation)

    def check(self, record: dict) -> None:
        """Raises RecordError for a prompt that `truncation = 'error'` refuses."""
        self.prompt(record["prompt"])
