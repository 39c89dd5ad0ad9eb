"""Masked sequence reductions shared by the policy-gradient losses.

All losses in this package are pure functions of per-token log-probabilities `[B, N]`, response masks `[B, N]`
(1 for a real response token, 0 for padding after EOS) and per-sequence scalars `[B]` (preference probabilities,
rewards, labels). None of them calls a model; the scoring helpers of `nash_lm.train.scoring` (`response_logprobs`, the
reward and judge helpers) turn parameters into these arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x, mask):
    """Sum over the token axis of `x * mask`: `[B, N] -> [B]`."""
    return jnp.sum(x * mask, axis=-1)


def reward_to_go(x, mask):
    """`out[b, n] = sum_{m >= n} x[b, m] * mask[b, m]` (suffix sums along the token axis)."""
    masked = x * mask
    return jnp.flip(jnp.cumsum(jnp.flip(masked, axis=-1), axis=-1), axis=-1)


def kl_regularized_pg_surrogate(logp, ref_logp, mask, advantage, tau):
    """Surrogate loss whose gradient is minus a REINFORCE estimate of grad E_pi[A(y)] - tau grad KL(pi, mu).

    The sequence-level estimate for y ~ pi_theta is

        g = sum_n grad log pi(y_n | x, y_<n) * [ A(y) - tau * sum_{m >= n} log(pi(y_m | .)/mu(y_m | .)) ]

    Only the KL of tokens m >= n multiplies the score of token n: the past terms m < n have zero mean given the
    prefix, so dropping them keeps the estimator unbiased for grad KL(pi(.|x), mu(.|x)) at the sequence level
    (and lowers its variance). Dropping the *future* terms m > n as well (TRL's Nash-MD) biases it.

    Args:
      logp: `[B, N]` log pi_theta of the sampled tokens, differentiable in theta.
      ref_logp: `[B, N]` log mu of the same tokens (treated as a constant).
      mask: `[B, N]` response mask.
      advantage: `[B]` sequence-level advantage A(y) (treated as a constant).
      tau: KL coefficient.
    Returns:
      `(loss, per_token_kl)`: the scalar surrogate (batch mean of sequence sums) and the stop-gradient per-token
      log-ratio `[B, N]` (masked), for metrics.
    """
    kl_tok = jax.lax.stop_gradient((logp - ref_logp) * mask)
    coef = jax.lax.stop_gradient(advantage)[:, None] - tau * reward_to_go(kl_tok, mask)
    surrogate = masked_sum(logp * coef, mask)
    return -jnp.mean(surrogate), kl_tok
