"""RLHF baseline: KL-regularised policy gradient against a Bradley-Terry reward model (Munos et al.'s RLHF).

Update rule. For y ~ pi_theta (one sample per prompt) the estimator of grad [ E r(x, y) - tau KL(pi_theta, mu) ]
is the reward-to-go construction of Nash-MD-PG (`nash_lm.train.losses.kl_regularized_pg_surrogate`) with the
advantage r(y) - b. The baseline b is the leave-one-out mean reward of the other sequences in the (global)
batch, which keeps the estimator unbiased but couples the examples of a batch (`batch_coupled`: no gradient
microbatches; batch_size >= 2). Its fixed point is pi ∝ mu exp(r / tau).

Config fields: `tau` and the common policy fields; the judge must be a 'reward' stage.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train import scoring
from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, fail
from nash_lm.train.losses.common import kl_regularized_pg_surrogate


def leave_one_out_baseline(reward):
    """`b_i = mean_{j != i} r_j` for a `[B]` vector (B >= 2)."""
    n = reward.shape[0]
    return (jnp.sum(reward) - reward) / (n - 1)


def rlhf_pg_loss(logp, ref_logp, mask, reward, tau):
    """KL-regularized REINFORCE surrogate against reward `[B]`; returns `(loss, metrics)`."""
    reward = jax.lax.stop_gradient(reward)
    advantage = reward - leave_one_out_baseline(reward)
    loss, kl_tok = kl_regularized_pg_surrogate(logp, ref_logp, mask, advantage, tau)
    kl_seq = jnp.sum(kl_tok, axis=-1)
    metrics = {
        "reward_mean": jnp.mean(reward),
        "kl": jnp.mean(kl_seq),
        "objective": jnp.mean(reward - tau * kl_seq),
    }
    return loss, metrics


def _check(st, where):
    if st.batch_size < 2:
        fail(where("batch_size"), "rlhf needs >= 2 sequences per batch (leave-one-out baseline)")
    if st.microbatches != 1:
        fail(where("microbatches"), "rlhf's leave-one-out baseline spans the whole batch: must be 1")


ALGORITHMS = (
    Algorithm("rlhf", role="policy", produces="lm", data="prompts", judges=("reward",), oracles=False,
              fields=dict(POLICY_FIELDS, tau=0.05), check=_check, judged="reward", batch_coupled=True,
              sample=lambda hp, graphdef, trees, batch, keys: scoring.sample(graphdef, trees.policy, batch, keys[0],
                                                                             hp),
              loss=lambda hp, logp, d: rlhf_pg_loss(logp["y"], d["ref_y"], d["y_mask"], d["judged"], hp.tau),
              passes=lambda st: (1, 1)),
)
