"""A stage's data: arrays a job hands over (or the synthetic data), or records files the stage names.

Every stage reads two splits, 'train' and 'eval', of one kind (its algorithm's `data`: 'sft' demonstrations,
labelled 'pairs', or 'prompts'). They arrive as a `Source` per split, from one of two places:

- **arrays** `{key: [n, ...]}` (`ArraySource`): the synthetic data of `config.data` (kind 'synthetic'), or what a
  job hands to `Pipeline(data=...)` (the task jobs). Training batches are drawn by `synthetic.BatchIterator` (a
  seeded permutation per epoch; its state, the number of batches drawn, goes into the checkpoint).
- **records** (`RecordSource`, `config.data.kind = 'records'`): the stage names its files in `train_data` and
  `eval_data` (comma-separated JSONL or ArrayRecord paths of the records of `nash_lm.data.records`: 'sft' for an
  SFT stage, 'preference' for a judge, 'prompt' for a policy stage). `read_stage` reads and validates them when
  the config is resolved, before anything is compiled or written: every bad row is printed once as `path:line:
  reason` (also when two splits or stages read the same file; then a count per file) and, by `config.data.on_error`, skipped and counted ('skip') or fatal ('raise'); a prompt longer than
  `prompt_len` is such a row under `truncation = 'error'`. The text is tokenized by the run's tokenizer
  (`run_tokenizer`: `config.data.tokenizer`, or the tokenizer.json of the pipeline's `hf:` checkpoint) through
  its chat template when it has one and `config.data.chat_template` is on (`nash_lm.data.features`). The
  training split is a grain pipeline (`nash_lm.data.sources.dataset`: this process's shard of the records,
  shuffled per epoch with the stage seed, repeated, tokenized lazily, batched); its iterator state goes into the
  checkpoint, so a resumed stage continues at the same record. The evaluation split is tokenized whole.

`Source`: `len(source)`, `example()` (arrays of one row, for the compiled step's shapes), `arrays()` (every row),
`batches(batch_size, seed, shardings)` -> an iterator of global `jax.Array` batches with `get_state()` /
`set_state()`.

The records data config (`config.data`):

    kind           'records'
    prompt_len     prompt tokens (left-padded; chat prompts include the template's framing)
    response_len   response tokens (right-padded; EOS after the text when it fits)
    tokenizer      '' (the pipeline's hf: checkpoint's tokenizer.json), or a SentencePiece .model / tokenizer.json
    chat_template  True: prompts go through the tokenizer's chat template when it has one; False: plain text
    truncation     'keep_end' (default) | 'keep_start' | 'error' (see nash_lm.data.features)
    on_error       'skip' (default: bad rows reported, counted and left out) | 'raise' (the first bad row is fatal)
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from nash_lm import distributed
from nash_lm.data import features, sources
from nash_lm.data.features import TextFormat
from nash_lm.interop.hf import files_sha256
from nash_lm.data import tokenizer as tokenizer_lib
from nash_lm.data.synthetic import BatchIterator

RECORD_KIND = {"sft": "sft", "pairs": "preference", "prompts": "prompt"}  # a stage's data -> its record kind
SPLIT_FIELD = {"train": "train_data", "eval": "eval_data"}


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class RecordsConfig:
    prompt_len: int
    response_len: int
    tokenizer: str = ""
    chat_template: bool = True
    truncation: str = "keep_end"
    on_error: str = "skip"
    kind: str = "records"

    def validate(self) -> "RecordsConfig":
        for name in ("prompt_len", "response_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "prompt_len" else 1):
                _fail(f"config.data.{name}", f"must be an int >= {2 if name == 'prompt_len' else 1}, got {v!r}")
        if not isinstance(self.chat_template, bool):
            _fail("config.data.chat_template", f"expected True or False, got {self.chat_template!r}")
        if self.truncation not in features.TRUNCATIONS:
            _fail("config.data.truncation", f"{self.truncation!r} not in {list(features.TRUNCATIONS)}")
        if self.on_error not in sources.ON_ERROR:
            _fail("config.data.on_error", f"{self.on_error!r} not in {list(sources.ON_ERROR)}")
        if not isinstance(self.tokenizer, str):
            _fail("config.data.tokenizer", f"expected a path or '', got {self.tokenizer!r}")
        return self


def records_config(given: dict) -> RecordsConfig:
    fields = {f.name for f in dataclasses.fields(RecordsConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        _fail("config.data", f"unknown field(s) {unknown} for kind 'records'; known: {sorted(fields)}")
    missing = sorted({"prompt_len", "response_len"} - set(given))
    if missing:
        _fail("config.data", f"missing field(s) {missing} for kind 'records'")
    return RecordsConfig(**given).validate()


def paths(text: str) -> list[str]:
    """'a.jsonl, b.jsonl' -> absolute paths ('' -> [])."""
    return [os.path.abspath(os.path.expanduser(p.strip())) for p in str(text).split(",") if p.strip()]


def tokenizer_path(tokenizer: str, hf_dirs: list[str]) -> str:
    """The file a records run tokenizes with: `config.data.tokenizer`, or with '' the first `hf:` checkpoint's
    tokenizer.json ('' when neither applies)."""
    if tokenizer:
        return os.path.abspath(os.path.expanduser(tokenizer))
    return os.path.join(hf_dirs[0], "tokenizer.json") if hf_dirs else ""


def run_tokenizer(data: RecordsConfig, hf_dirs: list[str]):
    """The tokenizer of a records run (`tokenizer_path`), loaded."""
    path = tokenizer_path(data.tokenizer, hf_dirs)
    where = "config.data.tokenizer" if data.tokenizer else "config.data.tokenizer ('': the hf: checkpoint's)"
    if not path:
        _fail("config.data.tokenizer", "'' takes the tokenizer of the pipeline's hf: checkpoint, but no stage starts "
                                       "from one: name a SentencePiece .model or a tokenizer.json")
    try:
        return tokenizer_lib.load(path)
    except (ValueError, OSError) as e:
        _fail(where, str(e).strip().splitlines()[0])


class ArraySource:
    """A split held as arrays {key: [n, ...]}."""

    def __init__(self, arrays: dict):
        self._arrays = arrays
        self.report = None

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def example(self) -> dict:
        return {k: np.asarray(v[:1]) for k, v in self._arrays.items()}

    def arrays(self) -> dict:
        return self._arrays

    def batches(self, batch_size: int, seed: int, shardings: dict, split: str = "train") -> "ArrayBatches":
        return ArrayBatches(BatchIterator(self._arrays, batch_size, seed, split), shardings)


class ArrayBatches:
    def __init__(self, iterator: BatchIterator, shardings: dict):
        self.iterator, self.shardings = iterator, shardings

    def __next__(self) -> dict:
        return distributed.global_batch_from_full(next(self.iterator), self.shardings)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


class RecordSource:
    """A split read from records files: validated rows (each with its `_index`), tokenized on demand."""

    def __init__(self, rows: list, report: sources.ReadReport, kind: str, fmt: TextFormat, seed: int):
        self.rows = [{**r, "_index": i} for i, r in enumerate(rows)]
        self.report, self.kind, self.fmt, self.seed = report, kind, fmt, seed

    def __len__(self) -> int:
        return len(self.rows)

    def example(self) -> dict:
        row = self.fmt.featurizer(self.kind, self.seed)(self.rows[0])
        return {k: np.asarray(v)[None] for k, v in row.items()}

    def arrays(self) -> dict:
        return self.fmt.arrays(self.rows, self.kind, self.seed)  # row i's hard label seeded by i == its _index

    def batches(self, batch_size: int, seed: int, shardings: dict, split: str = "train") -> "RecordBatches":
        return RecordBatches(self, batch_size, seed, shardings)


class RecordBatches:
    """Global batches from a grain pipeline over this process's shard of the records (see the module docstring).

    Every process reads the rows of the global batch that its devices hold (`distributed.shard_info`): shard
    `index` of `count` of the records, `batch_size / count` rows per step. When the batch layout gives a process
    no contiguous block of rows, every process reads whole batches and keeps its rows."""

    def __init__(self, source: RecordSource, batch_size: int, seed: int, shardings: dict):
        self.shardings, self.batch_size = shardings, batch_size
        vector = next(iter(shardings.values()))
        try:
            index, count = distributed.shard_info(vector, batch_size)
        except ValueError:
            index, count = 0, 1
        self.local = count > 1
        ds = sources.dataset(sources.RecordSource(source.rows, source.report),
                             batch_size=batch_size // count, transform=source.fmt.featurizer(source.kind, source.seed),
                             shuffle_seed=seed, num_epochs=None, shard_index=index, shard_count=count,
                             equal_shards=True, drop_remainder=True)
        self._iter = iter(ds)

    def __next__(self) -> dict:
        local = next(self._iter)
        if not self.local:
            return distributed.global_batch_from_full(local, self.shardings)
        return {k: jax.make_array_from_process_local_data(self.shardings[k], np.asarray(v),
                                                          (self.batch_size,) + np.shape(v)[1:])
                for k, v in local.items()}

    def get_state(self) -> dict:
        return {"grain": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state["grain"])


def read_stage(name: str, st, algorithm_data: str, data: RecordsConfig, fmt: TextFormat, seed: int,
               where, reported: set | None = None) -> dict:
    """{split: RecordSource} of a stage's `train_data` / `eval_data` (read and checked now; one-line errors).

    Each skipped row is printed once as `[data] path:line: reason (skipped)`; `reported` holds the rows already
    printed (by the other split naming the same file, or another stage), so a file read twice reports a bad row
    once. `report_bad_rows` prints the count per file after every stage is read."""
    kind = RECORD_KIND[algorithm_data]
    reported = set() if reported is None else reported
    out = {}
    for split, field in SPLIT_FIELD.items():
        files = paths(st[field])
        check = fmt.check if data.truncation == "error" else None
        try:
            rows, report = sources.read_records(files, kind, data.on_error, check)
        except sources.DataError as e:
            raise sources.DataError(f"{where(field)}: {e}") from None
        except (ValueError, OSError) as e:
            _fail(where(field), str(e).strip().splitlines()[0])
        for bad in report.bad:
            if (bad.path, bad.line) not in reported:
                reported.add((bad.path, bad.line))
                print(f"[data] {bad} (skipped)", flush=True)
        if not rows:
            _fail(where(field), f"no valid {kind!r} records in {', '.join(files)} ({report.summary()})")
        if st.batch_size > len(rows):
            _fail(where("batch_size"), f"{st.batch_size} exceeds the {len(rows)} valid {split} records of "
                                       f"{', '.join(files)}")
        out[split] = RecordSource(rows, report, kind, fmt, seed)
    return out


def report_bad_rows(reported: set) -> None:
    """One line per file with skipped rows: how many (each was printed once by `read_stage`)."""
    counts: dict = {}
    for path, _ in reported:
        counts[path] = counts.get(path, 0) + 1
    for path in sorted(counts):
        n = counts[path]
        print(f"[data] {path}: {n} malformed row{'s' if n != 1 else ''} skipped", flush=True)


def as_source(data) -> ArraySource | RecordSource:
    return data if isinstance(data, (ArraySource, RecordSource)) else ArraySource(data)


def report_json(source) -> dict | None:
    """What reading a split did (rows kept and skipped, with the first locations), for a stage's done.json."""
    report = getattr(source, "report", None)
    if report is None:
        return None
    return {"kept": report.kept, "skipped": report.skipped, "blank_lines": report.blank_lines,
            "bad": [str(b) for b in report.bad[:20]]}


__all__ = ["ArraySource", "RecordSource", "RecordsConfig", "TextFormat", "as_source", "files_sha256", "paths",
           "read_stage", "records_config", "report_bad_rows", "report_json", "run_tokenizer"]
