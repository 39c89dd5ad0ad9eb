"""Metrics: TensorBoard event files decoded with the protobuf library, CRC-32C check value, JSONL truncation."""
import glob
import json
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from nash_lm.train import metrics


def test_crc32c_check_value():
    # The standard CRC-32C (Castagnoli) check value of "123456789".
    assert metrics.crc32c(b"123456789") == 0xE3069283


def _event_class():
    """TensorBoard's Event/Summary messages (field numbers from tensorflow/core/util/event.proto), built with
    protobuf's own descriptor machinery so the decoding is independent of the hand-written encoder."""
    fdp = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest")
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=9, label=1)
    value.field.add(name="simple_value", number=2, type=2, label=1)
    summary = fdp.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=11, label=3, type_name=".tbtest.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)
    event.field.add(name="step", number=2, type=3, label=1)
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, label=1, type_name=".tbtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def _records(path):
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert hcrc == metrics._masked_crc(data[pos:pos + 8])
        rec = data[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert dcrc == metrics._masked_crc(rec)
        out.append(rec)
        pos += 16 + length
    return out


def test_metrics_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path))
    w.write("sft", 2, {"loss": 1.5, "kl": 0.25})
    w.write("sft", 4, {"loss": 1.25, "kl": 0.5})
    w.write("pm", 2, {"loss": 0.7})
    w.write("pm", 2, {"final": True, "eval/accuracy": 0.5})
    w.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in lines] == [("sft", 2), ("sft", 4), ("pm", 2), ("pm", 2)]

    Event = _event_class()
    (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    events = [Event.FromString(r) for r in _records(path)]
    assert events[0].file_version == "brain.Event:2"
    got = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    assert got[(2, "sft/loss")] == pytest.approx(1.5)
    assert got[(4, "sft/kl")] == pytest.approx(0.5)
    assert got[(2, "pm/loss")] == pytest.approx(0.7)

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
