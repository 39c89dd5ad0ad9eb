"""RLHF baseline: KL-regularized policy gradient against a Bradley-Terry reward model (Munos et al.'s RLHF).

For y ~ pi_theta the estimator of grad [ E r(x, y) - tau KL(pi_theta, mu) ] is the same reward-to-go
construction as Nash-MD-PG (`common.kl_regularized_pg_surrogate`) with advantage r(y) - b. The baseline b is the
leave-one-out mean reward of the other sequences in the (global) batch, which keeps the estimator unbiased.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

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
