"""Record sources (JSONL and ArrayRecord files) and grain pipelines over them with per-host sharding.

Reading validates every row against its schema (`nash_lm.data.records`). A bad row (invalid UTF-8, invalid
JSON, not an object, a missing field, a wrong type, an empty string, a label outside [0, 1]) is reported as
`path:line: reason`, and then, as configured by `on_error`:

    "skip"   the row is left out and counted in the returned `ReadReport` (`report.skipped`, `report.bad`
             with every location and reason; the caller prints them, e.g. the trainer once per row and file,
             `nash_lm.train.data.read_stage`);
    "raise"  `DataError("path:line: reason")` is raised at the first bad row.

Nothing is dropped without being counted. Blank lines of a JSONL file are not rows (they are counted in
`report.blank_lines`). For ArrayRecord files the "line" is the 1-based record number.

`RecordSource` is a grain random-access source over validated records; `dataset(...)` builds the pipeline

    MapDataset.source -> shard [shard_index::shard_count] -> shuffle (seed) -> repeat -> map -> batch

and returns a `grain.IterDataset` whose iterators checkpoint with `get_state()` / `set_state()`. The shard
defaults to this process (`jax.process_index()` of `jax.process_count()`); the shards of all processes
partition the records exactly (`equal_shards=True` first drops the < shard_count trailing records that would
make the shards unequal, and reports how many). `global_batch` turns one host's batch into global
`jax.Array`s with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Sequence

import grain
import numpy as np
from absl import logging

from nash_lm import distributed
from nash_lm.data import records as records_lib

ON_ERROR = ("skip", "raise")


class DataError(ValueError):
    """A malformed input row, reported as `path:line: reason`."""


@dataclasses.dataclass
class BadRow:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclasses.dataclass
class ReadReport:
    """What a read did: rows kept, rows skipped (with every location), blank lines."""

    kept: int = 0
    blank_lines: int = 0
    bad: list = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def summary(self) -> str:
        return f"{self.kept} rows kept, {self.skipped} malformed rows skipped, {self.blank_lines} blank lines"


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: must be one of {list(ON_ERROR)}, got {on_error!r}")


def _as_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such file")
    return paths


def _decode_row(raw: bytes, kind: str, check: Callable | None = None) -> dict:
    """bytes of one row -> validated record (then `check(record)`); raises RecordError with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise records_lib.RecordError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise records_lib.RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    record = records_lib.parse(obj, kind)
    if check is not None:
        check(record)
    return record


def _handle(bad: BadRow, report: ReadReport, on_error: str) -> None:
    if on_error == "raise":
        raise DataError(str(bad))
    report.bad.append(bad)


def read_jsonl(paths, kind: str, on_error: str = "skip", check: Callable | None = None
               ) -> tuple[list[dict], ReadReport]:
    """All valid records of `kind` in the JSONL file(s), in file and line order, and the report. `check(record)`
    may raise `RecordError` for a record that is well-formed but unusable (e.g. a prompt too long for the model);
    it is reported and handled like a malformed row."""
    records_lib.check_kind(kind)
    _check_on_error(on_error)
    out, report = [], ReadReport()
    for path in _as_paths(paths):
        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the newline that ends the last row
        for number, raw in enumerate(lines, start=1):
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if not raw.strip():
                report.blank_lines += 1
                continue
            try:
                out.append(_decode_row(raw, kind, check))
            except records_lib.RecordError as e:
                _handle(BadRow(path, number, str(e)), report, on_error)
    report.kept = len(out)
    return out, report


def write_jsonl(path, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line (UTF-8, non-ASCII kept as is), atomically, from process 0
    (`nash_lm.distributed.write_jsonl`, no barrier)."""
    distributed.write_jsonl(os.fspath(path), rows, sync=False)


def write_array_record(path, rows: Iterable, *, encoded: bool = False) -> None:
    """Writes rows (dicts, JSON-encoded; or raw bytes with `encoded=True`) as an ArrayRecord file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = os.fspath(path) + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for row in rows:
        writer.write(row if encoded else json.dumps(row, ensure_ascii=False).encode("utf-8"))
    writer.close()
    os.replace(tmp, path)


def read_array_record(paths, kind: str, on_error: str = "skip", check: Callable | None = None
                      ) -> tuple[list[dict], ReadReport]:
    """All valid records of `kind` in the ArrayRecord file(s) (JSON bytes per record) and the report (`check`: as
    for `read_jsonl`)."""
    records_lib.check_kind(kind)
    _check_on_error(on_error)
    out, report = [], ReadReport()
    for path in _as_paths(paths):
        source = grain.sources.ArrayRecordDataSource([path])
        for i in range(len(source)):
            try:
                out.append(_decode_row(source[i], kind, check))
            except records_lib.RecordError as e:
                _handle(BadRow(path, i + 1, str(e)), report, on_error)
    report.kept = len(out)
    return out, report


def read_records(paths, kind: str, on_error: str = "skip", check: Callable | None = None
                 ) -> tuple[list[dict], ReadReport]:
    """JSONL (`.jsonl`, `.json`) or ArrayRecord (`.array_record`, `.arrayrecord`) by file extension."""
    paths = _as_paths(paths)
    exts = {os.path.splitext(p)[1].lower() for p in paths}
    if exts <= {".jsonl", ".json"}:
        return read_jsonl(paths, kind, on_error, check)
    if exts <= {".array_record", ".arrayrecord"}:
        return read_array_record(paths, kind, on_error, check)
    raise ValueError(f"input files: cannot tell the format of extension(s) {sorted(exts)} "
                     f"(use .jsonl or .array_record, one format per call)")


class RecordSource:
    """A grain random-access data source over a list of validated records (`len` and `[i]`)."""

    def __init__(self, rows: Sequence[dict], report: ReadReport | None = None):
        self._rows = list(rows)
        self.report = report or ReadReport(kept=len(self._rows))

    @classmethod
    def from_files(cls, paths, kind: str, on_error: str = "skip") -> "RecordSource":
        rows, report = read_records(paths, kind, on_error)
        return cls(rows, report)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        return self._rows[index]

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records)"


def shard_options(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """(index, count), defaulting to this process among all processes; validated."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"shard_count: must be an int >= 1, got {shard_count!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index: must be an int in [0, {shard_count}), got {shard_index!r}")
    return shard_index, shard_count


def dataset(source, *, batch_size: int | None = None, transform: Callable | None = None,
            shuffle_seed: int | None = None, num_epochs: int | None = 1, shard_index: int | None = None,
            shard_count: int | None = None, equal_shards: bool = False,
            drop_remainder: bool = False) -> grain.IterDataset:
    """The grain pipeline over `source` for one shard (see the module docstring).

    `transform(record) -> features` runs after shuffling (e.g. `features.Featurizer(...)`); with `batch_size`
    the features (dicts of NumPy arrays) are stacked. `num_epochs=None` repeats forever; each epoch is shuffled
    with its own permutation derived from `shuffle_seed` (None: file order).
    """
    index, count = shard_options(shard_index, shard_count)
    n = len(source)
    ds = grain.MapDataset.source(source)
    if equal_shards and n % count:
        logging.info("equal_shards: dropping the last %d of %d records so that %d shards are equal",
                     n % count, n, count)
        ds = ds[: n - n % count]
    ds = ds[index::count]
    if len(ds) == 0:
        raise ValueError(f"shard {index} of {count}: no records ({n} records in all)")
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=int(shuffle_seed))
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.to_iter_dataset()


def global_batch(local: dict, mesh, spec=None) -> dict:
    """One host's batch (dict of [b_local, ...] arrays) -> global jax.Arrays sharded along the batch axis.

    `spec` is a PartitionSpec for the leading axis (default: `nash_lm.parallel.batch_sharding(mesh, ndim)`).
    """
    import jax
    from jax.sharding import NamedSharding

    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        if spec is None:
            from nash_lm import parallel

            sharding = parallel.batch_sharding(mesh, value.ndim)
        else:
            sharding = NamedSharding(mesh, spec)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
