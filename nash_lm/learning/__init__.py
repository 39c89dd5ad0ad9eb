"""Learning the preference game from data (Ye, Xiong, Zhang, Jiang, Zhang, arXiv 2402.07314).

    from nash_lm import learning
    data = learning.sample_dataset(P_true, learning.product_behaviour(rho, pi_D), n=1000, rng=rng)
    fit = learning.TabularClass(X, n).fit(data)                      # MLE (per-pair win rates)
    pi_hat = learning.offline_policy("version_space", data, mu, tau, rho)   # or "plugin", "bonus"

Modules:
- `data`: offline/online datasets of labelled pairs (x, a1, a2, y), behaviour pair distributions, sampling.
- `classes`: preference function classes (tabular; linear in antisymmetric features with a logistic link),
  maximum-likelihood fitting and the feature constructors.
- `pessimism`: the offline estimators that output the max player: greedy plug-in, version-space pessimism
  (tabular class) and bonus / lower-confidence-bound pessimism (linear class), with one exact cutting-plane
  solver for the pessimistic max-min problem.
- `online`: batch online learning, main agent = equilibrium of the current fit, enhancer = most informative
  opponent in the plausible set; symmetric self-play and uniform sampling as baselines.
- `experiments`: the `ye_offline` and `ye_online` CLI jobs (JSONL + summary + PNG plots).

Everything is float64 NumPy/SciPy on top of the exact engine `nash_lm.games` (equilibria and duality gaps).
"""
from nash_lm.learning.classes import (LinearClass, TabularClass, bt_features, logistic_mle, skew_features,
                                      tabular_features)
from nash_lm.learning.data import (Dataset, pair_counts, product_behaviour, sample_dataset)
from nash_lm.learning.pessimism import (BonusSet, PessimisticResult, VersionSpace, offline_policy,
                                        pessimistic_equilibrium, plugin_policy)
from nash_lm.learning.online import enhancer_policy, run_online, uncertainty
