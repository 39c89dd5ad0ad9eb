"""`python -m nash_lm.aot`: every stage of a pipeline compiled ahead of time through the trainer's own code, with
its memory analysis and collective inventory, on the 8 fake CPU devices and (when libtpu is importable) for a
deviceless TPU v5e:2x2; bad input is one line with exit code 2."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = "sft,pm,nash_md,nash_md_oracle"
TINY_PARAMS = 32 * 32 + 1 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # embed (tied), one block, final norm


def _aot(topology, *extra, env=None):
    cmd = [sys.executable, "-m", "nash_lm.aot", "--config=configs/tiny.py", f"--topology={topology}",
           f"--config.pipeline={PIPELINE}", "--config.mesh.data=1", "--config.mesh.fsdp=-1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or os.environ)


def _records(out):
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _check(records, chips):
    assert [r["stage"] for r in records] == PIPELINE.split(",")
    by = {r["stage"]: r for r in records}
    assert by["nash_md"]["pieces"] == 1 and by["nash_md_oracle"]["pieces"] == 2  # host oracle: rollout + update
    for r in records:
        assert r["chips"] == chips and r["mesh"]["fsdp"] == chips and r["fits"]
        # policy + two Adam moments in f32, sharded over fsdp (vectors too small to shard are replicated: >=)
        assert r["memory_per_chip"]["argument"] >= 3 * 4 * r["params"] / chips
        assert r["analytic_flops_per_step"] > 0
    assert by["sft"]["params"] == TINY_PARAMS
    for name in ("nash_md", "nash_md_oracle"):  # the decode re-lays the weights once, never per token
        assert by[name]["weight_allgather_bytes_in_decode"] == 0
        assert by[name]["collectives"]["total"]["bytes_per_step"] > 0


def test_every_stage_compiles_on_the_local_devices():
    out = _aot("local")
    assert out.returncode == 0, out.stderr[-3000:]
    _check(_records(out), chips=8)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (libtpu 0.0.52: "
                    "pip install -c constraints/py312.txt -e '.[tpu]')")
def test_every_stage_compiles_for_a_deviceless_tpu():
    out = _aot("v5e:2x2", env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(out)
    _check(records, chips=4)
    assert all(r["hbm_per_chip"] == 16 * 2**30 for r in records)


def test_frozen_dtype_bf16_halves_the_frozen_bytes():
    """`config.frozen_dtype='bfloat16'` stores the policy stage's reference and judge matrices in bf16: the
    compiled step's per-chip argument bytes drop by half the f32 bytes of those matrices (the vectors, and the
    policy's own state, unchanged); stages without frozen trees are untouched."""
    by = {}
    for dtype in ("", "bfloat16"):
        out = _aot("local", "--config.pipeline=sft,pm,nash_md", f"--config.frozen_dtype={dtype}")
        assert out.returncode == 0, out.stderr[-3000:]
        by[dtype] = {r["stage"]: r["memory_per_chip"]["argument"] for r in _records(out)}
    assert by[""]["sft"] == by["bfloat16"]["sft"] and by[""]["pm"] == by["bfloat16"]["pm"]
    d = 32  # tiny: ref (embed 32x32, qkv 32x2x3x16, out 2x1x16x32, gate_up 32x2x64, down 64x32) + judge's matrices
    ref_matrices = d * d + d * 2 * 3 * 16 + 2 * 16 * d + d * 2 * 64 + 64 * d
    saved = by[""]["nash_md"] - by["bfloat16"]["nash_md"]
    assert saved >= 2 * ref_matrices * 2 / 8, (by, saved)  # >= (ref + judge) x 2 bytes saved / 8 chips


@pytest.mark.parametrize("args,needle", [
    (["--topology=v9z:2x2"], "--topology: 'v9z:2x2': expected one of"),
    (["--topology=local", "--config.stages.nash_md.beta=2.0"], "config.stages.nash_md.beta: must be in [0, 1]"),
    (["--topology=local", "--config.frozen_dtype=float16"], "config.frozen_dtype: 'float16' not in"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    cmd = [sys.executable, "-m", "nash_lm.aot", "--config=configs/tiny.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = [x for x in out.stderr.strip().splitlines() if x.strip()][-1]
    assert needle in last, out.stderr
