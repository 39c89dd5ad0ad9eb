"""The stages that learn from fixed data: SFT (produces mu) and the two judges (a pairwise preference model and a
Bradley-Terry reward model), trained by `nash_lm.train.step.sft_step` / `judge_step` with the losses of
`nash_lm.train.losses` (`sft_loss`, `preference_ce_loss`, `bradley_terry_loss`).

Config fields: `prompt_loss_weight` (SFT: > 0 also teacher-forces the prompt tokens with this weight), `labels`
(judges: 'soft' rater probabilities or 'hard' 0/1 draws).
"""
from __future__ import annotations

from nash_lm.train.algorithms.base import Algorithm

ALGORITHMS = (
    Algorithm("sft", role="sft", produces="lm", data="sft",
              fields=dict(prompt_loss_weight=0.0)),  # > 0: also teacher-force the prompt tokens, with this weight
    Algorithm("preference", role="judge", produces="preference", data="pairs", fields=dict(labels="soft")),
    Algorithm("reward", role="judge", produces="reward", data="pairs", fields=dict(labels="soft")),
)
