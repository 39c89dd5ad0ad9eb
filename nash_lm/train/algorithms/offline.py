"""Offline preference optimisation on fixed pairs: DPO (Rafailov et al. 2023, arXiv 2305.18290) and IPO (Azar et
al. 2023, arXiv 2310.12036), the baselines the Nash papers report.

A stage reads labelled pairs (x, y, y', p) (`data='pairs'`: the synthetic pipeline's pairs, or records files of
chosen/rejected or soft-labelled pairs, as the judges do), teacher-forces y and y' under pi_theta and under its
`ref` mu, and minimises, with h = log(pi(y)/mu(y)) - log(pi(y')/mu(y')) (sequence log-ratios) and the label
p = P(y > y'|x) (`labels='soft'`, the rater probability) or its 0/1 draw (`labels='hard'`):

    dpo          -p log sigmoid(tau h) - (1 - p) log sigmoid(-tau h)              (DPO's beta is tau here)
    offline_ipo  p (h - 1/(2 tau))^2 + (1 - p) (-h - 1/(2 tau))^2                  (the loss of online IPO, on fixed pairs)

No sampling and no judge: the step's samples are the batch's pairs and its judgment their labels (`judged =
'label'`).

Closed forms (checked by enumeration on a softmax table in tests/test_algorithms_exact.py):
- DPO: for a Bradley-Terry preference P(y > y') = sigmoid(r(y) - r(y')) and pairs covering every (y, y'), the
  loss is minimised where tau h = r(y) - r(y') on every pair, i.e. pi ∝ mu exp(r / tau): the KL-regularised
  reward maximiser (Rafailov et al., eq. 4-5). Written with tau as the KL coefficient so that it is the RLHF
  stage's optimum at the same tau. For a preference that is not Bradley-Terry the minimiser depends on the pair
  distribution (no closed form is claimed).
- IPO: for pairs y, y' drawn independently from a behaviour policy pi_D, the minimiser is
  pi ∝ mu exp( P(y > pi_D) / tau ) (Azar et al., Prop. 4 / eq. 14): a one-sided best response to pi_D, where
  online IPO, which samples from pi_theta itself, reaches the regularised Nash equilibrium.

Config fields: `tau` (> 0), `labels` ('soft' | 'hard'), `ref` (mu and the frozen base with LoRA), and the common
fields; no `judge`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nash_lm.train.algorithms.base import Algorithm, positive_tau
from nash_lm.train.algorithms.ipo import ipo_loss
from nash_lm.train.losses.common import masked_sum

OFFLINE_FIELDS = dict(ref="", judge="", labels="soft", microbatches=1, tau_schedule="")


def _accuracy(h, label):
    """Share of decided pairs (label != 1/2) whose implicit-reward margin h has the label's sign."""
    decided = (label != 0.5).astype(jnp.float32)
    correct = ((h > 0) == (label > 0.5)).astype(jnp.float32) * decided
    return jnp.sum(correct) / jnp.maximum(jnp.sum(decided), 1.0)


def dpo_loss(logp_y, ref_logp_y, mask_y, logp_y2, ref_logp_y2, mask_y2, label, tau):
    """Soft-label DPO loss (mean over pairs) and metrics; tau > 0 is DPO's beta (the KL coefficient)."""
    label = jax.lax.stop_gradient(label)
    h = (masked_sum(logp_y - jax.lax.stop_gradient(ref_logp_y), mask_y)
         - masked_sum(logp_y2 - jax.lax.stop_gradient(ref_logp_y2), mask_y2))
    per_pair = -(label * jax.nn.log_sigmoid(tau * h) + (1.0 - label) * jax.nn.log_sigmoid(-tau * h))
    metrics = {"label_mean": jnp.mean(label), "log_ratio_margin": jnp.mean(jax.lax.stop_gradient(h)),
               "accuracy": _accuracy(jax.lax.stop_gradient(h), label)}
    return jnp.mean(per_pair), metrics


def _pairs(hp, logp, d):
    return logp["y"], d["ref_y"], d["y_mask"], logp["y2"], d["ref_y2"], d["y2_mask"], d["judged"], hp.tau


def _ipo(hp, logp, d):
    loss, metrics = ipo_loss(*_pairs(hp, logp, d))
    margins = (masked_sum(jax.lax.stop_gradient(logp["y"] - d["ref_y"]), d["y_mask"])
               - masked_sum(jax.lax.stop_gradient(logp["y2"] - d["ref_y2"]), d["y2_mask"]))
    return loss, {**metrics, "accuracy": _accuracy(margins, d["judged"])}


def batch_pairs(hp, graphdef, trees, batch, keys):
    """The batch's own pairs and their labels (no sampling)."""
    del graphdef, trees, keys
    label = batch["label"] if hp.get("labels") == "soft" else batch["hard_label"]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return {"y": batch["y"], "y_mask": f32(batch["y_mask"]), "y2": batch["y2"], "y2_mask": f32(batch["y2_mask"]),
            "label": f32(label)}


def _check(st, where):
    positive_tau(st, where, "DPO and IPO (the KL coefficient)")


_OFFLINE = dict(role="policy", produces="lm", data="pairs", judges=(), oracles=False, judged="label",
                check=_check, sample=batch_pairs, scored=("y", "y2"), passes=lambda st: (0, 0))

ALGORITHMS = (
    Algorithm("dpo", fields=dict(OFFLINE_FIELDS, tau=0.1), loss=lambda hp, logp, d: dpo_loss(*_pairs(hp, logp, d)),
              **_OFFLINE),
    Algorithm("offline_ipo", fields=dict(OFFLINE_FIELDS, tau=1.0), loss=_ipo, **_OFFLINE),
)
