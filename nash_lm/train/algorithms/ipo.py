"""Online IPO and IPO-MD (Calandriello et al. 2024, arXiv 2403.08635) and EGPO (Zhou, Fazel, Du 2025, arXiv
2503.08942): the IPO loss on pairs sampled inside the step.

Update rule. With h(y, y') = log(pi(y)/mu(y)) - log(pi(y')/mu(y')) (sequence-level log-ratios) the contrastive
loss is L(y+, y-) = (h(y+, y-) - 1/(2 tau))^2, and with the soft label p = P(y > y'|x) the per-pair loss is
p L(y, y') + (1 - p) L(y', y) (`ipo_loss`). Both samples are stop-gradient; the gradient flows through log pi
of both.

- `online_ipo`: y, y' ~ pi_theta; its expected gradient is the self-play gradient and its stationary point the
  regularised NE pi*_tau (Prop. 4.1-4.2); exact counterpart `nash_lm.games`' `online_ipo`.
- `ipo_md`: y, y' both from the token-level geometric mixture pi_theta^(1-beta) mu^beta; counterpart
  `nash_lm.games`' `ipo_md`.
- `egpo`: extragradient online IPO (mirror prox): a provisional step theta' from theta_t on pairs from pi_t,
  new pairs from pi_theta', then the step from theta_t with the gradient on those (`lookahead=1`); counterpart
  `nash_lm.games`' `extragradient`.

Config fields: `tau` (> 0; the target is 1/(2 tau)), `beta` and `beta_schedule` (IPO-MD), and the common policy
fields.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train import scoring
from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, beta_of, mixed, positive_tau
from nash_lm.train.losses.common import masked_sum


def ipo_loss(logp_y, ref_logp_y, mask_y, logp_y2, ref_logp_y2, mask_y2, pref, tau):
    """Soft-label IPO loss (mean over pairs) and metrics; tau > 0."""
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


def _loss(hp, logp, d):
    return ipo_loss(logp["y"], d["ref_y"], d["y_mask"], logp["y2"], d["ref_y2"], d["y2_mask"], d["judged"], hp.tau)


def _check(st, where):
    positive_tau(st, where, "IPO (the target is 1/(2 tau))")


def _sample_policy(hp, graphdef, trees, batch, keys):
    """y, y' ~ pi_theta, one decode loop."""
    return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp)


def _sample_mixture(hp, graphdef, trees, batch, keys):
    """y, y' ~ pi_theta^(1-beta) mu^beta (token level), one decode loop over the prompts twice."""
    return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp, mix_params=trees.ref, beta_y=hp.beta)


_IPO = dict(role="policy", produces="lm", data="prompts", judges=("preference", "reward"), check=_check,
            scored=("y", "y2"), loss=_loss)

ALGORITHMS = (
    Algorithm("online_ipo", fields=dict(POLICY_FIELDS, tau=1.0), sample=_sample_policy, passes=lambda st: (1, 2),
              **_IPO),
    Algorithm("ipo_md", fields=dict(POLICY_FIELDS, tau=1.0, beta=0.125, beta_schedule=""), sample=_sample_mixture,
              passes=lambda st: (2 * mixed(beta_of(st)), 2 * mixed(beta_of(st))), **_IPO),
    Algorithm("egpo", fields=dict(POLICY_FIELDS, tau=1.0), sample=_sample_policy, lookahead=1,
              passes=lambda st: (1, 2), **_IPO),
)
