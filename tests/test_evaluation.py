"""Tournament: intervals against scipy's binomtest and hand-computed values; win rates of constructed policies
with a known answer; the column-vs-row layout; the files written."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from nash_lm.evaluation import tournament as T


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 100), (1234, 2000)])
def test_intervals_match_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    np.testing.assert_allclose(T.clopper_pearson(k, n), (ci.low, ci.high), atol=1e-10)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(T.wilson(k, n), (ci.low, ci.high), atol=1e-10)


def test_intervals_hand_computed():
    # k = 0: the exact upper bound solves (1 - p)^n = alpha / 2
    assert T.clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)
    assert T.clopper_pearson(20, 20)[0] == pytest.approx(0.025 ** (1 / 20), abs=1e-12)
    # Wilson for k = 5, n = 10 is symmetric around 1/2 with half-width z sqrt(1/4n + z^2/4n^2) / (1 + z^2/n)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    np.testing.assert_allclose(T.wilson(5, 10), (0.5 - half, 0.5 + half), atol=1e-12)
    with pytest.raises(ValueError, match="unknown"):
        T.interval(1, 2, "normal")


def _policy(text):
    return lambda prompts, seed: [text] * len(prompts)


def _longer_wins(prompts, ys, y2s):
    return np.array([1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(ys, y2s)])


def test_deterministic_judge_and_layout(tmp_path):
    policies = {"short": _policy("a"), "medium": _policy("aa"), "long": _policy("aaa")}
    prompts = [f"p{i}" for i in range(40)]
    res = T.run(policies, prompts, _longer_wins, samples_per_prompt=2, seed=0)
    # column beats row: long (col) beats short (row) always
    assert res.cell("short", "long") == (1.0, pytest.approx(0.025 ** (1 / 80)), 1.0)
    assert res.cell("long", "short")[0] == 0.0 and res.cell("medium", "short")[0] == 0.0
    assert res.cell("short", "medium")[0] == 1.0
    np.testing.assert_array_equal(res.n + np.eye(3, dtype=int) * 80, 80)
    np.testing.assert_array_equal(res.wins + res.wins.T, res.n)
    paths = T.save(res, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    data = json.load(open(paths["json"]))
    assert data["names"] == ["short", "medium", "long"] and data["win"][0][2] == 1.0 and data["n"][0][1] == 80
    md = open(paths["markdown"]).read().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header == ["row \\ column", "short", "medium", "long"]
    row_short = [c.strip() for c in md[4].strip("|").split("|")]
    assert row_short[0] == "**short**" and row_short[1] == "—" and row_short[3].startswith("1.000 [")
    with open(paths["heatmap"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "**long**: aaa" in open(paths["samples"]).read()


def test_stochastic_judge_win_rate_and_position_order():
    # a judge with P(first > second) = 0.7 whatever they are: pure position bias -> the random order cancels it
    biased = lambda prompts, ys, y2s: np.full(len(ys), 0.7)
    res = T.run({"a": _policy("x"), "b": _policy("y")}, [f"p{i}" for i in range(3000)], biased, seed=1)
    w, lo, hi = res.cell("a", "b")
    assert lo < 0.5 < hi and abs(w - 0.5) < 0.03
    # a judge for which b beats a with probability 0.65
    def judge(prompts, ys, y2s):
        return np.array([0.65 if (a, b) == ("y", "x") else 0.35 for a, b in zip(ys, y2s)])
    res = T.run({"a": _policy("x"), "b": _policy("y")}, [f"p{i}" for i in range(3000)], judge, seed=2,
                method="wilson")
    k, n = int(res.wins[0, 1]), int(res.n[0, 1])
    assert stats.binomtest(k, n, 0.65).pvalue > 1e-3
    ci = stats.binomtest(k, n).proportion_ci(method="wilson")
    np.testing.assert_allclose(res.cell("a", "b")[1:], (ci.low, ci.high), atol=1e-10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="two policies"):
        T.run({"a": _policy("x")}, ["p"], _longer_wins)
    with pytest.raises(ValueError, match="returned 2 completions"):
        T.run({"a": _policy("x"), "b": lambda p, s: ["y", "y"]}, ["p"], _longer_wins)
    with pytest.raises(ValueError, match="probabilities"):
        T.run({"a": _policy("x"), "b": _policy("y")}, ["p"], lambda p, a, b: np.array([1.5]))
