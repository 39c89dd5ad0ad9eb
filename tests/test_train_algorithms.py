"""The policy algorithms of issue 24 as stages of the `train` job (`python -m nash_lm.main`, configs/tiny.py's
stages outside the default pipeline): each trains (with and without LoRA), its extra trees (the anchor, the
magnet, ONPO's predictor) are checkpointed and restored (a resumed stage ends on the uninterrupted one's
parameters), and bad settings are one-line errors with exit code 2 and nothing written.

The subprocesses run on 2 host devices with XLA's CPU backend optimisations off (short compiles; results still
bitwise deterministic)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
STAGES = ["inpo", "inpo_lora", "dpo", "offline_ipo", "dpo_lora", "sppo", "mpo", "onpo", "exploiter"]
PIPELINE = ",".join(["sft", "pm", "nash_md"] + STAGES)  # the exploiter exploits nash_md
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
}


def _run(workdir, *overrides, pipeline=PIPELINE, timeout=1800):
    cmd = [sys.executable, "-m", "nash_lm.main", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--config.pipeline={pipeline}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _done(workdir, name):
    with open(os.path.join(workdir, "stages", name, "done.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("algorithms"))
    proc = _run(wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_trains_and_moves_the_policy(workdir, name):
    done = _done(workdir, name)
    assert done["steps"] == 4
    assert done["policy_params_sha256"] != _done(workdir, "sft")["policy_params_sha256"]
    assert all(v == v for v in done["final_metrics"].values())  # finite, logged
    if "win_rate_vs_ref" in done["eval"]:  # sampled against mu and judged
        assert 0.0 <= done["eval"]["win_rate_vs_ref"] <= 1.0
    else:  # an offline stage: its loss on held-out labelled pairs, and how many its implicit reward orders
        assert done["eval"]["loss"] > 0 and 0.0 <= done["eval"]["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["inpo", "inpo_lora", "mpo", "onpo", "exploiter"])
def test_resume_restores_the_extra_trees(workdir, tmp_path, name):
    """Cut after the step-2 checkpoint, while the anchor (refreshed at step 3; ONPO's at step 4; the exploiter's
    target never) and MPO's magnet (reset at step 3) still differ from the policy: the resumed stage ends on the
    uninterrupted parameters only if they were restored (a target re-copied from the step-2 policy would not)."""
    wd = str(tmp_path / "wd")
    shutil.copytree(workdir, wd)
    stage = os.path.join(wd, "stages", name)
    for path in ("done.json", "export", "adapters", "adapters.json", "checkpoints/4"):
        full = os.path.join(stage, path)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.remove(full)
    proc = _run(wd, pipeline=f"sft,pm,nash_md,{name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _done(wd, name)["policy_params_sha256"] == _done(workdir, name)["policy_params_sha256"]


@pytest.mark.parametrize("override,needle", [
    ("--config.stages.nash_md.anchor_every=2", "anchor_every"),
    ("--config.stages.inpo.eta_inv=0.01", "config.stages.inpo.eta_inv: must be >= tau"),
    ("--config.stages.inpo.anchor_every=0", "config.stages.inpo.anchor_every: must be >= 1"),
    ("--config.stages.dpo.judge=pm", "config.stages.dpo.judge: 'pm': dpo learns from the labels of its pairs"),
    ("--config.stages.dpo.anchor_every=2", "anchor_every"),
    ("--config.stages.sppo.samples=1", "config.stages.sppo.samples: SPPO estimates win rates from K >= 2 samples"),
    ("--config.stages.mpo.reset_every=0", "config.stages.mpo.reset_every: the magnet's reset period must be > 0"),
    ("--config.stages.onpo.half_every=0", "config.stages.onpo.half_every: must be >= 1"),
    ("--config.stages.exploiter.init=sft", "config.stages.exploiter.init: 'sft': name the policy stage to exploit"),
])
def test_bad_settings_exit_2_with_one_line_and_write_nothing(tmp_path, override, needle):
    workdir = str(tmp_path / "bad")
    proc = _run(workdir, override, pipeline="sft,pm,nash_md,inpo,dpo,sppo,mpo,onpo,exploiter",
                timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not os.path.exists(workdir)
