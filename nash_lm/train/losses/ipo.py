"""Online IPO and IPO-MD(beta) losses (Calandriello et al. 2024) on a sampled pair (y, y').

With h(y, y') = log(pi(y)/mu(y)) - log(pi(y')/mu(y')) (sequence-level log-ratios) the contrastive loss is
L(y+, y-) = (h(y+, y-) - 1/(2 tau))^2, and with the soft label p = P(y > y'|x) the per-pair loss is
p L(y, y') + (1 - p) L(y', y). Online IPO samples y, y' from pi_theta; IPO-MD samples both from the token-level
geometric mixture of pi_theta and mu. Both samples are stop-gradient; the gradient flows through log pi of both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train.losses.common import masked_sum


def ipo_loss(logp_y, ref_logp_y, mask_y, logp_y2, ref_logp_y2, mask_y2, pref, tau):
    """Soft-label online-IPO loss (mean over pairs) and metrics; tau > 0."""
    pref = jax.lax.stop_gradient(pref)
    ratio_y = masked_sum(logp_y - jax.lax.stop_gradient(ref_logp_y), mask_y)
    ratio_y2 = masked_sum(logp_y2 - jax.lax.stop_gradient(ref_logp_y2), mask_y2)
    h = ratio_y - ratio_y2
    target = 0.5 / tau
    per_pair = pref * (h - target) ** 2 + (1.0 - pref) * (-h - target) ** 2
    metrics = {
        "pref_mean": jnp.mean(pref),
        "kl": jnp.mean(jax.lax.stop_gradient(ratio_y)),
        "log_ratio_margin": jnp.mean(jax.lax.stop_gradient(h)),
    }
    return jnp.mean(per_pair), metrics
