"""The docstring study's pooling (`nash_lm.tasks.study`), checked against sums and scipy's beta quantiles on
hand-made per-seed summaries, and its per-seed configs."""
import importlib.util
import os

import numpy as np
import pytest
from scipy import stats

from nash_lm.tasks import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    spec = importlib.util.spec_from_file_location("study_cfg", os.path.join(ROOT, "configs", "docstrings_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _summary(names, wins, n, cycles, pm_acc):
    return {"status": "complete", "wall_time_s": 1.0,
            "tournament": {"names": names, "wins": wins, "n": n, "ci_method": "clopper_pearson", "n_prompts": 3,
                           "samples_per_prompt": 2},
            "mu_cycles": cycles, "stages": {"pm": {"accuracy": pm_acc}, "rm": {"accuracy": pm_acc - 0.1}}}


def test_seed_configs_change_only_the_seeds():
    c = _config()
    a, b = study.seed_config(c, 0), study.seed_config(c, 2)
    assert (a.job, a.task.seed, a.train.seed, b.task.seed, b.train.seed) == ("docstrings", 0, 0, 2, 2)
    assert "study" not in a and a.train.pipeline == c.train.pipeline
    assert b.train.stages.x_md1.algorithm == "exploiter" and b.train.stages.x_md1.init == "md1"


def test_pooled_cells_beta_curve_exploiters_and_cycles():
    c = _config()
    names = ["sft", "md2", "sp", "x_sp", "rlhf"]  # md2 (beta 0.25) listed before sp (beta 0)
    rng = np.random.default_rng(0)
    seeds = {}
    for s in (0, 1, 2):
        n = np.full((5, 5), 6) - 6 * np.eye(5, dtype=int)
        w = np.zeros((5, 5), int)
        for r in range(5):
            for k in range(r + 1, 5):
                w[r, k] = rng.integers(0, 7)
                w[k, r] = 6 - w[r, k]
        # seed 2 lists the policies in another order: pooling must go by name
        order = [4, 3, 2, 1, 0] if s == 2 else list(range(5))
        seeds[s] = _summary([names[i] for i in order], w[np.ix_(order, order)].tolist(),
                            n[np.ix_(order, order)].tolist(), {"cyclic": s, "triples": 10, "rate": s / 10},
                            0.6 + 0.01 * s)
    out = study.pool(c, seeds)
    assert out["names"] == names
    for r in names:
        for col in names:
            if r == col:
                continue
            # the sum over the seeds, each read by name from its own order
            wins = sum(seeds[s]["tournament"]["wins"][seeds[s]["tournament"]["names"].index(r)]
                       [seeds[s]["tournament"]["names"].index(col)] for s in seeds)
            cell = out["matrix"][r][col]
            assert (cell["wins"], cell["n"]) == (wins, 18)
            lo = stats.beta.ppf(0.025, wins, 18 - wins + 1) if wins else 0.0
            hi = stats.beta.ppf(0.975, wins + 1, 18 - wins) if wins < 18 else 1.0
            np.testing.assert_allclose(cell["ci"], [lo, hi], rtol=1e-9, atol=1e-12)
            assert cell["win"] + out["matrix"][col][r]["win"] == pytest.approx(1.0)
    assert [(p["beta"], p["stage"]) for p in out["beta_curve"]] == [(0.0, "sp"), (0.25, "md2")]
    assert [(p["exploiter"], p["target"]) for p in out["exploiters"]] == [("x_sp", "sp")]
    assert out["exploiters"][0]["win"] == out["matrix"]["sp"]["x_sp"]["win"]
    assert out["mu_cycles"]["cyclic"] == 3 and out["mu_cycles"]["triples"] == 30
    assert out["judges"]["pm"]["accuracy_per_seed"] == pytest.approx([0.6, 0.61, 0.62])
    assert out["judges"]["rm"]["kind"] == "reward"
    text = study.markdown(out)
    assert "| 0.25 | md2 |" in text and "| sp | x_sp |" in text and "3 of 30" in text
