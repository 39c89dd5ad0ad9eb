"""The `train` job end to end through `python -m nash_lm.main`: the tiny pipeline, exact resume after kill -9,
SIGTERM, NaN stop, and bad input (exit code 2, one line, nothing in the workdir overwritten).

The subprocesses run on 2 host devices (data parallel 2) with XLA's CPU backend optimisations off, which keeps
compilation (most of the cost of a tiny model) short; the results are still bitwise deterministic, which is
what the resume test needs.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
PIPELINE = "sft,pm,rm,nash_md,rlhf,ipo_md,nash_md_oracle,nash_ema"
# Every step logged, a checkpoint every 2 steps in the policy stages.
COMMON = [f"--config.pipeline={PIPELINE}"] + [
    f"--config.stages.{s}.log_every=1" for s in PIPELINE.split(",")]
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
}


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "nash_lm.main", f"--config={CONFIG}", f"--workdir={workdir}", *COMMON,
            *overrides]


def _run(workdir, *overrides, timeout=400):
    return subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _stage_hashes(summary):
    return {name: s["policy_params_sha256"] for name, s in summary["stages"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_tiny_pipeline_outputs(uninterrupted):
    s = _summary(uninterrupted)
    assert s["status"] == "complete"
    assert s["pipeline"] == PIPELINE.split(",")
    assert len(s["policy_params_sha256"]) == 64
    assert s["policy_params_sha256"] == s["stages"]["nash_ema"]["policy_params_sha256"]
    assert s["wall_time_s"] > 0 and len(s["config_hash"]) == 64
    with open(os.path.join(uninterrupted, "config.json")) as f:
        assert json.load(f)["pipeline"] == PIPELINE
    # Judges report held-out accuracy; Nash-EMA-PG evaluates the averaged policy too.
    for judge in ("pm", "rm"):
        assert 0.0 <= s["stages"][judge]["eval"]["accuracy"] <= 1.0
    ema_eval = s["stages"]["nash_ema"]["eval"]
    assert {"win_rate_vs_ref", "ema_win_rate_vs_ref", "kl_to_ref", "ema_kl_to_ref"} <= set(ema_eval)
    assert s["stages"]["nash_ema"]["ema_params_sha256"] != s["stages"]["nash_ema"]["policy_params_sha256"]
    # One metrics line per step and stage (log_every=1), plus the final evaluation line.
    lines = [json.loads(x) for x in open(os.path.join(uninterrupted, "metrics.jsonl"))]
    steps = {}
    for rec in lines:
        if "loss" in rec:
            steps.setdefault(rec["stage"], []).append(rec["step"])
    assert steps["nash_md"] == [1, 2, 3, 4]
    nash = next(r for r in lines if r["stage"] == "nash_md" and "loss" in r)
    for key in ("kl", "pref_mean", "tokens_per_s", "tflops_per_s_per_device", "mfu", "grad_norm"):
        assert np.isfinite(nash[key]), key
    assert 0.0 <= nash["pref_mean"] <= 1.0 and nash["mfu"] > 0
    rl = next(r for r in lines if r["stage"] == "rlhf" and "loss" in r)
    assert "reward_mean" in rl and "kl" in rl
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
    # Checkpoints: keep-N (tiny keeps 2), the last one is the final step.
    ck = sorted(int(d) for d in os.listdir(os.path.join(uninterrupted, "stages", "nash_md", "checkpoints"))
                if d.isdigit())
    assert ck == [2, 4]


def _wait_for(path, predicate, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if predicate(json.loads(line)):
                            return True
                    except json.JSONDecodeError:
                        pass
        time.sleep(0.05)
    return False


def test_kill9_then_rerun_reaches_the_same_parameters(uninterrupted, tmp_path):
    """kill -9 in the middle of the Nash-EMA-PG stage (after step 3; checkpoints at 2), rerun the same command.

    To keep the test short, the workdir starts as a copy of the uninterrupted run's with the last stage
    (nash_ema) and the summary removed: the rerun skips the complete stages and resumes nash_ema."""
    workdir = str(tmp_path / "killed")
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(os.path.join(workdir, "stages", "nash_ema"))
    os.remove(os.path.join(workdir, "summary.json"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        kept = [x for x in f if json.loads(x)["stage"] != "nash_ema"]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(kept)

    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        hit = _wait_for(os.path.join(workdir, "metrics.jsonl"),
                        lambda r: r.get("stage") == "nash_ema" and r.get("step", 0) >= 3 and "loss" in r, proc)
        assert hit, "the run ended before reaching nash_ema step 3"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert not os.path.exists(os.path.join(workdir, "stages", "nash_ema", "done.json"))

    rerun = _run(workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ref, got = _summary(uninterrupted), _summary(workdir)
    assert got["policy_params_sha256"] == ref["policy_params_sha256"]
    assert _stage_hashes(got) == _stage_hashes(ref)
    assert got["stages"]["nash_ema"]["ema_params_sha256"] == ref["stages"]["nash_ema"]["ema_params_sha256"]
    # The metrics file holds each step of the interrupted stage once.
    steps = [r["step"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
             if r["stage"] == "nash_ema" and "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_sigterm_saves_the_current_step_and_exits_cleanly(uninterrupted, tmp_path):
    workdir = str(tmp_path / "term")
    proc = subprocess.Popen(_cmd(workdir, "--config.pipeline=sft"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # SIGTERM as soon as the SFT stage has started (it arrives while its step compiles).
    t0 = time.time()
    while (not os.path.exists(os.path.join(workdir, "stages", "sft", "fingerprint.json"))
           and time.time() - t0 < 120):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    ckdir = os.path.join(workdir, "stages", "sft", "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [1]  # the step it stopped at
    assert not os.path.exists(os.path.join(workdir, "stages", "sft", "done.json"))
    again = _run(workdir, "--config.pipeline=sft")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(workdir)["policy_params_sha256"] == _summary(uninterrupted)["stages"]["sft"][
        "policy_params_sha256"]


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "nan")
    proc = _run(workdir, "--config.pipeline=sft", "--config.stages.sft.lr=1e30",
                "--config.stages.sft.checkpoint_every=1", "--config.stages.sft.grad_clip=0.0")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradients at step 2" in last, last
    ckdir = os.path.join(workdir, "stages", "sft", "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [1]
    state = ocp.StandardCheckpointer().restore(os.path.join(ckdir, "1", "state"))
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")
    assert not os.path.exists(os.path.join(workdir, "stages", "sft", "done.json"))


def _snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("override,needle", [
    ("--config.stages.nash_md.beta=1.5", "config.stages.nash_md.beta"),
    ("--config.stages.sft.no_such_field=1", "no_such_field"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, override, needle):
    workdir = str(tmp_path / "bad")
    proc = _run(workdir, override, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not os.path.exists(workdir)


def _tiny(**stage_overrides):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    config.pipeline = PIPELINE
    for key, value in stage_overrides.items():
        name, field = key.split("__")
        config.stages[name][field] = value
    return config


@pytest.mark.parametrize("overrides,needle", [
    (dict(nash_md__beta=-0.1), "config.stages.nash_md.beta"),
    (dict(ipo_md__beta=1.01), "config.stages.ipo_md.beta"),
    (dict(rlhf__tau=-0.1), "config.stages.rlhf.tau"),
    (dict(ipo_md__tau=0.0), "config.stages.ipo_md.tau"),
    (dict(pm__steps=0), "config.stages.pm.steps"),
    (dict(nash_ema__ema_decay=1.0), "config.stages.nash_ema.ema_decay"),
    (dict(nash_md__batch_size=12), "not divisible by the data-parallel size 8"),
    (dict(nash_md__lr_schedule="cosine-ish"), "config.stages.nash_md.lr_schedule"),
    (dict(rlhf__judge="pm"), "produces 'preference' parameters"),
    (dict(nash_md__judge="nope"), "missing stage input 'nope'"),
    (dict(nash_md__judge="oracle:nash_lm.data.synthetic:no_such_fn"), "cannot import"),
    (dict(nash_md__microbatches=3), "config.stages.nash_md.microbatches: must be a positive divisor of batch_size=8"),
    (dict(rlhf__microbatches=2), "config.stages.rlhf.microbatches: rlhf's leave-one-out baseline"),
    (dict(nash_md__judge="host_oracle"), "config.stages.nash_md.judge: 'host_oracle' is the oracle a task job"),
])
def test_bad_config_values_raise_before_anything_is_written(tmp_path, overrides, needle):
    from nash_lm.train import pipeline

    workdir = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        pipeline.run(_tiny(**overrides), workdir)
    assert not os.path.exists(workdir)


def test_judge_from_a_language_model_needs_the_same_model_config(tmp_path):
    from nash_lm.train import pipeline

    workdir = str(tmp_path / "bad")
    config = _tiny(pm__init="sft")
    config.judge_model.d_ff = 2 * config.model.d_ff
    with pytest.raises(ValueError, match=r"config\.stages\.pm\.init: 'sft' is a language model"):
        pipeline.run(config, workdir)
    assert not os.path.exists(workdir)


def test_bad_structure_raises(tmp_path):
    from nash_lm.train import pipeline

    config = _tiny()
    with config.unlocked():
        config.stages.sft.extra = 1
    with pytest.raises(ValueError, match=r"config\.stages\.sft: unknown field\(s\) \['extra'\]"):
        pipeline.run(config, str(tmp_path / "w"))
    config = _tiny()
    config.pipeline = "sft,nash_md,pm"
    with pytest.raises(ValueError, match="stage 'pm' runs after 'nash_md'"):
        pipeline.run(config, str(tmp_path / "w"))
    config = _tiny()
    config.pipeline = "nash_md"  # sft is defined but neither run first nor complete in the workdir
    with pytest.raises(ValueError, match="missing stage input 'sft'"):
        pipeline.run(config, str(tmp_path / "w"))
    config = _tiny()
    config.model.n_heads = 3
    with pytest.raises(ValueError, match="config.model"):
        pipeline.run(config, str(tmp_path / "w"))
    config = _tiny()
    config.mesh.data = 3
    with pytest.raises(ValueError, match="mesh"):
        pipeline.run(config, str(tmp_path / "w"))
    config = _tiny()
    with config.unlocked():
        config.decode_rules = "embed=nope"
    with pytest.raises(ValueError, match=r"config\.decode_rules: .*nope"):
        pipeline.run(config, str(tmp_path / "w"))
    assert not os.path.exists(str(tmp_path / "w"))


def test_incompatible_workdir_is_refused_untouched(uninterrupted):
    before = _snapshot(uninterrupted)
    proc = _run(uninterrupted, "--config.stages.sft.lr=0.5", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "incompatible config" in lines[0] and "stage.lr" in lines[0], proc.stderr
    assert _snapshot(uninterrupted) == before
    # Operational fields (logging cadence) may change: the complete run is recognised and every stage skipped,
    # its files untouched and its records (parameter hashes included) returned as they were.
    stages = os.path.join(uninterrupted, "stages")
    before_stages, before_summary = _snapshot(stages), _summary(uninterrupted)
    again = _run(uninterrupted, "--config.stages.nash_md.log_every=2", timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _snapshot(stages) == before_stages
    assert _summary(uninterrupted)["stages"] == before_summary["stages"]


def test_a_complete_workdir_compiles_nothing(uninterrupted, monkeypatch):
    """In process, on the finished workdir: no stage runs, XLA compiles nothing, no file of a stage changes."""
    import jax

    from nash_lm.train import pipeline, stage as stage_lib

    compiled, listening = [], [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, duration, **kw: compiled.append(name) if listening[0] and "compile" in name else None)
    monkeypatch.setattr(stage_lib.Stage, "run", lambda self, stop: pytest.fail(f"stage {self.spec.name} ran"))
    stages = os.path.join(uninterrupted, "stages")
    metrics_file = os.path.join(uninterrupted, "metrics.jsonl")
    stat = lambda p: (os.stat(p).st_size, os.stat(p).st_mtime_ns)
    before, metrics_before = _snapshot(stages), stat(metrics_file)
    config = _tiny()
    config.peak_tflops = 1.0  # no matmul-peak measurement (not part of any stage's fingerprint)
    try:
        summary = pipeline.run(config, uninterrupted)
    finally:
        listening[0] = False
    assert compiled == []
    assert _snapshot(stages) == before and stat(metrics_file) == metrics_before
    on_disk = {n: json.load(open(os.path.join(stages, n, "done.json"))) for n in PIPELINE.split(",")}
    assert summary["stages"] == on_disk


def test_every_training_config_validates(tmp_path):
    """configs/*.py with job 'train' pass validation (nothing compiled, nothing written)."""
    import importlib.util

    from nash_lm.train import spec as spec_lib

    names = []
    for fname in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if not fname.endswith(".py"):
            continue
        spec = importlib.util.spec_from_file_location(f"cfg_{fname[:-3]}", os.path.join(ROOT, "configs", fname))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        if config.get("job") != "train":
            continue
        spec_lib.resolve(config, str(tmp_path / fname))
        names.append(fname)
    assert {"tiny.py", "nlhf_paper.py"} <= set(names)
    assert not os.listdir(tmp_path)


def test_pipeline_params_read_back_the_exports(uninterrupted):
    """`Pipeline.params` returns the trees the stages exported: their hashes are the ones `done.json` recorded
    at training time (the policy of a judge and of an lm stage, the averaged policy of Nash-EMA-PG)."""
    from nash_lm.train import checkpoint as ckpt_lib, pipeline

    config = _tiny()
    with pipeline.Pipeline(config, uninterrupted) as pipe:
        for name, key in (("pm", "policy"), ("nash_md", "policy"), ("nash_ema", "policy"), ("nash_ema", "ema")):
            done = json.load(open(os.path.join(uninterrupted, "stages", name, "done.json")))
            _, params = pipe.params(name, key)
            assert ckpt_lib.params_sha256(params) == done[f"{key}_params_sha256"], (name, key)
