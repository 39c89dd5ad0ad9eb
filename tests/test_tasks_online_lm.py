"""The docstrings_online job at tiny sizes through the CLI: report files, equal label budgets, the enhancer's
best-of-k choice checked against the preference model's probabilities recomputed from its export, and the
deterministic regeneration of a deleted round's pairs on resume."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

OVERRIDES = [
    "--config.task.corpus.max_examples=400", "--config.task.tokenizer_vocab_size=300",
    "--config.task.eval_pairs_per_prompt=2", "--config.task.tournament.samples_per_prompt=1",
    "--config.train.data.vocab_size=300", "--config.train.model.vocab_size=300",
    "--config.train.judge_model.vocab_size=300",
    "--config.train.model.d_model=32", "--config.train.judge_model.d_model=32",
    "--config.train.model.d_ff=64", "--config.train.judge_model.d_ff=64",
    "--config.train.model.n_layers=1", "--config.train.judge_model.n_layers=1",
    "--config.train.stages.sft.steps=30", "--config.train.stages.sft.batch_size=16", "--config.train.stages.sft.eval_batches=1",
    "--config.train.stages.pm0.steps=4", "--config.train.stages.pm0.warmup_steps=1", "--config.train.stages.pm0.batch_size=16",
    "--config.train.stages.pm0.eval_batches=1",
    "--config.online.rounds=2", "--config.online.pairs0_per_prompt=1", "--config.online.pairs_per_round=24",
    "--config.online.best_of_k=3",
    "--config.online.policy.steps=2", "--config.online.policy.batch_size=8", "--config.online.policy.eval_batches=1",
    "--config.online.judge.steps=3", "--config.online.judge.batch_size=16", "--config.online.judge.warmup_steps=1",
    "--config.online.judge.eval_batches=1",
]


def _run(workdir, *extra):
    return subprocess.run([sys.executable, "-m", "nash_lm.main", "--config=configs/docstrings_online.py",
                           f"--workdir={workdir}"] + OVERRIDES + list(extra), capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})


def _judge(workdir, name):
    import ml_collections

    from nash_lm import parallel
    from nash_lm.train import config as cfg_lib, inputs

    cfg = ml_collections.ConfigDict(json.load(open(workdir / "config.json"))).train
    mesh = parallel.make_mesh(cfg.mesh)
    rules = parallel.validate_rules(cfg_lib.parse_rules(cfg.rules), mesh)
    gd, abstract, _ = inputs.abstract_params(cfg_lib.model_config(cfg, "judge_model"), "preference", 0, mesh, rules)
    return gd, inputs.load_export(str(workdir), name, abstract)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("online")
    out = _run(workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_report_files_and_equal_label_budgets(job):
    report = json.load(open(job / "online_lm.json"))
    summary = json.load(open(job / "summary.json"))
    assert summary["status"] == "complete"
    n0 = report["round0"]["labels"]
    assert n0 > 0
    assert report["labels"] == {"enhancer": n0 + 2 * 24, "symmetric": n0 + 2 * 24} == summary["labels"]
    assert [(r["arm"], r["round"]) for r in report["rounds"]] == [
        ("enhancer", 1), ("symmetric", 1), ("enhancer", 2), ("symmetric", 2)]
    for row in report["rounds"]:
        assert row["labels_total"] == n0 + 24 * row["round"]
        assert row["win_ci"][0] <= row["win_vs_sft"] <= row["win_ci"][1]
        assert 0.0 <= row["pm_accuracy"] <= 1.0
    assert report["rounds"][0]["main"] == report["rounds"][1]["main"] == "main1"  # round 1 is shared
    assert len(report["head_to_head"]) == 1
    for name in ("online_lm.md", "online_lm.png"):
        assert (job / name).stat().st_size > 0
    for name in ("main1", "enh_pm1", "sym_pm1", "enh_main2", "sym_main2", "enh_pm2", "sym_pm2"):
        assert (job / "stages" / name / "done.json").exists()
    assert not (job / "stages" / "enh_main1").exists()
    # each arm's new pairs were labelled: soft labels are the rater's P in {noise, 1/2, 1 - noise}
    for arm in ("enh", "sym"):
        with np.load(job / "online" / f"pairs_{arm}1.npz") as f:
            assert len(f["label"]) == 24
            lab = f["label"].astype(np.float64)
            assert np.all(np.isclose(lab[:, None], [0.1, 0.5, 0.9], atol=1e-6).any(1))


def test_enhancer_picks_best_of_k_under_the_previous_preference_model(job):
    from nash_lm import models

    for r, judge_name in ((1, "pm0"), (2, "enh_pm1")):
        gd, params = _judge(job, judge_name)
        with np.load(job / "online" / f"pairs_enh{r}.npz") as f:
            data = {k: f[k] for k in f.files}
        cands, cmask = data["enhancer_candidates"], data["enhancer_candidates_mask"]
        m, k = cands.shape[:2]
        assert (m, k) == (24, 3)
        rows = np.arange(6)
        # P_pm(c_j > y | x) of each candidate, straight from the model (no batching, padding or cache)
        probs = np.zeros((len(rows), k))
        for j in range(k):
            probs[:, j] = np.asarray(models.preference_prob(
                gd, params, data["prompt"][rows], data["prompt_mask"][rows], cands[rows, j], cmask[rows, j],
                data["y"][rows], data["y_mask"][rows]))
        np.testing.assert_allclose(data["enhancer_scores"][rows], probs, atol=2e-4)
        best = probs.argmax(1)
        second = np.sort(probs, 1)[:, -2]
        clear = probs.max(1) - second > 1e-3  # ties within float noise may pick either
        assert clear.any()
        np.testing.assert_array_equal(data["y2"][rows][clear], cands[rows, best][clear])
        np.testing.assert_array_equal(data["y2_mask"][rows][clear], cmask[rows, best][clear])


def test_resume_regenerates_a_rounds_pairs_identically(job, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(job, work)
    before = dict(np.load(work / "online" / "pairs_enh2.npz"))
    done_before = json.load(open(work / "stages" / "enh_pm2" / "done.json"))
    os.remove(work / "online" / "pairs_enh2.npz")
    shutil.rmtree(work / "stages" / "enh_pm2")
    out = _run(work)
    assert out.returncode == 0, out.stderr[-3000:]
    after = dict(np.load(work / "online" / "pairs_enh2.npz"))
    assert set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    done_after = json.load(open(work / "stages" / "enh_pm2" / "done.json"))
    assert done_after["fingerprint"] == done_before["fingerprint"]
    assert done_after["policy_params_sha256"] == done_before["policy_params_sha256"]


def test_bad_online_value_exits_2_before_writing(tmp_path):
    out = _run(tmp_path / "w", "--config.online.best_of_k=0")
    assert out.returncode == 2
    assert "config.online.best_of_k" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()
