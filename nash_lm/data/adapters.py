"""Optional adapters: records from a seqio Task or a tfds dataset (installed with the `[seqio]` extra).

TensorFlow, seqio and tensorflow-datasets are imported inside the functions, never at module import, so the
rest of nash-lm works without them. Both adapters read one shard of a split (shard index/count default to this
process, as in `nash_lm.data.sources`), decode each example's string features, and validate them against a
record schema with the same bad-row policy as the file readers (the location is `<task>/<split>:<example n>`).

    rows, report = from_seqio("my_task", "train", kind="sft",
                              fields={"prompt": "inputs", "response": "targets"})
    source = RecordSource(rows, report)

`fields` maps each schema field to the name of the example feature that holds it (default: the same name).
Feature values may be bytes (decoded as UTF-8; invalid bytes are a bad row) or strings; token-id features are
not supported (the adapters feed the text pipeline, which tokenizes with nash-lm's tokenizer).
"""
from __future__ import annotations

import numpy as np

from nash_lm.data import records as records_lib
from nash_lm.data import sources

_INSTALL = "the seqio/tfds adapters need TensorFlow: pip install 'nash-lm[seqio]'"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from None


def _to_python(value):
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise records_lib.RecordError(f"invalid UTF-8 at byte {e.start}") from None
    return value


def records_from_examples(examples, kind: str, where: str, fields: dict | None = None, on_error: str = "skip"):
    """Validated records from an iterable of {feature: value} examples (NumPy or Python values)."""
    records_lib.check_kind(kind)
    sources._check_on_error(on_error)
    fields = dict(fields or {})
    names = records_lib.fields(kind)
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"fields: {unknown} are not fields of a {kind!r} record {list(names)}")
    out, report = [], sources.ReadReport()
    for n, example in enumerate(examples, start=1):
        try:
            obj = {}
            for name in names:
                feature = fields.get(name, name)
                if feature in example:
                    obj[name] = _to_python(example[feature])
            out.append(records_lib.parse(obj, kind))
        except records_lib.RecordError as e:
            sources._handle(sources.BadRow(where, n, str(e)), report, on_error)
    report.kept = len(out)
    return out, report


def from_seqio(task, split: str, kind: str, *, fields: dict | None = None, on_error: str = "skip",
               shard_index: int | None = None, shard_count: int | None = None, shuffle: bool = False,
               seed: int | None = None):
    """Records of one shard of a seqio Task (a Task object or a registered name), without preprocessing
    into token ids (`sequence_length=None`)."""
    seqio = _require("seqio")
    index, count = sources.shard_options(shard_index, shard_count)
    if isinstance(task, str):
        task = seqio.get_mixture_or_task(task)
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                          shard_info=seqio.ShardInfo(index=index, num_shards=count), num_epochs=1)
    return records_from_examples(ds.as_numpy_iterator(), kind, f"{task.name}/{split}", fields, on_error)


def from_tfds(name: str, split: str, kind: str, *, fields: dict | None = None, on_error: str = "skip",
              shard_index: int | None = None, shard_count: int | None = None, data_dir: str | None = None):
    """Records of one shard of a tfds dataset that is already prepared in `data_dir` (never downloads)."""
    tfds = _require("tensorflow_datasets")
    index, count = sources.shard_options(shard_index, shard_count)
    read_config = tfds.ReadConfig(input_context=None, shuffle_seed=None)
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, read_config=read_config)
    ds = ds.shard(count, index)
    return records_from_examples(tfds.as_numpy(ds), kind, f"{name}/{split}", fields, on_error)
