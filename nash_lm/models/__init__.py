"""Models: the Llama-family decoder (Flax NNX), its preference and reward heads, and the KV cache.

The models are used functionally: `init` builds one with `nnx` and splits it once into a graph definition
(static, hashable) and a parameter `nnx.State` (a pytree of `nnx.Param`s carrying logical axis names).
Every entry point below takes `(graphdef, params, ...)` and calls `nnx.merge` inside, so it can be jitted
with plain `jax.jit`, and several parameter trees (policy, reference, EMA) share one compiled program.

Contract (used by `nash_lm.sampling` and `nash_lm.train`):
  ModelConfig                                 frozen dataclass; `.validate()`; `ModelConfig.from_config(cd)`
  init(cfg, kind, seed, shardings=None, lora=None) -> (graphdef, params)  kind in {'lm', 'preference', 'reward'}
  abstract_init(cfg, kind, lora=None) -> (graphdef, abstract params)   shapes only (for shardings before allocating)
      with `lora` (a `LoRAConfig`) the decoder (a judge's backbone) carries low-rank adapters
      (`nash_lm.models.lora`: `split`/`join` of adapters and base, `merge` into a plain State)
  lm_logits(graphdef, params, tokens, mask, outputs=slice(None)) -> [B, T, V] float32 (T' positions with outputs)
      positions from the mask (left padding works), causal attention ignoring padded keys.
  preference_prob(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask) -> [B]
      P(y ≻ y2 | prompt); both orders in one forward pass; exactly antisymmetric.
  reward(graphdef, params, tokens, mask) -> [B] scalar Bradley–Terry reward.
  init_cache(cfg, batch, length) -> KVCache;  forward_cached(graphdef, params, tokens, mask, cache, index,
      outputs=slice(None), lora_scale=None) -> (logits float32, cache): prefill (T = prompt length, index 0) and decode (T = 1).
  config_of(graphdef, params) -> ModelConfig.
  cast_storage(params, dtype) -> params with every floating matrix stored in dtype (frozen trees in bfloat16).
Tokens are int32 [B, T]; masks are 0/1 (any integer or bool dtype) [B, T].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nash_lm.models import lora
from nash_lm.models.config import ModelConfig
from nash_lm.models.heads import PreferenceModel, RewardModel, exact_sigmoid
from nash_lm.models.lora import LoRAConfig
from nash_lm.models.transformer import KVCache, Transformer, init_cache, positions_from_mask

KINDS = ("lm", "preference", "reward")

__all__ = [
    "ModelConfig", "KVCache", "Transformer", "PreferenceModel", "RewardModel", "KINDS", "init",
    "abstract_init", "lm_logits", "preference_prob", "reward", "init_cache", "forward_cached", "config_of",
    "check_length", "exact_sigmoid", "positions_from_mask", "num_params", "cast_storage", "LoRAConfig", "lora",
]


def _build(cfg: ModelConfig, kind: str, seed, lora_cfg: LoRAConfig | None = None):
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    if kind == "lm":
        return Transformer(cfg, key, lora=lora_cfg)
    if kind == "preference":
        return PreferenceModel(cfg, key, lora=lora_cfg)
    if kind == "reward":
        return RewardModel(cfg, key, lora=lora_cfg)
    raise ValueError(f"kind={kind!r}: must be one of {KINDS}")


@functools.lru_cache(maxsize=64)
def _jitted_init(cfg: ModelConfig, kind: str, lora_cfg: LoRAConfig | None = None):
    return jax.jit(lambda key: nnx.state(_build(cfg, kind, key, lora_cfg), nnx.Param))


def init(cfg: ModelConfig, kind: str = "lm", seed: int = 0, shardings=None, lora_cfg: LoRAConfig | None = None):
    """Builds the model and splits it: (graphdef, params nnx.State). Validates cfg first.

    The parameters are created by one jit-compiled program (much faster than op-by-op creation); with
    `shardings` (a tree from `nash_lm.parallel.param_shardings`) they are created already sharded.
    """
    graphdef, _ = abstract_init(cfg, kind, lora_cfg)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    if shardings is None:
        params = _jitted_init(cfg, kind, lora_cfg)(key)
    else:
        params = jax.jit(lambda key: nnx.state(_build(cfg, kind, key, lora_cfg), nnx.Param),
                         out_shardings=shardings)(key)
    return graphdef, params


def abstract_init(cfg: ModelConfig, kind: str = "lm", lora_cfg: LoRAConfig | None = None):
    """(graphdef, params of jax.ShapeDtypeStruct) without allocating anything."""
    cfg.validate()
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    model = nnx.eval_shape(lambda: _build(cfg, kind, 0, lora_cfg))
    return nnx.split(model, nnx.Param)


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def cast_storage(params, dtype):
    """`params` with every floating matrix (two or more axes besides 'layers') stored in `dtype`; vectors (norm
    scales, biases) keep theirs. For the frozen trees (reference, judge) of a policy stage: in bfloat16 they take
    half the bytes of float32 masters; the forward passes cast weights to the compute dtype at use and compute
    logits in float32 either way. Works on concrete (shardings kept) and abstract (ShapeDtypeStruct) trees."""
    dtype = jnp.dtype(dtype)

    def f(v):
        value = v.get_value()
        axes = v.get_metadata().get("out_sharding") or ()
        if not jnp.issubdtype(value.dtype, jnp.floating) or sum(a != "layers" for a in axes) < 2:
            return v
        if isinstance(value, jax.ShapeDtypeStruct):
            return v.replace(jax.ShapeDtypeStruct(value.shape, dtype, sharding=value.sharding))
        return v.replace(value.astype(dtype))

    return jax.tree.map(f, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def config_of(graphdef, params) -> ModelConfig:
    """The ModelConfig of a (graphdef, params) pair."""
    return nnx.merge(graphdef, params).cfg


def check_length(cfg: ModelConfig, length: int, what: str = "tokens") -> None:
    """ValueError naming the field when a sequence is longer than cfg.max_len (raised while tracing)."""
    if length > cfg.max_len:
        raise ValueError(f"{what}: length {length} exceeds ModelConfig.max_len={cfg.max_len}")


def _check_tokens(tokens, mask, what="tokens"):
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"{what}: expected [B, T] tokens and a mask of the same shape, got {tokens.shape} and "
                         f"{mask.shape}")


def lm_logits(graphdef, params, tokens, mask, outputs: slice = slice(None)):
    """Next-token logits [B, T, V] float32 of an 'lm' model (at the positions `outputs` selects, default all)."""
    model = nnx.merge(graphdef, params)
    _check_tokens(tokens, mask)
    check_length(model.cfg, tokens.shape[1])
    logits, _ = model(tokens, mask, outputs=outputs)
    return logits


def forward_cached(graphdef, params, tokens, mask, cache: KVCache, index, outputs: slice = slice(None),
                   lora_scale=None):
    """Runs T tokens into cache slots [index, index + T); returns (logits f32 at `outputs`, new cache).
    `lora_scale` [B] or [B, r]: the adapters' per-row scale of an adapted model (None: 1)."""
    model = nnx.merge(graphdef, params)
    return model(tokens, mask, cache=cache, index=index, outputs=outputs, lora_scale=lora_scale)


def preference_prob(graphdef, params, prompt, prompt_mask, y, y_mask, y2, y2_mask):
    """P(y ≻ y2 | prompt) [B] float32 of a 'preference' model (see `heads.PreferenceModel`)."""
    model = nnx.merge(graphdef, params)
    _check_tokens(prompt, prompt_mask, "prompt")
    _check_tokens(y, y_mask, "y")
    _check_tokens(y2, y2_mask, "y2")
    check_length(model.cfg, prompt.shape[1] + y.shape[1] + y2.shape[1], "prompt + y + y2")
    return model(prompt, prompt_mask, y, y_mask, y2, y2_mask)


def reward(graphdef, params, tokens, mask):
    """Scalar reward [B] float32 of a 'reward' model on tokens [x; y]."""
    model = nnx.merge(graphdef, params)
    _check_tokens(tokens, mask)
    check_length(model.cfg, tokens.shape[1])
    return model(tokens, mask)
