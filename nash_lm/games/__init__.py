"""Exact tabular preference games: the ground truth every other part of nash-lm is measured against.

    from nash_lm import games
    pi_star = games.nash_equilibrium(P, mu, tau)
    gap = games.duality_gap(P, mu, tau, pi)
    result = games.run("nash_md", P, mu, tau, steps=1000)

Modules: `core` (validation, equilibrium, duality gap), `algorithms` (every tabular algorithm as a pure step
function behind `run`), `instances` (the instance library), `report` (the `games` job of the CLI).
"""
from nash_lm.games import instances
from nash_lm.games.algorithms import ALGORITHMS, RunResult, run
from nash_lm.games.core import best_response, check_game, duality_gap, kl_divergence, nash_equilibrium, payoff
from nash_lm.games.instances import Game
