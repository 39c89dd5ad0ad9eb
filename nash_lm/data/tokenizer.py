"""The tokenizer interface: SentencePiece (trained in-process and cached) or a Hugging Face tokenizer.json.

Every tokenizer exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text, special=False) -> list[int]`
(`special=True`: with the tokens the tokenizer puts around a text of its own accord, BOS for SentencePiece, its
post-processor's for a Hugging Face tokenizer), `decode(ids) -> str` (special tokens dropped) and `chat_template`
(the Jinja chat template of a Hugging Face checkpoint, or None). The ids follow the convention of the rest of
nash-lm where we choose them (`train_sentencepiece`: 0 = PAD, 1 = BOS, 2 = EOS, 3 = UNK).

- `train_sentencepiece(texts, vocab_size, cache_dir)` trains a SentencePiece model in this process (no
  download), writes it to `cache_dir/spm-<hash>.model` keyed by a hash of the texts and options, and reloads
  the cached file on later calls with the same inputs (training is deterministic: one thread, no sampling).
- `HFTokenizer(path)` reads a `tokenizer.json` (the `tokenizers` package). Its special tokens and chat template
  come from the `tokenizer_config.json` beside it (`bos_token`, `eos_token`, `pad_token`, `chat_template`, or a
  `chat_template.jinja` file) when there is one, else from the usual token names. For a chat model the EOS is
  the end-of-turn token its config names (SmolLM2: `<|im_end|>`), which is where the sampler stops.
- `render_chat(tokenizer, prompt)` renders a one-turn conversation (the prompt as the user's message) with the
  generation prompt, as transformers' `apply_chat_template(..., add_generation_prompt=True)` does (a sandboxed
  Jinja environment with the same options); the rendered text contains the special tokens as text, which
  `encode` maps to their ids.
- `load(spec)` picks by file name: `*.model` -> SentencePiece, `*.json` -> Hugging Face.
- `check_fits(tokenizer, model_vocab_size)` raises a one-line ValueError when the tokenizer can produce ids
  that the model's embedding does not have. Call it before anything is compiled.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Protocol, Sequence

from nash_lm import distributed

SPM_SPECIAL = dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3)


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    chat_template: str | None

    def encode(self, text: str, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model file (or its serialized bytes)."""

    def __init__(self, model_file: str | None = None, *, model_proto: bytes | None = None):
        import sentencepiece as spm

        if (model_file is None) == (model_proto is None):
            raise ValueError("SentencePieceTokenizer: give exactly one of model_file and model_proto")
        if model_file is not None:
            if not os.path.isfile(model_file):
                raise FileNotFoundError(f"{model_file}: no such SentencePiece model")
            self.path = os.fspath(model_file)
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        else:
            self.path = None
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        self.chat_template = None
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(f"SentencePiece model {self.path or '<bytes>'}: needs pad, bos and eos ids "
                             f"(got pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id})")

    def encode(self, text: str, special: bool = False) -> list[int]:
        return ([self.bos_id] if special else []) + list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path or '<bytes>'}, vocab_size={self.vocab_size})"


def _spm_options(vocab_size: int, model_type: str, character_coverage: float, max_sentence_length: int) -> dict:
    return dict(vocab_size=int(vocab_size), model_type=model_type, character_coverage=float(character_coverage),
                max_sentence_length=int(max_sentence_length), num_threads=1, shuffle_input_sentence=False,
                input_sentence_size=0, hard_vocab_limit=True, byte_fallback=False, **SPM_SPECIAL,
                pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, cache_dir: str | None = None, *,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        max_sentence_length: int = 8192) -> SentencePieceTokenizer:
    """Trains (or reloads from `cache_dir`) a SentencePiece model on `texts`; ids 0..3 = pad, bos, eos, unk."""
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty training text")
    options = _spm_options(vocab_size, model_type, character_coverage, max_sentence_length)
    digest = hashlib.sha256(repr(sorted(options.items())).encode())
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"spm-{digest.hexdigest()[:16]}.model")
        if os.path.isfile(path):
            return SentencePieceTokenizer(path)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, minloglevel=2,
                                       **options)
    except RuntimeError as e:
        raise ValueError(f"train_sentencepiece: {str(e).strip().splitlines()[-1]}") from None
    tok = SentencePieceTokenizer(model_proto=buffer.getvalue())
    if path is not None:  # process 0 writes the cache; every process keeps the model it trained in memory
        distributed.write_bytes(path, buffer.getvalue(), sync=False)
        tok.path = path
    return tok


_HF_NAMES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "[BOS]", "<bos>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "[EOS]", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
}


class HFTokenizer:
    """A Hugging Face `tokenizer.json`; special tokens found by the given names or the usual ones."""

    def __init__(self, path: str, *, pad_token: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        from tokenizers import Tokenizer as _Tok

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer.json")
        self.path = os.fspath(path)
        self._tok = _Tok.from_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = _tokenizer_config(os.path.dirname(self.path))
        self.chat_template = config.get("chat_template")
        given = {"pad": pad_token, "bos": bos_token, "eos": eos_token}
        for role, names in _HF_NAMES.items():
            named = _token_content(config.get(f"{role}_token"))
            candidates = (given[role],) if given[role] else ((named,) if named else ()) + names
            ids = [self._tok.token_to_id(n) for n in candidates]
            found = [i for i in ids if i is not None]
            if not found:
                raise ValueError(f"{self.path}: no {role} token (looked for {list(candidates)}); "
                                 f"pass {role}_token=")
            setattr(self, f"{role}_id", int(found[0]))

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size})"


def _token_content(token) -> str | None:
    """A special token of tokenizer_config.json: a string or {"content": string, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _tokenizer_config(directory: str) -> dict:
    """The tokenizer_config.json of a Hugging Face checkpoint directory ({} when absent), with its chat template
    resolved: the `chat_template` string, the 'default' one of a list of named templates, or chat_template.jinja."""
    import json

    path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = os.path.join(directory, "chat_template.jinja")
    if not isinstance(template, str) and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    config["chat_template"] = template if isinstance(template, str) and template.strip() else None
    return config


def render_chat(tokenizer: Tokenizer, prompt: str) -> str:
    """The tokenizer's chat template applied to one user turn holding `prompt`, ending with the generation prompt
    (the text the assistant's answer follows)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    if not tokenizer.chat_template:
        raise ValueError(f"{tokenizer!r}: has no chat template")

    def raise_exception(message):
        raise ValueError(f"chat template of {tokenizer!r}: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    special = {f"{role}_token": tokenizer.token(getattr(tokenizer, f"{role}_id")) for role in ("bos", "eos", "pad")}
    try:
        template = env.from_string(tokenizer.chat_template)
        return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                               **special)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template of {tokenizer!r}: {str(e).splitlines()[0]}") from None


def load(spec: str, **kwargs) -> Tokenizer:
    """A tokenizer from a file: `*.model` (SentencePiece) or `*.json` (Hugging Face tokenizer.json)."""
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith(".json"):
        return HFTokenizer(spec, **kwargs)
    raise ValueError(f"tokenizer {spec!r}: expected a SentencePiece .model or a Hugging Face tokenizer.json")


def check_fits(tokenizer: Tokenizer, model_vocab_size: int, where: str = "config.model.vocab_size") -> None:
    """One-line ValueError unless every id the tokenizer can produce is < model_vocab_size."""
    largest = max(tokenizer.vocab_size - 1, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    if largest >= model_vocab_size:
        raise ValueError(f"{where}: the tokenizer {tokenizer!r} produces ids up to {largest}, which do not fit a "
                         f"model vocabulary of {model_vocab_size}")
