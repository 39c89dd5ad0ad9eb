"""Time `games.nash_equilibrium` on random non-transitive games (n up to 1000, tau in {1, 0.1, 0.01}).

    python bench/equilibrium.py [--smoke] [--out bench/results/equilibrium.jsonl]

One JSON line per (n, X, tau): median wall seconds of 5 solves after a warm-up solve (which compiles), the Newton
iteration count, the fixed-point residual and the duality gap of the solution.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_time, write  # noqa: E402

from nash_lm import games  # noqa: E402
from nash_lm.games import core  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--out", default="bench/results/equilibrium.jsonl")
    args = ap.parse_args()
    cases = [(50, 1)] if args.smoke else [(100, 1), (300, 1), (1000, 1), (200, 16)]
    info = machine()
    for n, X in cases:
        g = games.instances.random_game(n, X, seed=0)
        for tau in (1.0, 0.1, 0.01):
            checked = core.check_game(g.P, g.mu, tau)
            pi = games.nash_equilibrium(g.P, g.mu, tau)  # warm-up: compiles for this shape
            med, times = median_time(lambda: games.nash_equilibrium(g.P, g.mu, tau), repeats=5)
            with jax.enable_x64(True):
                _, res, iters = core._regularized_equilibrium(jnp.asarray(checked.A), jnp.log(jnp.asarray(checked.mu)),
                                                              tau)
            write(args.out, {"bench": "nash_equilibrium", "n": n, "contexts": X, "tau": tau,
                             "median_s": round(med, 4), "times_s": [round(t, 4) for t in times],
                             "newton_iters_max": int(np.max(iters)), "residual": float(np.max(res)),
                             "duality_gap": games.duality_gap(g.P, g.mu, tau, pi), "machine": info})


if __name__ == "__main__":
    main()
