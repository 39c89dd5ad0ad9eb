"""The seqio adapter on a small in-memory seqio Task, and the tfds adapter on a tiny tensorflow-datasets dataset
built here from rows in memory (`download_and_prepare` into a temporary data_dir; nothing is downloaded).
TensorFlow, seqio and tensorflow-datasets come with the `[seqio]` extra."""
import os

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


TFDS_ROWS = [("first prompt", "one"), ("second prompt", "two"), ("third prompt", ""), ("fourth prompt", "four"),
             ("fifth prompt", "five")]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A prepared tfds dataset `nash_lm_tiny_records` of TFDS_ROWS (features question, answer) in a temporary
    data_dir."""
    import tensorflow_datasets as tfds

    class NashLmTinyRecords(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (q, a) in enumerate(TFDS_ROWS):
                yield i, {"question": q, "answer": a}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    NashLmTinyRecords(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_dataset_records_with_a_bad_row_and_shards(tfds_dir):
    import tensorflow_datasets as tfds

    fields = {"prompt": "question", "response": "answer"}
    rows, report = adapters.from_tfds("nash_lm_tiny_records", "train", "sft", fields=fields, data_dir=tfds_dir,
                                      shard_index=0, shard_count=1)
    good = [{"prompt": q, "response": a} for q, a in TFDS_ROWS if a]
    assert sorted(rows, key=str) == sorted(good, key=str)
    # the bad row is located by its position in the order tfds reads the split (tfds's own reader says which)
    order = [ex["question"].decode() for ex in tfds.as_numpy(tfds.load("nash_lm_tiny_records", split="train",
                                                                       data_dir=tfds_dir, download=False))]
    assert [(b.path, b.line) for b in report.bad] == [("nash_lm_tiny_records/train",
                                                       order.index("third prompt") + 1)]
    assert "empty string" in report.bad[0].reason and report.kept == 4
    with pytest.raises(sources.DataError, match="nash_lm_tiny_records/train:[0-9]+: field 'response'"):
        adapters.from_tfds("nash_lm_tiny_records", "train", "sft", fields=fields, data_dir=tfds_dir,
                           on_error="raise", shard_index=0, shard_count=1)
    # two shards partition the split
    shards = [adapters.from_tfds("nash_lm_tiny_records", "train", "prompt", fields={"prompt": "question"},
                                 data_dir=tfds_dir, shard_index=i, shard_count=2)[0] for i in range(2)]
    assert all(shards) and sorted(r["prompt"] for s in shards for r in s) == sorted(q for q, _ in TFDS_ROWS)


def test_tfds_reads_only_a_prepared_dataset(tfds_dir, tmp_path):
    """The builder is known but not prepared in this data_dir: an error, and nothing is built or downloaded."""
    with pytest.raises(Exception, match="nash_lm_tiny_records"):
        adapters.from_tfds("nash_lm_tiny_records", "train", "prompt", fields={"prompt": "question"},
                           data_dir=str(tmp_path), shard_index=0, shard_count=1)
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]
