"""Nash-MD-PG loss (Munos et al. 2024, App. F, eq. 13), with the KL handled per token as a reward-to-go.

For x ~ rho, y ~ pi_theta(.|x) and y' ~ pi'(.|x) (pi' held fixed: the token-level geometric mixture of pi_theta
and mu for Nash-MD-PG(beta), pi_theta for self-play (beta = 0), mu for best response (beta = 1), the EMA policy
for Nash-EMA-PG), the estimator of grad_theta P_tau(pi_theta > pi') is

    g = sum_n grad log pi_theta(y_n | x, y_<n) * [ P(y > y'|x) - 1/2 - tau * sum_{m >= n} log(pi_theta/mu)(y_m) ]

1/2 = P(y > y|x) is the control variate. `nash_md_pg_loss` returns a surrogate whose gradient is -mean_b g_b,
so minimising it ascends the regularized preference. Its value is not the objective; the objective estimate
`mean(P - 1/2 - tau * KL_seq)` is reported in the metrics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train.losses.common import kl_regularized_pg_surrogate


def nash_md_pg_loss(logp, ref_logp, mask, pref, tau):
    """Nash-MD-PG surrogate loss and metrics.

    Args:
      logp: `[B, N]` log pi_theta(y_n | x, y_<n) of y ~ pi_theta, differentiable.
      ref_logp: `[B, N]` log mu of the same tokens.
      mask: `[B, N]` response mask of y.
      pref: `[B]` P(y > y' | x) from the preference model or oracle (no gradient flows into it).
      tau: KL coefficient (tau >= 0).
    Returns:
      `(loss, metrics)` with metrics `pref_mean` (mean P(y > y')), `kl` (mean sequence log-ratio, an unbiased
      estimate of KL(pi_theta, mu)) and `objective` (mean of P - 1/2 - tau * log-ratio).
    """
    pref = jax.lax.stop_gradient(pref)
    loss, kl_tok = kl_regularized_pg_surrogate(logp, ref_logp, mask, pref - 0.5, tau)
    kl_seq = jnp.sum(kl_tok, axis=-1)
    metrics = {
        "pref_mean": jnp.mean(pref),
        "kl": jnp.mean(kl_seq),
        "objective": jnp.mean(pref - 0.5 - tau * kl_seq),
    }
    return loss, metrics
