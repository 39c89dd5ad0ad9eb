"""INPO, Iterative Nash Policy Optimization (Zhang et al. 2024, arXiv 2407.00617): online mirror descent on the
KL-regularised preference game, each round's step learnt by a squared loss that needs no win-rate estimate.

Update rule (tabular, per prompt x; `eta_inv` is INPO's eta, an *inverse* step size):

    pi_{t+1}(y) ∝ mu(y)^(tau/eta_inv) pi_t(y)^(1 - tau/eta_inv) exp( P(y > pi_t) / eta_inv )

(Munos et al.'s OMD with step 1/eta_inv; `nash_lm.games`' `inpo`). Round t minimises over theta

    L_t(theta) = E_{y, y' ~ pi_t} [ p l(y, y') + (1 - p) l(y', y) ],   p = P(y > y' | x),
    l(y, y') = ( h_theta(y, y') - (tau/eta_inv) h_mu(y, y') - (1 - tau/eta_inv) h_t(y, y') - 1/(2 eta_inv) )^2

with h_q(y, y') = log q(y|x) - log q(y'|x) (sequence log-probs). Its minimiser over all policies is the update
above (the argument of IPO's Prop.: the loss is a least-squares fit of h_theta to (P(y > y') - 1/2)/eta_inv +
(tau/eta_inv) h_mu + (1 - tau/eta_inv) h_t over a product distribution of pairs, whose solution is a difference
f(y) - f(y') with f(y) = P(y > pi_t)/eta_inv + ...); tests/test_algorithms_exact.py checks it by enumeration
on a softmax table against `nash_lm.games`' `inpo` step.

Choices (the paper leaves them to the implementation):
- Rounds with a refreshed anchor: the train state keeps pi_t as the tree `anchor` (`keeps=('anchor',)`), a
  copy of the policy at step 0 refreshed to the policy after every `anchor_every` optimizer steps (`advance`).
  The paper runs a few iterations of offline training on data collected at the start of each; `anchor_every`
  optimizer steps on fresh pairs per round is the online-batch form of the same round. With anchor_every = 1
  the loss's gradient at theta = theta_t is (tau/eta_inv) times online IPO's at KL coefficient tau.
- Pairs: y, y' ~ pi_t (the anchor, as the round's data in the paper), both decoded in one loop, and judged by
  the stage's judge with the soft label p = P(y > y'|x) in place of the best-versus-worst choice among K samples
  of the paper's experiments: the soft-labelled pair keeps the pair distribution the product pi_t x pi_t, for
  which the minimiser is exactly the OMD step (best-versus-worst selection changes the pair distribution and so
  the target).

Config fields: `tau` (KL coefficient, > 0), `eta_inv` (inverse step, >= tau so that the weight on pi_t is in
[0, 1)), `anchor_every` (round length in optimizer steps, >= 1), and the common policy fields. Judges:
a preference or reward model, or an oracle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train import scoring
from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, fail, positive_tau, reset_to_policy
from nash_lm.train.losses.common import masked_sum


def inpo_pair_loss(h, h_ref, h_anchor, pref, tau, eta_inv):
    """Per-pair INPO loss `[B]` from the log-ratio contrasts h(y, y') under pi_theta, mu and pi_t and the soft
    label `pref` = P(y > y'|x)."""
    a = tau / eta_inv
    base = h - a * h_ref - (1.0 - a) * h_anchor
    target = 0.5 / eta_inv
    return pref * (base - target) ** 2 + (1.0 - pref) * (-base - target) ** 2


def inpo_loss(logp, d, tau, eta_inv, reference: str = "ref"):
    """INPO loss (mean over pairs) and metrics from the policy's log-probs `logp` {y, y2} `[B, N]` and `d`'s
    `<reference>_*` (mu, or MPO's magnet) and `anchor_*` log-probs, masks and judgment."""
    seq = lambda x, r: masked_sum(x, d[f"{r}_mask"])
    h = seq(logp["y"], "y") - seq(logp["y2"], "y2")
    h_ref = jax.lax.stop_gradient(seq(d[f"{reference}_y"], "y") - seq(d[f"{reference}_y2"], "y2"))
    h_anchor = jax.lax.stop_gradient(seq(d["anchor_y"], "y") - seq(d["anchor_y2"], "y2"))
    pref = jax.lax.stop_gradient(d["judged"])
    per_pair = inpo_pair_loss(h, h_ref, h_anchor, pref, tau, eta_inv)
    kl = jnp.mean(jax.lax.stop_gradient(seq(logp["y"] - d[f"{reference}_y"], "y")))
    metrics = {"pref_mean": jnp.mean(pref), "kl" if reference == "ref" else f"kl_to_{reference}": kl,
               "log_ratio_margin": jnp.mean(jax.lax.stop_gradient(h - h_anchor))}
    return jnp.mean(per_pair), metrics


def sample_from_anchor(hp, graphdef, trees, batch, keys):
    """y, y' ~ pi_t (the anchor), one decode loop."""
    return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp, mix_params=trees.anchor, beta_y=1.0)


def refresh_every(field: str):
    """An `advance` rule: the anchor becomes the updated policy after every `field` optimizer steps."""
    def advance(hp, before, after):
        return after.replace(anchor=reset_to_policy(after.step % hp.get(field) == 0, before.anchor, after.policy))

    return advance


def check_step(st, where, name: str = "INPO"):
    """The rules on INPO's step (tau, its schedule, eta_inv), shared by the algorithms learnt with its loss."""
    positive_tau(st, where, f"{name} (the weight tau/eta_inv on mu)")
    if st.tau_schedule:
        fail(where("tau_schedule"), f"{name} takes a constant tau (its loss weights mu by tau/eta_inv)")
    if not st.eta_inv >= st.tau:
        fail(where("eta_inv"), f"must be >= tau = {st.tau} (the weight 1 - tau/eta_inv on pi_t is in [0, 1))")


def _check(st, where):
    check_step(st, where)
    if st.anchor_every < 1:
        fail(where("anchor_every"), f"must be >= 1 (the round length in optimizer steps), got {st.anchor_every}")


ALGORITHMS = (
    Algorithm("inpo", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(POLICY_FIELDS, tau=0.1, eta_inv=1.0, anchor_every=10), check=_check,
              sample=sample_from_anchor, scored=("y", "y2"), against=("ref", "anchor"),
              loss=lambda hp, logp, d: inpo_loss(logp, d, hp.tau, hp.get("eta_inv")),
              keeps=("anchor",), advance=refresh_every("anchor_every"), passes=lambda st: (1, 2)),
)
