"""Ye et al. offline experiment: half duality gap of plug-in, version-space and bonus pessimism against the
number of offline labels n, with full, unilateral-only and removed coverage of the equilibrium (CIs over seeds).

Run: `python -m nash_lm.main --config=configs/ye_offline.py --workdir=runs/ye_offline` (about 5 minutes on
one CPU core). Override e.g. `--config.taus='(0.1,)' --config.num_seeds=4`.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "ye_offline"
    c.seed = 0
    c.instance = "random"        # "random" (B5 style) or "hidden_winner"
    c.n_actions = 4
    c.game_seed = 0
    c.taus = (0.1, 0.01)
    c.n_values = (100, 300, 1000, 3000, 10000, 30000)
    c.num_seeds = 5
    c.methods = ("plugin", "version_space", "bonus")
    c.coverages = ("full", "unilateral", "no_coverage")
    c.uncovered_top = 2          # no_coverage: pairs among the top-k actions of pi* are never compared
    c.delta = 0.1                # confidence level of the version space / bonus radius (chi-square calibration)
    c.ridge = 1e-6               # logistic MLE ridge (bonus method)
    c.design_lambda = 1.0        # Sigma = lambda I + sum phi phi^T (bonus method)
    c.solver_tol = 1e-9          # relative value tolerance of the pessimistic solver (gaps here are >= 1e-6)
    return c
