"""Metrics: the TensorBoard event file read back with TensorBoard's own loader (independent of tensorboardX, the
writer), JSONL truncation, FLOP closed forms."""
import json
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator

from nash_lm.train import metrics


def test_metrics_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path))
    w.write("sft", 2, {"loss": 1.5, "kl": 0.25, "note": "text", "ok": True})
    w.write("sft", 4, {"loss": 1.25, "kl": 0.5})
    w.write("pm", 2, {"loss": 0.7})
    w.write("pm", 2, {"final": True, "eval/accuracy": 0.5})
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in lines] == [("sft", 2), ("sft", 4), ("pm", 2), ("pm", 2)]

    (name,) = os.listdir(tmp_path / "tensorboard")
    assert name.startswith("events.out.tfevents.")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()  # TensorBoard's reader: TFRecord framing with its CRCs, Event/Summary messages
    assert acc.file_version == 2.0  # "brain.Event:2"
    # numbers only, tagged {stage}/{metric}; strings, booleans, `step` and `final` stay out
    assert sorted(acc.Tags()["scalars"]) == ["pm/eval/accuracy", "pm/loss", "sft/kl", "sft/loss"]
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert got["sft/loss"] == [(2, pytest.approx(1.5)), (4, pytest.approx(1.25))]
    assert got["sft/kl"] == [(2, pytest.approx(0.25)), (4, pytest.approx(0.5))]
    assert got["pm/loss"] == [(2, pytest.approx(0.7))]
    assert got["pm/eval/accuracy"] == [(2, pytest.approx(0.5))]

    # Resume of stage sft from step 2: its later lines go, other stages stay.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "step": 6, "lo')  # a line cut by kill -9
    w = metrics.MetricsWriter(str(tmp_path))
    w.truncate("sft", 2)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in lines] == [("sft", 2), ("pm", 2), ("pm", 2)]
    w.truncate("pm", 2)  # pm finished again: its final evaluation is written anew
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"], "final" in r) for r in lines] == [("sft", 2, False), ("pm", 2, False)]
    assert len(os.listdir(tmp_path / "tensorboard")) == 1  # a writer that only truncates opens no event file


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.distributed, "is_primary", lambda: False)
    w = metrics.MetricsWriter(str(tmp_path))
    assert w.write("sft", 1, {"loss": 2.0}) == {"stage": "sft", "step": 1, "loss": 2.0}
    w.truncate("sft", 0)
    w.close()
    assert os.listdir(tmp_path) == []


def test_forward_flops_closed_form():
    # One layer, one token attending to 4 positions: projections d*(q+2kv)+q*d, MLP 3*d*ff, attention 2*q*ctx,
    # LM head d*V; times 2 FLOPs per multiply-add.
    f = metrics.lm_forward_flops(n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16,
                                 vocab_size=10, tokens=1, context=4)
    assert f == 2 * (8 * (8 + 8) + 8 * 8 + 3 * 8 * 16 + 2 * 8 * 4 + 8 * 10)


def test_forward_flops_with_the_head_at_some_positions():
    # Three positions through the trunk, the LM head at one of them (a prefill), or at none.
    kw = dict(n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, vocab_size=10, tokens=3, context=4)
    trunk = 8 * (8 + 8) + 8 * 8 + 3 * 8 * 16 + 2 * 8 * 4
    assert metrics.lm_forward_flops(**kw, head_tokens=1) == 2 * (3 * trunk + 8 * 10)
    assert metrics.lm_forward_flops(**kw, head_tokens=0) == 2 * 3 * trunk
