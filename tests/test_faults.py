"""Faults without loss, through `python -m nash_lm.main` and `python -m nash_lm.export` on the tiny pipeline: a
corrupt newest checkpoint (fallback to the previous one), no readable checkpoint (exit 2, one line), a full disk
(one line, then the same command with room), a resume across software stacks (refused in one line unless
`--allow_stack_change`), and kill -9 during a stage's export and during `nash_lm.export`. Each ends with the
uninterrupted run's `policy_params_sha256` (and the same export files).

The interrupted workdirs start as copies of one uninterrupted run (sft, pm, nash_md) with the last stage's
outputs removed, so each test reruns only that stage. kill -9 lands at a chosen call (`tests/killpoint.py`), not
after a guessed delay.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
KILLPOINT = os.path.join(ROOT, "tests", "killpoint.py")
PIPELINE = "sft,pm,nash_md"
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
}


def _main(workdir, *extra, kill_at=None, timeout=900):
    cmd = [sys.executable] + ([KILLPOINT] if kill_at else ["-m"]) + [
        "nash_lm.main", f"--config={CONFIG}", f"--workdir={workdir}", f"--config.pipeline={PIPELINE}", *extra]
    env = {**ENV, **({"KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _stage(workdir, *parts):
    return os.path.join(workdir, "stages", "nash_md", *parts)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(_stage(workdir, "checkpoints")) if d.isdigit())


def _truncate_data(workdir, step):
    """Cuts every data file of a checkpoint's state (the process's and the merged ones) to half its length, as a
    torn copy or a flaky disk would."""
    for d in (("ocdbt.process_0", "d"), ("d",)):
        d = _stage(workdir, "checkpoints", str(step), "state", *d)
        for name in os.listdir(d):
            path = os.path.join(d, name)
            os.truncate(path, os.path.getsize(path) // 2)


def _contents(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
    return out


def _last_line(stderr):
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(workdir) == [2, 4]  # tiny: checkpoint_every=2, keep 2
    return workdir


def _stopped_after_training(uninterrupted, workdir):
    """A copy of the run as if killed after the last stage's final checkpoint: no done.json, no export, no
    summary (the rerun restores its checkpoint 4 and only exports)."""
    shutil.copytree(uninterrupted, workdir)
    os.remove(_stage(workdir, "done.json"))
    shutil.rmtree(_stage(workdir, "export"))
    os.remove(os.path.join(workdir, "summary.json"))
    return workdir


def _without_last_stage(uninterrupted, workdir):
    """A copy of the run as if it had not reached the last stage."""
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(_stage(workdir))
    os.remove(os.path.join(workdir, "summary.json"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        kept = [x for x in f if json.loads(x)["stage"] != "nash_md"]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    return workdir


def test_summary_and_checkpoints_record_the_software_stack(uninterrupted):
    from importlib import metadata

    from nash_lm import stack

    recorded = _summary(uninterrupted)["stack"]
    assert recorded["jax"] == metadata.version("jax") and recorded["flax"] == metadata.version("flax")
    assert recorded["orbax-checkpoint"] == metadata.version("orbax-checkpoint")
    assert recorded["python"] == ".".join(map(str, sys.version_info[:3]))
    assert recorded == stack.versions()
    with open(_stage(uninterrupted, "checkpoints", "4", "meta", "metadata")) as f:
        assert json.load(f)["stack"] == recorded
    with open(_stage(uninterrupted, "done.json")) as f:
        assert json.load(f)["stack"] == recorded


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
    """Checkpoint 4 truncated: one line names it, the reason and checkpoint 2; 4 is moved aside (kept); steps
    3-4 are trained again and end with the uninterrupted run's parameters."""
    workdir = _stopped_after_training(uninterrupted, str(tmp_path / "corrupt"))
    _truncate_data(workdir, 4)
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "cannot be restored" in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "checkpoint 4" in lines[0] and "restored checkpoint 2 instead" in lines[0], lines[0]
    assert "4.unreadable" in lines[0]
    for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert os.path.isdir(_stage(workdir, "checkpoints", "4.unreadable"))
    assert _steps(workdir) == [2, 4]  # 4 written again by the resumed run
    assert _summary(workdir)["policy_params_sha256"] == _summary(uninterrupted)["policy_params_sha256"]
    steps = [r["step"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
             if r["stage"] == "nash_md" and "loss" in r]
    assert steps == [2, 4]  # log_every=2: step 4 logged once, by the resumed run


def test_no_readable_checkpoint_exits_2_naming_the_directory(uninterrupted, tmp_path):
    workdir = _stopped_after_training(uninterrupted, str(tmp_path / "none"))
    _truncate_data(workdir, 4)
    _truncate_data(workdir, 2)
    proc = _main(workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = _last_line(proc.stderr)
    assert last.startswith("error: stage nash_md: no checkpoint in ") and _stage(workdir, "checkpoints") in last
    assert "2: " in last and "4: " in last, last
    assert "Traceback" not in proc.stderr
    assert _steps(workdir) == [2, 4]  # nothing moved
    assert not os.path.exists(_stage(workdir, "done.json"))


def test_resume_across_software_stacks_is_refused_unless_allowed(uninterrupted, tmp_path):
    workdir = _stopped_after_training(uninterrupted, str(tmp_path / "stack"))
    meta_path = _stage(workdir, "checkpoints", "4", "meta", "metadata")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["stack"] = {**meta["stack"], "jax": "0.10.2", "jaxlib": "0.10.2"}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = _contents(workdir)
    proc = _main(workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "software stack" in x]
    assert len(lines) == 1 and lines[0] == _last_line(proc.stderr), proc.stderr[-3000:]
    assert "checkpoint 4" in lines[0] and "jax 0.10.2 -> " in lines[0] and "--allow_stack_change" in lines[0]
    assert not os.path.exists(_stage(workdir, "done.json"))
    assert _contents(workdir) == before  # nothing changed
    proc = _main(workdir, "--allow_stack_change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "going on as told" in proc.stderr
    # (the stack did not really change here, so the result is still the uninterrupted one)
    assert _summary(workdir)["policy_params_sha256"] == _summary(uninterrupted)["policy_params_sha256"]


def test_a_stage_after_stages_of_another_stack_is_refused(uninterrupted, tmp_path):
    workdir = _without_last_stage(uninterrupted, str(tmp_path / "stack_done"))
    done_path = os.path.join(workdir, "stages", "pm", "done.json")
    with open(done_path) as f:
        done = json.load(f)
    done["stack"]["flax"] = "0.12.8"
    with open(done_path, "w") as f:
        json.dump(done, f)
    proc = _main(workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = _last_line(proc.stderr)
    assert "stage nash_md: the complete stage pm before it" in last and "flax 0.12.8 -> " in last, last
    assert not os.path.exists(_stage(workdir))


def test_kill9_during_a_stage_export_then_rerun(uninterrupted, tmp_path):
    """kill -9 while the last stage writes its params export (orbax's write started, not finished): the rerun
    restores the final checkpoint, exports again and records the uninterrupted run's hash."""
    workdir = _stopped_after_training(uninterrupted, str(tmp_path / "export_kill"))
    proc = _main(workdir, kill_at="orbax.checkpoint:StandardCheckpointer.save+")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = sorted(os.listdir(_stage(workdir)))
    assert "export" not in left and any(n.startswith("export.partial") for n in left), left
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [n for n in os.listdir(_stage(workdir)) if n.startswith("export")] == ["export"]
    got, want = _summary(workdir), _summary(uninterrupted)
    assert got["policy_params_sha256"] == want["policy_params_sha256"]
    assert got["stages"]["nash_md"]["eval"] == want["stages"]["nash_md"]["eval"]


def _export(workdir, out, kill_at=None):
    cmd = [sys.executable] + ([KILLPOINT] if kill_at else ["-m"]) + [
        "nash_lm.export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu", "--batch_size=2"]
    env = {**ENV, **({"KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _files(out):
    """{relative path: bytes} of an export outside OUT/params (orbax names its data files at random and records
    creation times), and {name: array} of OUT/params as orbax reads it back."""
    import numpy as np
    import orbax.checkpoint as ocp

    from nash_lm.export import flatten

    got = {p: b for p, b in _contents(out).items() if not p.startswith("params" + os.sep)}
    ckptr = ocp.StandardCheckpointer()
    params = {k: np.asarray(v) for k, v in flatten(ckptr.restore(os.path.join(out, "params"))).items()}
    ckptr.close()
    return got, params


@pytest.mark.parametrize("kill_at", [
    "orbax.checkpoint:StandardCheckpointer.save+",  # while OUT/params is written
    "nash_lm.interop.hf:export_llama+",  # after the params and the Hugging Face files, before the sampler
])
def test_kill9_during_nash_lm_export_then_rerun(uninterrupted, tmp_path, kill_at):
    ref = str(tmp_path / "ref")
    proc = _export(uninterrupted, ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = str(tmp_path / "out")
    proc = _export(uninterrupted, out, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    proc = _export(uninterrupted, out)  # the same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(out + ".partial")
    (want, want_params), (got, got_params) = _files(ref), _files(out)
    assert sorted(got) == sorted(want) and "sampler/sampler.jaxexport" in got
    assert got == want  # the Hugging Face files, the serialized sampler, the manifest: byte for byte
    assert sorted(got_params) == sorted(want_params) and len(want_params) > 5
    for name, value in want_params.items():
        assert got_params[name].dtype == value.dtype and got_params[name].tobytes() == value.tobytes(), name


# ---------------------------------------------------------------------------------------------------------------
# A full disk: the workdir on a small file system (a tmpfs mounted for the test; root only), else a per-file size
# limit (RLIMIT_FSIZE: every write past it fails with EFBIG, as on a full disk).


@contextlib.contextmanager
def _small_file_system(tmp_path):
    mnt = str(tmp_path / f"mnt-{uuid.uuid4().hex[:8]}")
    os.makedirs(mnt)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt], capture_output=True)
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def _resize(mnt, kib):
    subprocess.run(["mount", "-o", f"remount,size={kib}k", mnt], check=True, capture_output=True)


def _used_kib(path):
    return int(subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True).stdout.split()[0])


def test_full_disk_one_line_then_the_same_command_with_room(uninterrupted, tmp_path):
    with _small_file_system(tmp_path) as mnt:
        if mnt is not None:
            workdir = _without_last_stage(uninterrupted, os.path.join(mnt, "run"))
            # room for the stage's first files, not for its first checkpoint (about 240 KiB)
            _resize(mnt, _used_kib(mnt) + 120)
            proc = _main(workdir)
            _resize(mnt, 16 * 1024)
        else:  # no mount here: every file is limited to 64 KiB (the checkpoint's data file is about 127 KiB)
            import resource

            workdir = _without_last_stage(uninterrupted, str(tmp_path / "run"))

            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

            proc = subprocess.run([sys.executable, "-m", "nash_lm.main", f"--config={CONFIG}",
                                   f"--workdir={workdir}", f"--config.pipeline={PIPELINE}"], cwd=ROOT, env=ENV,
                                  capture_output=True, text=True, timeout=900, preexec_fn=limit)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = _last_line(proc.stderr)
        assert last.startswith("error: cannot write ") and _stage(workdir, "checkpoints") in last, proc.stderr
        assert last.endswith("free space and rerun the same command"), last
        for noise in ("Traceback", "Event loop is closed", "Exception in thread", "ImportError"):
            assert noise not in proc.stderr, proc.stderr[-3000:]
        assert not os.path.exists(_stage(workdir, "done.json"))
        for name in ("sft", "pm"):  # the complete stages are untouched
            assert (open(os.path.join(workdir, "stages", name, "done.json")).read()
                    == open(os.path.join(uninterrupted, "stages", name, "done.json")).read())
        proc = _main(workdir)  # with room
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _summary(workdir)["policy_params_sha256"] == _summary(uninterrupted)["policy_params_sha256"]


def test_orbax_write_tasks_never_retrieved_are_not_logged(caplog):
    """A full disk fails several of orbax's write coroutines at once; asyncio logs every failed task nobody awaited
    ("Task exception was never retrieved", with its traceback) when it is collected, often after the one line.
    Those records are dropped for orbax's coroutines only; another module's still reach the log."""
    import asyncio
    import gc
    import logging

    from nash_lm.train import checkpoint

    checkpoint._quiet_background_errors()
    found = {}
    for where in ("/site-packages/orbax/checkpoint/_src/serialization.py", "/elsewhere/module.py"):
        scope = {}
        exec(compile("async def write():\n    raise OSError(28, 'No space left on device')\n", where, "exec"), scope)
        loop = asyncio.new_event_loop()
        task = loop.create_task(scope["write"]())
        loop.run_until_complete(asyncio.sleep(0))
        assert task.done()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            del task
            gc.collect()
        loop.close()
        found[where] = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert found["/elsewhere/module.py"] and "never retrieved" in found["/elsewhere/module.py"][0]
    assert found["/site-packages/orbax/checkpoint/_src/serialization.py"] == []
