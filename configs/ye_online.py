"""Ye et al. online experiment: main agent (equilibrium of the current fit) + enhancer (most informative
opponent in the plausible set) vs symmetric self-play and uniform sampling; half duality gap of the main agent
against labels, and the final gap at a fixed label budget against the number of batches.

Run: `python -m nash_lm.main --config=configs/ye_online.py --workdir=runs/ye_online` (a few minutes on one
CPU core).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "ye_online"
    c.seed = 0
    c.instances = ("random", "hidden_winner")
    c.n_actions = 5
    c.game_seed = 0
    c.winner_p = 0.85            # hidden_winner: P(action 0 beats any other action)
    c.winner_mu = 0.02           # hidden_winner: mu(action 0)
    c.tau = 0.05
    c.strategies = ("enhancer", "symmetric", "uniform")
    c.batches = 12
    c.batch_size = 50
    c.label_budget = 1600        # budget experiment: this many labels split into budget_batches batches
    c.budget_batches = (1, 2, 4, 8)
    c.num_seeds = 5
    c.beta = 0.5                 # plausible set: tau KL(pi2 || pi1) <= beta * Gamma(pi1, pi2)
    c.ridge = 1e-6
    c.design_lambda = 1.0
    return c
