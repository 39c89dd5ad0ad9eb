"""Multi-host: two local CPU processes (gloo over loopback, via launch/local.py, every process under `timeout`)
run the real training job (`python -m nash_lm.main --config=configs/tiny.py`, the one entry point, which
initialises jax.distributed from the launcher's environment; the job is `nash_lm.train.pipeline.run`: a few SFT
steps, then one policy stage judged by the host oracle) on one global mesh (fsdp=2: the batch and the
parameters' embed axis split across the two processes), and must give the same `policy_params_sha256` in
summary.json as one process (the same command without the launcher) holding the same global mesh on 2 devices.
Process 0 alone writes the JSON files, metrics and TensorBoard events; a second two-process run on the same
workdir skips the finished stages.

Why two devices: a cross-device sum of two terms is one commutative addition, so the two runs are bitwise
equal; with four devices gloo's reduction order (within a host, then across) differs from XLA's in-process
order and the losses agree only to ~1e-7 (measured), so the hashes would differ.

The worker half of this file (`python tests/test_distributed.py worker OUT`) checks the building blocks
(per-host global batches, fetch, orbax save/restore of the sharded train state) on each process.
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# the tiny pipeline cut to a few steps: sft, then one policy stage (host oracle: no judge stage to train)
JOB_OVERRIDES = ["--config.pipeline=sft,nash_md_oracle", "--config.mesh.data=1", "--config.mesh.fsdp=2",
                 "--config.mesh.tensor=1", f"--config.stages.sft.steps={STEPS}", "--config.stages.sft.log_every=1",
                 "--config.stages.nash_md_oracle.steps=2", "--config.peak_tflops=1.0"]


def _source_hash() -> str:
    """Hash of the package sources this process imported (the tree is shared with concurrent editors)."""
    import hashlib

    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, "nash_lm"))):
        for f in sorted(files):
            if f.endswith(".py"):
                h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def _worker(out: str) -> None:
    """One process of the run: global batches from process-local rows, compiled steps, orbax save/restore."""
    from nash_lm import distributed

    multi = distributed.initialize()
    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    from configs import tiny
    from nash_lm import parallel
    from nash_lm.data import synthetic
    from nash_lm.train import checkpoint as ckpt_lib
    from nash_lm.train import spec as spec_lib
    from nash_lm.train import stage as stage_lib

    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 1
    config.pipeline = "sft"
    config.stages.sft.steps = STEPS
    workdir = os.path.join(out, "wd")
    run = spec_lib.resolve(config, workdir)
    mesh, rules = run.mesh, run.rules
    assert mesh.size == 2 and jax.process_count() == (2 if multi else 1)
    result = {"process_count": jax.process_count(), "losses": [], "source_sha256": _source_hash()}
    with parallel.activate(mesh, rules):
        sft = run.stages["sft"]
        data = {("sft", split): synthetic.dataset_for("sft", run.data, split) for split in ("train", "eval")}
        stage = stage_lib.Stage(sft, run, data, writer=None).build()
        mut = stage.program.init_state(stage.inputs.init_policy())
        train_step = stage.program.compile()
        stage.batch_sh, stage.abstract_mut, stage.st, stage.seed = (stage.program.batch_sh, stage.program.abstract_mut,
                                                                    sft.st, sft.seed)
        it = synthetic.BatchIterator(stage.train_data.arrays(), stage.st.batch_size, stage.seed, "train")
        for _ in range(STEPS):
            full = next(it)
            batch = distributed.global_batch_from_full(full, stage.batch_sh)
            # the same global batch assembled from this host's rows only
            local = {k: np.asarray(v)[distributed.host_rows(stage.batch_sh[k], v.shape)] for k, v in full.items()}
            again = distributed.global_batch(local, stage.batch_sh, stage.st.batch_size)
            for k in full:
                np.testing.assert_array_equal(distributed.fetch(again[k]), full[k])
            mut, metrics = train_step(mut, batch)
            result["losses"].append(float(distributed.fetch(metrics["loss"])))
        result["policy_params_sha256"] = ckpt_lib.params_sha256(distributed.fetch(mut.policy))
        result["embed_sharding"] = str(jax.tree.leaves(mut.policy["embed"])[0].sharding.spec)

        # orbax save and restore across processes, into the abstract sharded state
        ckpt = ckpt_lib.Checkpointer(os.path.join(out, "ckpt"), keep=1, async_save=True)
        ckpt.save(STEPS, mut, it.get_state(), {"stage": "sft"})
        ckpt.close()
        ckpt = ckpt_lib.Checkpointer(os.path.join(out, "ckpt"), keep=1, async_save=True)
        restored, data_state, _ = ckpt.restore(ckpt.latest_step(), stage.abstract_mut)
        ckpt.close()
        result["restored_sha256"] = ckpt_lib.params_sha256(distributed.fetch(restored.policy))
        result["restored_step"] = int(distributed.fetch(restored.step))
        result["data_state"] = data_state
    result["shard_info"] = list(distributed.shard_info(stage.batch_sh["tokens"] if "tokens" in stage.batch_sh
                                                       else next(iter(stage.batch_sh.values())),
                                                       stage.st.batch_size))
    # the job's cache through the one writer: a miss then a hit, the same branch on every process
    from nash_lm.tasks import online_lm

    made, cache = [], os.path.join(out, "cache.npz")
    online_lm._cached(cache, "k", lambda: made.append("first") or {"x": np.arange(3)})
    again = online_lm._cached(cache, "k", lambda: made.append("second") or {"x": np.zeros(3)})
    result["cache"] = {"made": made, "x": again["x"].tolist()}
    # every process reports its own view (a file of this test's own); process 0 alone writes the shared result
    with open(os.path.join(out, f"view_{jax.process_index()}.json"), "w") as f:
        json.dump(result, f)
    distributed.write_json(os.path.join(out, "result.json"), result)
    distributed.write_json(os.path.join(out, f"written_by_{jax.process_index()}.json"), {}, sync=False)


ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
SINGLE_ENV = {**{k: v for k, v in ENV.items() if not k.startswith("NASH_LM_")}, "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _run_single(out):
    r = subprocess.run(["timeout", "300", sys.executable, __file__, "worker", out], env=SINGLE_ENV, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(os.path.join(out, "result.json")))


def _launch_two(out, command, logdir):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--devices_per_process=1",
           "--timeout=420", f"--logdir={logdir}", "--", *command]
    r = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=480)
    logs = ""
    for i in range(2):
        p = os.path.join(logdir, f"process_{i}.log")
        logs += f"\n--- process {i}\n" + (open(p).read()[-2500:] if os.path.exists(p) else "")
    assert r.returncode == 0, r.stderr[-2000:] + logs
    return r


def _run_two(out):
    _launch_two(out, [sys.executable, __file__, "worker", out], f"{out}/logs")
    return json.load(open(os.path.join(out, "result.json")))


def _job(workdir):
    """The job's command line (`nash_lm.main`, which starts jax.distributed itself from the launcher's
    environment, as in the launch scripts)."""
    return ["-m", "nash_lm.main", "--config=configs/tiny.py", f"--workdir={workdir}", *JOB_OVERRIDES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = _run_single(str(tmp_path_factory.mktemp("one")))
    two_dir = str(tmp_path_factory.mktemp("two"))
    return one, _run_two(two_dir), two_dir


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The training job on one process (2 devices) and on two processes (1 device each), same global mesh."""
    one = str(tmp_path_factory.mktemp("job_one"))
    source = _source_hash()
    r = subprocess.run(["timeout", "420", sys.executable, *_job(f"{one}/wd")], env=SINGLE_ENV, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    two = str(tmp_path_factory.mktemp("job_two"))
    _launch_two(two, [sys.executable, *_job(f"{two}/wd")], f"{two}/logs")
    assert _source_hash() == source, "nash_lm/ sources changed during the runs"
    return f"{one}/wd", f"{two}/wd", f"{two}/logs"


def test_two_processes_match_one_process_on_the_same_global_mesh(runs):
    one, two, two_dir = runs
    assert one["process_count"] == 1 and two["process_count"] == 2
    assert two["source_sha256"] == one["source_sha256"], "nash_lm/ sources changed between the two runs"
    assert "fsdp" in two["embed_sharding"]  # parameters really are sharded across the two processes
    assert two["policy_params_sha256"] == one["policy_params_sha256"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-6)
    assert len(set(one["losses"])) == STEPS  # the steps did change the parameters
    assert two["restored_sha256"] == two["policy_params_sha256"] == one["restored_sha256"]
    assert two["restored_step"] == STEPS and two["data_state"] == one["data_state"]
    assert one["shard_info"] == [0, 1] and two["shard_info"] == [0, 2]
    # process 0 alone wrote through the writer (process 1's call wrote nothing), and left no temporary file
    assert os.path.exists(os.path.join(two_dir, "written_by_0.json"))
    assert not os.path.exists(os.path.join(two_dir, "written_by_1.json"))
    assert not [f for f in os.listdir(two_dir) if ".tmp" in f]
    views = [_read(os.path.join(two_dir, f"view_{i}.json")) for i in range(2)]
    assert [v["cache"] for v in views] == [{"made": ["first"], "x": [0, 1, 2]}] * 2 == [one["cache"]] * 2


def _read(path):
    with open(path) as f:
        return json.load(f)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_job_on_two_processes_matches_one_process(jobs):
    one, two, logs = jobs
    s1, s2 = _read(f"{one}/summary.json"), _read(f"{two}/summary.json")
    print("policy_params_sha256: one process", s1["policy_params_sha256"], "two processes", s2["policy_params_sha256"])
    assert s1["status"] == s2["status"] == "complete" and s2["pipeline"] == ["sft", "nash_md_oracle"]
    assert s2["policy_params_sha256"] == s1["policy_params_sha256"]
    for name in ("sft", "nash_md_oracle"):
        assert s2["stages"][name]["policy_params_sha256"] == s1["stages"][name]["policy_params_sha256"], name
        assert s2["stages"][name]["steps"] == s1["stages"][name]["steps"]
    assert s2["stages"]["sft"]["policy_params_sha256"] != s2["policy_params_sha256"]  # the policy stage trained
    # both processes ran the job and exited 0 (the launcher checked); with one device each, the fsdp=2 mesh exists
    # only once jax.distributed has joined them
    assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
    # the evaluation (sampling + host oracle on fetched arrays) agrees too
    assert s2["final_eval"] == pytest.approx(s1["final_eval"], abs=1e-6)
    # metrics.jsonl: written once (by process 0), the same steps and losses as one process
    m1, m2 = _metrics(one), _metrics(two)
    assert [(r["stage"], r["step"]) for r in m2] == [(r["stage"], r["step"]) for r in m1]
    assert [r.get("loss") for r in m2] == pytest.approx([r.get("loss") for r in m1], abs=1e-6)
    assert len(os.listdir(f"{two}/tensorboard")) == 1
    for name in ("sft", "nash_md_oracle"):
        assert sorted(os.listdir(f"{two}/stages/{name}")) == ["checkpoints", "done.json", "export", "fingerprint.json"]
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(two) for f in fs if ".tmp" in f or "partial" in f]
    assert not leftovers


def test_training_job_on_two_processes_skips_finished_stages(jobs, tmp_path):
    _, two, _ = jobs
    before = _read(f"{two}/summary.json")
    lines = len(_metrics(two))
    done = {n: os.stat(f"{two}/stages/{n}/done.json").st_mtime_ns for n in ("sft", "nash_md_oracle")}
    _launch_two(str(tmp_path), [sys.executable, *_job(two)], f"{tmp_path}/logs")
    after = _read(f"{two}/summary.json")
    assert after["policy_params_sha256"] == before["policy_params_sha256"]
    assert after["stages"] == before["stages"] and after["wall_time_s"] != before["wall_time_s"]  # rewritten
    assert len(_metrics(two)) == lines
    assert {n: os.stat(f"{two}/stages/{n}/done.json").st_mtime_ns for n in done} == done
    with open(f"{tmp_path}/logs/process_0.log") as f:
        log = f.read()
    assert "sft:" not in log and "nash_md_oracle:" not in log, log[-2000:]  # no progress bar: nothing trained


def test_initialize_settings_from_config_and_environment():
    from nash_lm import distributed

    assert distributed._settings_from(None, {}) is None
    env = {"NASH_LM_COORDINATOR": "10.0.0.2:1234", "NASH_LM_NUM_PROCESSES": "4", "NASH_LM_PROCESS_ID": "3"}
    assert distributed._settings_from(None, env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                                     "process_id": 3}
    assert distributed._settings_from(None, {"NASH_LM_DISTRIBUTED": "auto"}) == {}
    cfg = {"distributed": {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0,
                           "local_device_ids": "0,1"}}
    assert distributed._settings_from(cfg, {})["local_device_ids"] == [0, 1]
    bad = [
        (None, {**env, "NASH_LM_PROCESS_ID": "4"}, "process_id=4 must lie in [0, num_processes=4)"),
        (None, {"NASH_LM_COORDINATOR": "h:1", "NASH_LM_NUM_PROCESSES": "2"}, "NASH_LM_PROCESS_ID is not"),
        (None, {**env, "NASH_LM_NUM_PROCESSES": "two"}, "NASH_LM_NUM_PROCESSES='two': must be an integer"),
        ({"distributed": {"coordinator_address": "nohost"}}, {}, "coordinator_address='nohost' must be host:port"),
    ]
    for config, environ, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
            distributed._settings_from(config, environ)


def test_local_launcher_reports_a_failing_process(tmp_path):
    """A process that fails makes the launcher exit non-zero and kill its peer (which would otherwise wait)."""
    script = ("import os, sys, time; i = int(os.environ['NASH_LM_PROCESS_ID']); "
              "time.sleep(300 if i == 0 else 0); sys.exit(3)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
                        "--timeout=60", f"--logdir={tmp_path}", "--", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "process 1 exited with 3" in r.stderr
    assert time.monotonic() - t0 < 30  # process 0 (sleeping 300 s) was killed, not waited for


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])


def test_two_processes_agree_on_the_checkpoint_restored_past_a_corrupt_one(jobs, tmp_path):
    """The two-process workdir with the SFT stage as if killed after its final checkpoint (3), and a newer
    checkpoint 5 that cannot be read (a copy of 3 with its data files cut): both processes give 5 up together,
    process 0 moves it aside and says so in one line, both restore 3, and the job ends with the same hashes."""
    import shutil

    _, two, _ = jobs
    workdir = str(tmp_path / "wd")
    shutil.copytree(two, workdir)
    sft = os.path.join(workdir, "stages", "sft")
    os.remove(os.path.join(sft, "done.json"))
    shutil.rmtree(os.path.join(sft, "export"))
    shutil.copytree(os.path.join(sft, "checkpoints", "3"), os.path.join(sft, "checkpoints", "5"))
    for d in ("ocdbt.process_0/d", "ocdbt.process_1/d", "d"):
        d = os.path.join(sft, "checkpoints", "5", "state", d)
        for name in os.listdir(d) if os.path.isdir(d) else []:
            os.truncate(os.path.join(d, name), os.path.getsize(os.path.join(d, name)) // 2)
    _launch_two(str(tmp_path), [sys.executable, *_job(workdir)], f"{tmp_path}/logs")
    logs = [open(f"{tmp_path}/logs/process_{i}.log").read() for i in range(2)]
    lines = [x for x in logs[0].splitlines() if "cannot be restored" in x]
    assert len(lines) == 1 and "checkpoint 5" in lines[0] and "restored checkpoint 3 instead" in lines[0], logs[0]
    assert "cannot be restored" not in logs[1]  # process 0 alone moves it aside and says so
    assert sorted(d for d in os.listdir(os.path.join(sft, "checkpoints"))) == ["3", "5.unreadable"]
    got, want = _read(f"{workdir}/summary.json")["stages"], _read(f"{two}/summary.json")["stages"]
    for name in ("sft", "nash_md_oracle"):
        assert got[name]["policy_params_sha256"] == want[name]["policy_params_sha256"], name
        assert got[name]["eval"] == want[name]["eval"], name
