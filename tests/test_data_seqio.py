"""The seqio adapter on a small in-memory seqio Task (TensorFlow and seqio come with the `[seqio]` extra)."""
import numpy as np
import pytest

from nash_lm.data import adapters, sources


def _task(name):
    import seqio
    import tensorflow as tf

    rows = {
        "inputs": [b"first prompt", b"second prompt", b"\xff\xfe bad bytes", b"fourth prompt", b"fifth prompt",
                   b"sixth prompt"],
        "targets": [b"one", b"two", b"three", b"", b"five", b"six"],
    }

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({k: np.array(v, dtype=object) for k, v in rows.items()})

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                                  preprocessors=[], output_features={})


def test_seqio_task_records_with_bad_rows_and_shards():
    task = _task("nash_lm_test_in_memory")
    rows, report = adapters.from_seqio(task, "train", "sft", fields={"prompt": "inputs", "response": "targets"},
                                       shard_index=0, shard_count=1)
    assert [r["prompt"] for r in rows] == ["first prompt", "second prompt", "fifth prompt", "sixth prompt"]
    assert [r["response"] for r in rows] == ["one", "two", "five", "six"]
    assert [(b.path, b.line) for b in report.bad] == [("nash_lm_test_in_memory/train", 3),
                                                      ("nash_lm_test_in_memory/train", 4)]
    assert "invalid UTF-8" in report.bad[0].reason and "empty string" in report.bad[1].reason
    with pytest.raises(sources.DataError, match="nash_lm_test_in_memory/train:3: invalid UTF-8"):
        adapters.from_seqio("nash_lm_test_in_memory", "train", "sft",
                            fields={"prompt": "inputs", "response": "targets"}, on_error="raise",
                            shard_index=0, shard_count=1)
    prompts = []
    for index in range(2):
        got, _ = adapters.from_seqio(task, "train", "prompt", fields={"prompt": "inputs"}, shard_index=index,
                                     shard_count=2)
        prompts += [r["prompt"] for r in got]
    assert sorted(prompts) == sorted(["first prompt", "second prompt", "fourth prompt", "fifth prompt",
                                      "sixth prompt"])
    source = sources.RecordSource(rows, report)
    assert len(source) == 4 and source.report.skipped == 2


def test_missing_seqio_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "seqio", None)
    with pytest.raises(ImportError, match=r"nash-lm\[seqio\]"):
        adapters.from_seqio("anything", "train", "prompt")
