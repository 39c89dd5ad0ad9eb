"""Supervised fine-tuning loss (teacher forcing on prompt -> response); the SFT policy becomes mu."""
from __future__ import annotations

import jax.numpy as jnp


def sft_loss(logp, mask, greedy_correct=None):
    """Mean negative log-likelihood per response token.

    Args:
      logp: `[B, N]` log pi_theta of the target response tokens under teacher forcing.
      mask: `[B, N]` response mask (targets after EOS are padding).
      greedy_correct: optional `[B, N]` bool, whether the argmax prediction equals the target.
    Returns:
      `(loss, metrics)` with `nll_per_token` and, when given, `token_accuracy`.
    """
    n_tok = jnp.maximum(jnp.sum(mask), 1.0)
    nll = -jnp.sum(logp * mask) / n_tok
    metrics = {"nll_per_token": nll}
    if greedy_correct is not None:
        metrics["token_accuracy"] = jnp.sum(greedy_correct * mask) / n_tok
    return nll, metrics
