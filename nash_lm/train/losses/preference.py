"""Training losses for the judges: the pairwise preference model and the Bradley-Terry reward model.

Both take labels in [0, 1] (1: the first response is preferred; hard labels are 0/1, soft labels are rater
probabilities) and report accuracy against the hard decision label > 1/2 (pairs labelled exactly 1/2 are
excluded from the accuracy).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-7


def _accuracy(score_positive, label):
    """Share of decided pairs (label != 1/2) where `score_positive` agrees with `label > 1/2`."""
    decided = (label != 0.5).astype(jnp.float32)
    correct = ((score_positive) == (label > 0.5)).astype(jnp.float32) * decided
    return jnp.sum(correct) / jnp.maximum(jnp.sum(decided), 1.0)


def preference_ce_loss(prob, label):
    """Cross-entropy of the preference model's P(y > y'|x) `[B]` against labels `[B]`; returns (loss, metrics)."""
    p = jnp.clip(prob, _EPS, 1.0 - _EPS)
    nll = -(label * jnp.log(p) + (1.0 - label) * jnp.log1p(-p))
    metrics = {"accuracy": _accuracy(prob > 0.5, label), "prob_mean": jnp.mean(prob)}
    return jnp.mean(nll), metrics


def bradley_terry_loss(reward_y, reward_y2, label):
    """Bradley-Terry NLL: P(y > y') = sigmoid(r(y) - r(y')), soft/hard labels; returns (loss, metrics)."""
    margin = reward_y - reward_y2
    nll = -(label * jax.nn.log_sigmoid(margin) + (1.0 - label) * jax.nn.log_sigmoid(-margin))
    metrics = {"accuracy": _accuracy(margin > 0, label), "margin_mean": jnp.mean(margin)}
    return jnp.mean(nll), metrics
