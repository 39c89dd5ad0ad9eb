"""Heads on the decoder backbone: the pairwise preference model and the Bradley–Terry reward model.

`PreferenceModel` scores P(y ≻ y' | x). It reads the backbone's final hidden state at the last real token
of the concatenation [x; y; y'] through a linear score w, giving f(x, y, y'), and returns
P = g(f(x, y, y') − f(x, y', y)) with g the logistic function evaluated so that g(d) + g(−d) = 1 holds
exactly in floating point (g(d) = σ(d) for d ≤ 0 and 1 − σ(−d) for d > 0). Both orders are stacked along
the batch and scored in one forward pass, so swapping y and y' negates d exactly (a − b = −(b − a) in IEEE
arithmetic) and P(y ≻ y') + P(y' ≻ y) = 1, P(y ≻ y) = ½ hold exactly. Padding inside the concatenation
(left-padded prompt, right-padded answers) is handled by the mask-derived positions of the backbone.

With `lora` (a `LoRAConfig`) the backbone carries low-rank adapters and the head is trained with them
(`nash_lm.models.lora.trained_head`): an adapted judge on a frozen decoder.

`RewardModel` is the scalar reward r(x, y) for the RLHF baseline (trained with the Bradley–Terry loss
−log σ(r(x, y_w) − r(x, y_l)) by the training code): w·h_last + b on the tokens [x; y].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nash_lm.models import lora as lora_lib
from nash_lm.models.config import ModelConfig
from nash_lm.models.transformer import Transformer, _param


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of the last position with mask 1 in each row (0 for an empty row)."""
    t = mask.shape[-1]
    idx = jnp.where(mask > 0, jnp.arange(t), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0)


def pooled_last(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """hidden [B, T, D] at each row's last real token -> [B, D]."""
    idx = last_real_index(mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def exact_sigmoid(d: jax.Array) -> jax.Array:
    """σ(d) arranged so that exact_sigmoid(d) + exact_sigmoid(−d) == 1 exactly in floating point."""
    s = jax.nn.sigmoid(-jnp.abs(d))  # in (0, 1/2]
    return jnp.where(d > 0, 1.0 - s, s)


class PreferenceModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, key, lora=None):
        k1, k2 = jax.random.split(key)
        self.cfg = cfg
        self.backbone = Transformer(cfg, k1, lm_head=False, lora=lora)
        self.score = _param(k2, (cfg.d_model,), cfg.d_model ** -0.5, ("embed",), cfg.weight_dtype)
        if lora is not None:  # an adapted judge trains its head with the adapters
            self.score = lora_lib.trained_head(self.score)

    def pair_score(self, tokens, mask):
        """f on concatenated sequences [B, T] -> [B] float32."""
        h, _ = self.backbone(tokens, mask)
        return pooled_last(h, mask) @ self.score[...].astype(jnp.float32)

    def __call__(self, prompt, prompt_mask, y, y_mask, y2, y2_mask):
        b = prompt.shape[0]
        both = lambda a, p, q: jnp.concatenate([jnp.concatenate([a, p, q], 1), jnp.concatenate([a, q, p], 1)], 0)
        tokens = both(prompt, y, y2)
        mask = both(prompt_mask.astype(jnp.int32), y_mask.astype(jnp.int32), y2_mask.astype(jnp.int32))
        f = self.pair_score(tokens, mask)
        return exact_sigmoid(f[:b] - f[b:])


class RewardModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, key, lora=None):
        k1, k2 = jax.random.split(key)
        self.cfg = cfg
        self.backbone = Transformer(cfg, k1, lm_head=False, lora=lora)
        self.score = _param(k2, (cfg.d_model,), cfg.d_model ** -0.5, ("embed",), cfg.weight_dtype)
        self.bias = nnx.Param(jnp.zeros((), cfg.weight_dtype), out_sharding=(), eager_sharding=False)
        if lora is not None:  # an adapted judge trains its head with the adapters
            self.score, self.bias = lora_lib.trained_head(self.score), lora_lib.trained_head(self.bias)

    def __call__(self, tokens, mask):
        h, _ = self.backbone(tokens, mask)
        return pooled_last(h, mask) @ self.score[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
