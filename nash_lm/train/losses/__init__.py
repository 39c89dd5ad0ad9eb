"""Loss functions shared across algorithms, pure functions of per-token log-probs and masks.

- `common`: masked reductions and the KL-regularised REINFORCE surrogate (reward-to-go) the policy-gradient
  algorithms share (`nash_lm.train.algorithms.nash_md_pg`, `.rlhf`).
- `sft`: teacher-forced NLL (produces mu).
- `preference`: preference-model cross-entropy and Bradley-Terry reward-model loss (the judges).

A policy algorithm's own loss lives in its family module of `nash_lm.train.algorithms`.
"""
from nash_lm.train.losses.common import kl_regularized_pg_surrogate, masked_sum, reward_to_go
from nash_lm.train.losses.preference import bradley_terry_loss, preference_ce_loss
from nash_lm.train.losses.sft import sft_loss

__all__ = [
    "bradley_terry_loss", "kl_regularized_pg_surrogate", "masked_sum", "preference_ce_loss", "reward_to_go",
    "sft_loss",
]
