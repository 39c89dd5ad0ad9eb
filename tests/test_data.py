"""Data layer: schemas, JSONL/ArrayRecord readers with bad-row accounting, grain pipelines and per-host shards,
tokenizers (SentencePiece trained in-process, a Hugging Face tokenizer.json built in-process), features.

Expected values are written by hand from the test inputs (which rows are bad and why, on which line), or computed
independently (set partitions by brute force, decode(encode(text)) == text).
"""
import json
import os

import numpy as np
import pytest

from nash_lm.data import features, records, sources, tokenizer

GOOD = [
    {"prompt": "p1", "chosen": "a", "rejected": "b"},
    {"prompt": "p2", "chosen": "c", "rejected": "d", "label": 0.75},
    {"prompt": "p3 ünïcode", "chosen": "e", "rejected": "f", "label": 0},
]


def _write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def _bad_file(tmp_path):
    lines = [
        json.dumps(GOOD[0]).encode(),                                   # 1 ok
        json.dumps({"prompt": "x", "chosen": "y"}).encode(),             # 2 missing rejected
        json.dumps({"prompt": 3, "chosen": "y", "rejected": "z"}).encode(),  # 3 wrong type
        json.dumps(GOOD[1]).encode(),                                   # 4 ok
        b"",                                                            # 5 blank (not a row)
        json.dumps({"prompt": "  ", "chosen": "y", "rejected": "z"}).encode(),  # 6 empty string
        b'{"prompt": "\xff\xfe", "chosen": "y", "rejected": "z"}',      # 7 invalid UTF-8
        b'{"prompt": "x", "chosen": ',                                  # 8 invalid JSON
        json.dumps({"prompt": "x", "chosen": "y", "rejected": "z", "label": 1.5}).encode(),  # 9 label range
        json.dumps(["not", "an", "object"]).encode(),                   # 10 not an object
        json.dumps({"prompt": "x", "chosen": "y", "rejected": "z", "label": True}).encode(),  # 11 bool label
        json.dumps(GOOD[2], ensure_ascii=False).encode(),               # 12 ok
    ]
    path = tmp_path / "pairs.jsonl"
    _write_lines(path, lines)
    return str(path)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "a.jsonl"
    sources.write_jsonl(path, GOOD)
    rows, report = sources.read_jsonl(str(path), "preference")
    assert report.skipped == 0 and report.kept == 3
    assert rows[0] == {"prompt": "p1", "chosen": "a", "rejected": "b", "label": 1.0}
    assert rows[1]["label"] == 0.75 and rows[2]["label"] == 0.0
    assert rows[2]["prompt"] == "p3 ünïcode"


def test_jsonl_bad_rows_skipped_with_file_and_line(tmp_path):
    path = _bad_file(tmp_path)
    rows, report = sources.read_jsonl(path, "preference", on_error="skip")
    assert [r["prompt"] for r in rows] == ["p1", "p2", "p3 ünïcode"]
    assert report.kept == 3 and report.skipped == 8 and report.blank_lines == 1
    assert [b.line for b in report.bad] == [2, 3, 6, 7, 8, 9, 10, 11]
    assert all(b.path == path for b in report.bad)
    reasons = [b.reason for b in report.bad]
    assert "missing field 'rejected'" in reasons[0]
    assert "expected a string, got int" in reasons[1]
    assert "empty string" in reasons[2]
    assert "invalid UTF-8" in reasons[3]
    assert "invalid JSON" in reasons[4]
    assert "label" in reasons[5] and "1.5" in reasons[5]
    assert "expected a JSON object" in reasons[6]
    assert "label" in reasons[7] and "bool" in reasons[7]
    assert str(report.bad[0]) == f"{path}:2: missing field 'rejected'"


def test_jsonl_bad_rows_rejected(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(sources.DataError, match=rf"^{path}:2: missing field 'rejected'$"):
        sources.read_jsonl(path, "preference", on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        sources.read_jsonl(path, "preference", on_error="ignore")


def test_same_file_read_as_other_kinds(tmp_path):
    path = _bad_file(tmp_path)
    prompts, report = sources.read_jsonl(path, "prompt")
    # as prompts only lines 3 (int prompt), 6 (blank prompt), 7, 8, 10 are bad
    assert [b.line for b in report.bad] == [3, 6, 7, 8, 10]
    assert len(prompts) == 11 - 5
    with pytest.raises(ValueError, match="unknown"):
        sources.read_jsonl(path, "dialogue")


def test_array_record_round_trip_and_bad_records(tmp_path):
    path = str(tmp_path / "pairs.array_record")
    raw = [json.dumps(GOOD[0]).encode(), b"\xff not utf8", json.dumps({"prompt": "x"}).encode(),
           json.dumps(GOOD[1]).encode()]
    sources.write_array_record(path, raw, encoded=True)
    rows, report = sources.read_records(path, "preference")
    assert [r["prompt"] for r in rows] == ["p1", "p2"]
    assert [(b.line, b.path) for b in report.bad] == [(2, path), (3, path)]
    assert "invalid UTF-8" in report.bad[0].reason and "missing field 'chosen'" in report.bad[1].reason
    path2 = str(tmp_path / "good.array_record")
    sources.write_array_record(path2, GOOD)
    rows2, report2 = sources.read_records(path2, "preference")
    assert report2.skipped == 0
    assert rows2 == sources.read_jsonl(_jsonl(tmp_path, GOOD), "preference")[0]


def _jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    sources.write_jsonl(path, rows)
    return str(path)


@pytest.mark.parametrize("n,count,equal", [(23, 4, False), (23, 4, True), (8, 3, False), (5, 5, True)])
def test_shards_partition_records(tmp_path, n, count, equal):
    rows = [{"prompt": f"prompt {i}"} for i in range(n)]
    source = sources.RecordSource(rows)
    seen = []
    sizes = []
    for index in range(count):
        ds = sources.dataset(source, shard_index=index, shard_count=count, shuffle_seed=7, equal_shards=equal)
        got = [r["prompt"] for r in ds]
        sizes.append(len(got))
        assert len(set(got)) == len(got)
        seen += got
    expected = n - n % count if equal else n
    assert sorted(seen) == sorted(f"prompt {i}" for i in range(expected))  # disjoint and complete
    if equal:
        assert len(set(sizes)) == 1
    assert max(sizes) - min(sizes) <= 1


def test_shard_defaults_and_errors():
    import jax

    assert sources.shard_options() == (jax.process_index(), jax.process_count())
    with pytest.raises(ValueError, match="shard_index"):
        sources.shard_options(3, 3)
    with pytest.raises(ValueError, match="shard_count"):
        sources.shard_options(0, 0)


def test_pipeline_shuffle_epochs_batches_and_resume():
    rows = [{"prompt": f"{i}"} for i in range(10)]
    source = sources.RecordSource(rows)
    ds = sources.dataset(source, shard_index=0, shard_count=1, shuffle_seed=3, num_epochs=2,
                         transform=lambda r: {"x": np.int32(int(r["prompt"]))}, batch_size=4)
    batches = [b["x"] for b in ds]
    flat = np.concatenate(batches)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], np.arange(10))  # shuffled
    again = np.concatenate([b["x"] for b in ds])
    np.testing.assert_array_equal(flat, again)  # deterministic
    it = iter(ds)
    next(it), next(it)
    state = it.get_state()
    rest = [b["x"] for b in it]
    it2 = iter(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(np.concatenate(rest), np.concatenate([b["x"] for b in it2]))


TEXTS = [
    "Return the number of items in a container.",
    "Open a file and return a stream; raise OSError upon failure.",
    "Split the string at the first occurrence of sep.",
    "Compute the greatest common divisor of two integers.",
    "Return a new sorted list from the items in iterable.",
] * 8


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return tokenizer.train_sentencepiece(TEXTS, vocab_size=64, cache_dir=str(tmp_path_factory.mktemp("spm")))


def test_sentencepiece_round_trip_and_cache(spm, tmp_path):
    assert (spm.pad_id, spm.bos_id, spm.eos_id) == (0, 1, 2) and spm.vocab_size == 64
    for text in TEXTS[:5] + ["Return the stream.", "gcd of items"]:
        ids = spm.encode(text)
        assert all(3 <= i < 64 for i in ids)
        assert spm.decode(ids) == text
    assert spm.decode([spm.bos_id] + spm.encode("Split the string.") + [spm.eos_id, 0, 0]) == "Split the string."
    files = os.listdir(os.path.dirname(spm.path))
    again = tokenizer.train_sentencepiece(TEXTS, vocab_size=64, cache_dir=os.path.dirname(spm.path))
    assert again.path == spm.path and os.listdir(os.path.dirname(spm.path)) == files
    fresh = tokenizer.train_sentencepiece(TEXTS, vocab_size=64, cache_dir=str(tmp_path))
    with open(fresh.path, "rb") as a, open(spm.path, "rb") as b:
        assert a.read() == b.read()  # deterministic training
    assert tokenizer.load(spm.path).encode(TEXTS[0]) == spm.encode(TEXTS[0])


def test_vocabulary_that_does_not_fit_fails_in_one_line(spm):
    tokenizer.check_fits(spm, 64)
    with pytest.raises(ValueError) as e:
        tokenizer.check_fits(spm, 32)
    assert "\n" not in str(e.value) and "63" in str(e.value) and "32" in str(e.value)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5, "again": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    hf = tokenizer.load(path)
    assert (hf.pad_id, hf.bos_id, hf.eos_id, hf.vocab_size) == (0, 1, 2, 7)
    assert hf.encode("hello world again") == [4, 5, 6]
    assert hf.decode([1, 4, 5, 2, 0]) == "hello world"
    with pytest.raises(ValueError, match="no pad token"):
        tokenizer.HFTokenizer(path, pad_token="<nope>")
    with pytest.raises(ValueError, match="do not fit"):
        tokenizer.check_fits(hf, 6)


def test_features_layout(spm):
    rec = {"prompt": "Return the number of items in a container.", "chosen": "Return the number.",
           "rejected": "Split the string at the first occurrence of sep.", "label": 0.75}
    y = spm.encode(rec["chosen"])
    r = len(y) + 3
    f = features.featurize(rec, "preference", spm, prompt_len=8, response_len=r, index=0, seed=0)
    p_ids = spm.encode(rec["prompt"])
    assert len(p_ids) >= 7
    np.testing.assert_array_equal(f["prompt"], [1] + p_ids[:7])  # truncated, keeps the first tokens
    np.testing.assert_array_equal(f["y"], y + [2, 0, 0])
    np.testing.assert_array_equal(f["y_mask"], [1] * (len(y) + 1) + [0, 0])
    y2 = spm.encode(rec["rejected"])
    assert len(y2) > r
    np.testing.assert_array_equal(f["y2"], y2[:r])  # truncated: no EOS
    assert f["y2_mask"].sum() == r and f["label"] == np.float32(0.75)
    assert features.decode_response(spm, f["y"], f["y_mask"]) == "Return the number."
    short = features.featurize({"prompt": "gcd"}, "prompt", spm, prompt_len=8, response_len=6)
    n = len(spm.encode("gcd")) + 1
    np.testing.assert_array_equal(short["prompt_mask"], [0] * (8 - n) + [1] * n)
    assert short["prompt"][8 - n] == 1 and short["prompt"][-1] != 0
    arrays = features.to_arrays([rec] * 2000, "preference", spm, 8, 6, seed=1)
    assert arrays["y"].shape == (2000, 6) and arrays["y"].dtype == np.int32
    assert abs(arrays["hard_label"].mean() - 0.75) < 0.03  # Bernoulli(0.75) draws
    np.testing.assert_array_equal(arrays["hard_label"], features.to_arrays([rec] * 2000, "preference", spm, 8, 6,
                                                                             seed=1)["hard_label"])


def test_pipeline_with_featurizer_batches_tokens(spm, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": t, "response": t.split()[0]} for t in TEXTS[:5]])
    source = sources.RecordSource.from_files(path, "sft")
    ds = sources.dataset(source, shard_index=0, shard_count=1, batch_size=5,
                         transform=features.Featurizer("sft", spm, 10, 12))
    (batch,) = list(ds)
    assert batch["prompt"].shape == (5, 10) and batch["response"].shape == (5, 12)
    for i, t in enumerate(TEXTS[:5]):
        assert features.decode_response(spm, batch["response"][i], batch["response_mask"][i]) == t.split()[0]


def test_global_batch_from_local_data():
    import jax
    from jax.sharding import PartitionSpec

    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    local = {"x": np.arange(16, dtype=np.int32).reshape(8, 2)}
    out = sources.global_batch(local, mesh, PartitionSpec("data"))
    assert out["x"].shape == (8, 2)  # one process: the global batch is the local one
    np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
    assert len(out["x"].sharding.device_set) == len(jax.devices())


def test_records_schema_fields():
    assert records.fields("preference") == ("prompt", "chosen", "rejected", "label")
    assert records.parse({"prompt": "a", "response": "b", "extra": 1}, "sft") == {"prompt": "a", "response": "b"}
