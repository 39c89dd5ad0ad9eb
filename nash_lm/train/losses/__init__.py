"""Loss functions, one module per algorithm family, all pure functions of per-token log-probs and masks.

- `sft`: teacher-forced NLL (produces mu).
- `preference`: preference-model cross-entropy and Bradley-Terry reward-model loss (the judges).
- `nash_md_pg`: Nash-MD-PG / self-play / best response / Nash-EMA-PG (they differ only in how y' is drawn).
- `rlhf`: KL-regularized policy gradient against a reward model.
- `ipo`: online IPO and IPO-MD.
"""
from nash_lm.train.losses.common import kl_regularized_pg_surrogate, masked_sum, reward_to_go
from nash_lm.train.losses.ipo import ipo_loss
from nash_lm.train.losses.nash_md_pg import nash_md_pg_loss
from nash_lm.train.losses.preference import bradley_terry_loss, preference_ce_loss
from nash_lm.train.losses.rlhf import leave_one_out_baseline, rlhf_pg_loss
from nash_lm.train.losses.sft import sft_loss

__all__ = [
    "bradley_terry_loss", "ipo_loss", "kl_regularized_pg_surrogate", "leave_one_out_baseline", "masked_sum",
    "nash_md_pg_loss", "preference_ce_loss", "reward_to_go", "rlhf_pg_loss", "sft_loss",
]
