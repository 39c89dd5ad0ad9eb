"""Task jobs end to end at tiny sizes: the token-game oracle on token arrays against the game's P read directly,
and the token_game job through the CLI (stages of the training loop, exact evaluation report)."""
import json
import os
import subprocess
import sys

import numpy as np

from nash_lm.tasks import pipeline, token_game as tg


def test_token_game_oracle_on_token_arrays():
    game = tg.lift("rps", 3, 2, contexts=2, seed=0)
    fn = pipeline.token_game_oracle(game)
    prompt = np.array([[1, 3], [1, 4], [1, 3], [1, 4]])
    y = np.array([[3, 4], [5, 5], [3, 2], [4, 4]])        # row 2 holds EOS: not a game sequence
    y2 = np.array([[4, 4], [3, 3], [4, 3], [2, 0]])       # row 3 is EOS + PAD
    ym = np.ones((4, 2))
    y2m = np.array([[1, 1], [1, 1], [1, 1], [1, 0]])
    got = fn(prompt, np.ones((4, 2)), y, ym, y2, y2m)
    seq = lambda t: (t[0] - 3) * 3 + (t[1] - 3)
    assert got[0] == np.float32(game.P[0, seq([3, 4]), seq([4, 4])])
    assert got[1] == np.float32(game.P[1, seq([5, 5]), seq([3, 3])])
    assert got[2] == 0.0 and got[3] == 1.0


def test_token_game_job_cli(tmp_path):
    overrides = [
        "--config.task.V=3", "--config.task.L=2", "--config.task.n_examples=256", "--config.task.mixture_betas=(0.5,)",
        "--config.train.data.vocab_size=6", "--config.train.data.response_len=2",
        "--config.train.model.vocab_size=6", "--config.train.judge_model.vocab_size=6",
        "--config.train.pipeline=sft,nash_md",
        "--config.train.stages.sft.steps=20", "--config.train.stages.nash_md.steps=4",
        "--config.train.stages.nash_md.batch_size=16", "--config.train.stages.nash_md.max_new_tokens=2",
        "--config.train.stages.sft.eval_batches=1",
    ]
    out = subprocess.run([sys.executable, "-m", "nash_lm.main", "--config=configs/token_game.py",
                          f"--workdir={tmp_path}"] + overrides, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # one CPU device
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.load(open(tmp_path / "token_game.json"))
    assert set(report["policies"]) == {"sft", "nash_md"}
    for entry in report["policies"].values():
        assert entry["duality_gap"] > 0 and entry["kl_pi_star_vs_pi"] >= 0
    assert report["policies"]["sft"]["gap_reduction_vs_mu"] == 1.0
    fp = report["mixture_fixed_points"]["0.5"]
    assert fp["token"]["residual"] < 1e-10 and fp["sequence"]["residual"] < 1e-10
    assert "| nash_md |" in open(tmp_path / "token_game.md").read()
