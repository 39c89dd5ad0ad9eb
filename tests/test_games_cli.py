"""The `games` job end to end through the CLI: files written, numbers equal to a direct call, bad input -> exit 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nash_lm import games
from nash_lm.games import instances as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "nash_lm.main", f"--config={ROOT}/configs/games.py", f"--workdir={tmp_path}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_games_report_end_to_end(tmp_path):
    out = _cli(tmp_path, "--config.steps=40", "--config.log_every=20", "--config.instances.random100.n=12")
    assert out.returncode == 0, out.stderr
    for name in ("metrics.jsonl", "summary.json", "report.md", "gap_rps.png", "gap_dice.png", "gap_random100.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(summary["runs"]) == 3 * 12 and len(lines) == 2 * 3 * 12
    run = next(r for r in summary["runs"] if r["instance"] == "rps" and r["algorithm"] == "extragradient")
    g = I.rock_paper_scissors()
    direct = games.run("extragradient", g.P, g.mu, 0.01, 40, eta=1.0)
    assert run["gap_last"] == pytest.approx(games.duality_gap(g.P, g.mu, 0.01, direct.policy), rel=1e-9)


@pytest.mark.parametrize("override,message", [
    ("--config.tau=-1", "config.tau: must be >= 0"),
    ("--config.steps=0", "config.steps: must be a positive integer"),
    ("--config.algorithms.omd.eta=-2", "config.algorithms.omd.eta: must be > 0"),
    ("--config.instances.rps.name=rpss", "config.instances.rps.name: unknown instance 'rpss'"),
    ("--config.nonexistent=1", "nonexistent"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, override, message):
    (tmp_path / "summary.json").write_text("keep me")
    out = _cli(tmp_path, override)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert (tmp_path / "summary.json").read_text() == "keep me"  # nothing already written is touched
