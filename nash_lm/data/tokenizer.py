"""The tokenizer interface: SentencePiece (trained in-process and cached) or a Hugging Face tokenizer.json.

Every tokenizer exposes `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text) -> list[int]` (no special
tokens added) and `decode(ids) -> str` (special tokens dropped). The ids follow the convention of the rest of
nash-lm where we choose them (`train_sentencepiece`: 0 = PAD, 1 = BOS, 2 = EOS, 3 = UNK).

- `train_sentencepiece(texts, vocab_size, cache_dir)` trains a SentencePiece model in this process (no
  download), writes it to `cache_dir/spm-<hash>.model` keyed by a hash of the texts and options, and reloads
  the cached file on later calls with the same inputs (training is deterministic: one thread, no sampling).
- `HFTokenizer(path)` reads a `tokenizer.json` (the `tokenizers` package) and finds its special tokens by name.
- `load(spec)` picks by file name: `*.model` -> SentencePiece, `*.json` -> Hugging Face.
- `check_fits(tokenizer, model_vocab_size)` raises a one-line ValueError when the tokenizer can produce ids
  that the model's embedding does not have. Call it before anything is compiled.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Protocol, Sequence

SPM_SPECIAL = dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3)


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

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
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(f"SentencePiece model {self.path or '<bytes>'}: needs pad, bos and eos ids "
                             f"(got pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id})")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

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
    proto = buffer.getvalue()
    if path is None:
        return SentencePieceTokenizer(model_proto=proto)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, path)
    return SentencePieceTokenizer(path)


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
        given = {"pad": pad_token, "bos": bos_token, "eos": eos_token}
        for role, names in _HF_NAMES.items():
            candidates = (given[role],) if given[role] else names
            ids = [self._tok.token_to_id(n) for n in candidates]
            found = [i for i in ids if i is not None]
            if not found:
                raise ValueError(f"{self.path}: no {role} token (looked for {list(candidates)}); "
                                 f"pass {role}_token=")
            setattr(self, f"{role}_id", int(found[0]))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size})"


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
