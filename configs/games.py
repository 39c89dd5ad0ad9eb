"""The game report (the default of `make run` until the language-model pipeline lands).

Every tabular algorithm of nash_lm.games on rock-paper-scissors (0/1, mu = (0.7, 0.2, 0.1)), the non-transitive
dice (skewed mu) and a random n = 100 game, tau = 0.01, 1000 steps. Override any field, e.g.
`--config.tau=0.1 --config.steps=5000 --config.algorithms.omd.eta=0.02`.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "games"
    c.tau = 0.01
    c.steps = 1000
    c.log_every = 10

    c.instances = ml_collections.ConfigDict()
    c.instances.rps = dict(name="rps", soft=1.0, mu=(0.7, 0.2, 0.1))
    c.instances.dice = dict(name="dice", mu=(0.6, 0.3, 0.1))
    c.instances.random100 = dict(name="random", n=100, seed=0)

    # Step sizes follow nlhf_math.md's checks at tau = 0.01: OMD needs eta*tau <= 5e-4, extragradient and the
    # optimistic method are stable up to eta ~ 1 independently of tau.
    c.algorithms = ml_collections.ConfigDict()
    c.algorithms.nash_md = dict()
    c.algorithms.nash_md_const = dict(eta=1.0)
    c.algorithms.omd = dict(eta=0.05)
    c.algorithms.inpo = dict(eta_inv=20.0)
    c.algorithms.extragradient = dict(eta=1.0)
    c.algorithms.optimistic = dict(eta=1.0)
    c.algorithms.mpo = dict(eta=1.0, alpha=0.1, reset_every=100)
    c.algorithms.mwu = dict(eta=0.1)
    c.algorithms.fictitious_play = dict()
    c.algorithms.nash_md_pg = dict(beta=0.125, lr=1.0)
    c.algorithms.online_ipo = dict(lr=0.01)
    c.algorithms.ipo_md = dict(beta=0.125, lr=0.01)
    return c
