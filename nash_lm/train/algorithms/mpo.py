"""MPO, Magnetic Preference Optimization (Wang et al. 2024, arXiv 2410.16714): magnetic mirror descent on the
preference game, the magnet periodically reset to the current policy, which drives the last iterate to the Nash
equilibrium of the unregularised game.

Update rule (tabular, per prompt x; step eta, magnet strength alpha, magnet m):

    pi_{t+1} = argmax_pi  eta <P(. > pi_t), pi> - eta alpha KL(pi || m) - KL(pi || pi_t)
             ∝ ( pi_t m^(eta alpha) )^(1/(1 + eta alpha)) exp( eta P(. > pi_t) / (1 + eta alpha) )

and m <- pi_{t+1} every `reset_every` steps (`nash_lm.games`' `mpo`; nlhf_math's [derived] MMD closed form). It
is INPO's step (`nash_lm.train.algorithms.inpo`) with mu replaced by the magnet, tau = alpha and
eta_inv = (1 + eta alpha)/eta, so each round is learnt with INPO's squared loss on pairs y, y' ~ pi_t with the
soft label P(y > y'|x), whose minimiser is exactly the step above (tests/test_algorithms_exact.py, by enumeration
on a softmax table against `games`' `mpo`).

Choices:
- The loss. The paper's practical implementation is a token-level REINFORCE step on the same objective (self-play
  advantages, KL to the magnet); here the MMD step is learnt by regression, as INPO learns OMD's, so that a round
  has an exact target and the code is INPO's loss with another reference. `eta` and `alpha` have the games'
  meaning.
- The state keeps pi_t (`anchor`, refreshed after every `anchor_every` optimizer steps: a round) and the magnet
  (`magnet`, the policy at step 0, i.e. mu when the stage starts from its `ref`, reset to the policy after every
  `reset_every` optimizer steps); both are checkpointed and restored on resume.

Config fields: `eta` (> 0), `alpha` (> 0), `anchor_every` (>= 1), `reset_every` (> 0, in optimizer steps),
`judge`, `ref`, and the common policy fields.
"""
from __future__ import annotations

from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, fail, reset_to_policy
from nash_lm.train.algorithms.inpo import inpo_loss, refresh_every, sample_from_anchor


def mmd_as_inpo(eta: float, alpha: float) -> tuple:
    """(tau, eta_inv) of the INPO step equal to the MMD step (eta, alpha) with the magnet as INPO's mu."""
    return alpha, (1.0 + eta * alpha) / eta


def _loss(hp, logp, d):
    tau, eta_inv = mmd_as_inpo(hp.get("eta"), hp.get("alpha"))
    return inpo_loss(logp, d, tau, eta_inv, reference="magnet")


def _advance(hp, before, after):
    """The anchor as INPO's; the magnet reset to the updated policy after every `reset_every` steps."""
    after = refresh_every("anchor_every")(hp, before, after)
    return after.replace(magnet=reset_to_policy(after.step % hp.get("reset_every") == 0, before.magnet,
                                                after.policy))


def _check(st, where):
    for field in ("eta", "alpha"):
        if st[field] <= 0:
            fail(where(field), f"must be > 0, got {st[field]}")
    if st.reset_every <= 0:
        fail(where("reset_every"), f"the magnet's reset period must be > 0 optimizer steps, got {st.reset_every}")
    if st.anchor_every < 1:
        fail(where("anchor_every"), f"must be >= 1 (the round length in optimizer steps), got {st.anchor_every}")


_FIELDS = {k: v for k, v in POLICY_FIELDS.items() if k not in ("tau_schedule", "missing_eos_penalty")}

ALGORITHMS = (
    Algorithm("mpo", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(_FIELDS, eta=1.0, alpha=0.1, anchor_every=10, reset_every=100), check=_check,
              sample=sample_from_anchor, scored=("y", "y2"), against=("magnet", "anchor"), loss=_loss,
              keeps=("anchor", "magnet"), advance=_advance, passes=lambda st: (1, 2)),
)
