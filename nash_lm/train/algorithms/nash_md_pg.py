"""Nash-MD-PG (with self-play and best response), Nash-EMA-PG (Munos et al. 2024, arXiv 2312.00886, App. F), and
the exploiter that measures a trained policy's exploitability on text.

Update rule. For x ~ rho, y ~ pi_theta(.|x) and y' ~ pi'(.|x), pi' held fixed, the estimator of
grad_theta P_tau(pi_theta > pi') (eq. 13) is

    g = sum_n grad log pi_theta(y_n | x, y_<n) * [ P(y > y'|x) - 1/2 - tau * sum_{m >= n} log(pi_theta/mu)(y_m) ]

with 1/2 = P(y > y|x) the control variate and the KL entering each token as a reward-to-go
(`nash_lm.train.losses.kl_regularized_pg_surrogate`). The alternative pi' is

- `nash_md_pg`: the token-level geometric mixture pi_theta^(1-beta) mu^beta (beta = 0 self-play, beta = 1 best
  response against mu), y and y' drawn in one KV-cached decode loop (`nash_lm.sampling.sample_pair`);
- `nash_ema_pg`: the policy of the EMA theta_bar <- d theta_bar + (1 - d) theta of the parameters (`ema_decay`
  d), kept in the train state (`keeps=('ema',)`) and updated after each optimizer step (`advance`);
- `exploiter`: a frozen policy pi_target, the stage's `init` (another policy stage). The state keeps it as the
  tree `anchor` (a copy of the policy at step 0, never refreshed) and the policy starts from it, so the stage
  ascends P(pi_theta > pi_target) - tau KL(pi_theta || mu): a KL-regularised best response to pi_target, whose
  exact maximiser is pi ∝ mu exp(P(y > pi_target | x) / tau). Its win rate against pi_target under the rater
  estimates how exploitable pi_target is (the duality gap of the exact games, measured on text).

The exact counterpart is `nash_lm.games`' `nash_md_pg`: gradient ascent on softmax logits along
grad [pi_theta^T P pi' - tau KL(pi_theta || mu)] (tests/test_losses.py checks the estimator's mean against it).

Config fields: `tau` (KL coefficient), `beta` and `beta_schedule` (Nash-MD-PG), `ema_decay` (Nash-EMA-PG), `init`
(the exploited stage, for `exploiter`), and the common policy fields (`base.POLICY_FIELDS`).

Reading one Nash-MD-PG step: `nash_lm.train.step.policy_step` (what runs in which order) -> this module (how y'
is drawn and the loss) -> `nash_lm.train.losses.common` (the reward-to-go surrogate); the sampler
(`nash_lm.sampling`), the judge and the model (`nash_lm.train.scoring`, `nash_lm.models`) are called from there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nash_lm.train import scoring
from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, beta_of, fail, mixed
from nash_lm.train.losses.common import kl_regularized_pg_surrogate


def nash_md_pg_loss(logp, ref_logp, mask, pref, tau):
    """Nash-MD-PG surrogate loss and metrics; its gradient is -mean_b g_b (minimising it ascends the regularized
    preference). Its value is not the objective; the objective estimate `mean(P - 1/2 - tau * KL_seq)` is in
    the metrics.

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


def _loss(hp, logp, d):
    return nash_md_pg_loss(logp["y"], d["ref_y"], d["y_mask"], d["judged"], hp.tau)


def _sample_mixture(hp, graphdef, trees, batch, keys):
    """y ~ pi_theta, y' ~ pi_theta^(1-beta) mu^beta (token level), one decode loop."""
    return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp, mix_params=trees.ref, beta=hp.beta)


def _sample_against(tree: str):
    """A sampler: y ~ pi_theta, y' ~ the state's extra tree `tree` (the EMA policy; the exploiter's target, the
    anchor), one decode loop."""
    def sample(hp, graphdef, trees, batch, keys):
        return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp, mix_params=getattr(trees, tree),
                                   beta=1.0)

    return sample


def _check_exploiter(st, where):
    if not st.init or st.init == st.ref:
        fail(where("init"), f"{st.init!r}: name the policy stage to exploit (not the reference {st.ref!r}: "
                            f"against mu this is Nash-MD-PG at beta 1)")
    if st.get("lora_rank", 0):
        fail(where("lora_rank"), "an exploiter starts from the exploited policy's parameters; adapters start "
                                 "from its reference instead (set 0)")


def _advance_ema(hp, before, after):
    """theta_bar <- d theta_bar + (1 - d) theta, with the updated theta."""
    with jax.named_scope("ema_update"):
        ema = optax.incremental_update(after.policy, before.ema, step_size=1.0 - hp.ema_decay)
    return after.replace(ema=ema)


_COMMON = dict(role="policy", produces="lm", data="prompts", judges=("preference", "reward"), loss=_loss)

ALGORITHMS = (
    # Nash-MD-PG(beta): y ~ pi_theta, y' ~ pi_theta^(1-beta) mu^beta (beta = 0 self-play, 1 best response)
    Algorithm("nash_md_pg", fields=dict(POLICY_FIELDS, tau=0.1, beta=0.125, beta_schedule=""),
              sample=_sample_mixture, passes=lambda st: (1 + (beta_of(st) > 0.0), 1 + mixed(beta_of(st))),
              **_COMMON),
    # Nash-EMA-PG: y ~ pi_theta, y' ~ the EMA of past parameters
    Algorithm("nash_ema_pg", fields=dict(POLICY_FIELDS, tau=0.1, ema_decay=0.999), keeps=("ema",),
              advance=_advance_ema, sample=_sample_against("ema"), passes=lambda st: (2, 2), **_COMMON),
    # exploiter: y ~ pi_theta, y' ~ pi_target (the stage's init, kept frozen as the anchor)
    Algorithm("exploiter", fields=dict(POLICY_FIELDS, tau=0.1), keeps=("anchor",), check=_check_exploiter,
              sample=_sample_against("anchor"), passes=lambda st: (2, 2), **_COMMON),
)
