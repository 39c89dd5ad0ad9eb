"""Architecture variants of the nash-lm decoder needed to run Gemma and Qwen2 checkpoints exactly.

The decoder in `nash_lm.models` is Llama's. Two Hugging Face architectures differ from it in ways that
cannot be folded into the weights:

  * Gemma's feed-forward gate is GeLU (tanh approximation) instead of SiLU -> `GeluMLP`.
  * Qwen2's q/k/v projections have biases -> `BiasedAttention` (a `qkv_bias` [kv-heads, group + 2,
    head_dim] in the fused projection's layout, added before RoPE).

The rest of Gemma folds into Llama's parameters at import time (see `nash_lm.interop.hf`): the RMSNorm
`(1 + w)` scale becomes the scale, and the `sqrt(d_model)` input-embedding multiplier goes into an untied
input embedding. `build_abstract(cfg, arch)` builds the matching model: the standard `Transformer` with its
blocks' MLP or attention replaced by these subclasses, so the result plugs into every `(graphdef, params)`
entry point (`models.lm_logits`, `sampling.sample`, the training steps) unchanged.

Only unscanned layers (`scan_layers=False`) are supported for the variants; Llama imports support both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nash_lm import models
from nash_lm.models import transformer as tf
from nash_lm.parallel import constrain

ARCHS = ("llama", "gemma", "qwen2")


class GeluMLP(tf.MLP):
  """SwiGLU with the gate activation replaced by GeLU (tanh approximation), as in Gemma."""

  def __call__(self, x):
    dt = self.cfg.compute_dtype
    h = jnp.einsum("btd,dcf->btcf", x, self.gate_up[...].astype(dt))
    h = constrain(h, ("batch", "length", "qkv", "mlp"))
    h = jax.nn.gelu(h[:, :, 0], approximate=True) * h[:, :, 1]
    return jnp.einsum("btf,fd->btd", h, self.down[...].astype(dt))


class BiasedAttention(tf.Attention):
  """Grouped-query attention whose fused q/k/v projection has a bias (Qwen2)."""

  def __init__(self, cfg, key):
    super().__init__(cfg, key)
    shape = (cfg.n_kv_heads, cfg.group_size + 2, cfg.head_dim)
    self.qkv_bias = nnx.Param(jnp.zeros(shape, cfg.weight_dtype), out_sharding=("heads", "qkv", "kv"),
                              eager_sharding=False)

  def __call__(self, x, positions, key_mask, cache_kv=None, index=None, layer=0):
    """As `Attention.__call__` (same arguments and cache convention), with the bias added to q, k and v."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    g = cfg.group_size
    qkv = jnp.einsum("btd,dkgh->btkgh", x, self.qkv[...].astype(dt)) + self.qkv_bias[...].astype(dt)
    qkv = constrain(qkv, ("batch", "length", "heads", "qkv", "kv"))
    q = tf.rope(qkv[:, :, :, :g], positions, cfg.rope_theta)
    k = tf.rope(qkv[:, :, :, g], positions, cfg.rope_theta)
    v = qkv[:, :, :, g + 1]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, hd], the cache's layout
    t = x.shape[1]
    if cache_kv is None:
      keys, vals, start = k, v, 0
    else:  # cache_kv holds every layer's keys/values [L, B, K, S, hd]; write this layer's at [layer, :, :, index]
      k_all, v_all = cache_kv
      zero = jnp.zeros((), jnp.int32)
      at = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(index, jnp.int32), zero)
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
      keys = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
      vals = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
      start = index
    keys = constrain(keys, ("batch", "heads", "length", "kv"))
    vals = constrain(vals, ("batch", "heads", "length", "kv"))
    s = keys.shape[2]
    scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim ** -0.5)
    q_slot = start + jnp.arange(t)[:, None]
    allowed = (jnp.arange(s)[None, :] <= q_slot)[None] & (key_mask[:, None, :] > 0)
    scores = jnp.where(allowed[:, None, None], scores, tf.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum("bkgts,bksh->btkgh", probs, vals.astype(dt))
    o = constrain(o, ("batch", "length", "heads", "qkv", "kv"))
    out = jnp.einsum("btkgh,kghd->btd", o, self.out[...].astype(dt))
    return out, (None if cache_kv is None else (k_all, v_all))


def _make(cfg, arch: str, key):
  model = tf.Transformer(cfg, key)
  if arch == "llama":
    return model
  keys = jax.random.split(jax.random.fold_in(key, 1), cfg.n_layers)
  for i, blk in enumerate(model.blocks):
    if arch == "gemma":
      blk.mlp = GeluMLP(cfg, keys[i])
    elif arch == "qwen2":
      blk.attn = BiasedAttention(cfg, keys[i])
  return model


def build_abstract(cfg, arch: str):
  """(graphdef, params of ShapeDtypeStruct) of the decoder for a Hugging Face architecture."""
  if arch not in ARCHS:
    raise ValueError(f"architecture {arch!r}: must be one of {ARCHS}")
  cfg.validate()
  if arch == "llama":
    return models.abstract_init(cfg, "lm")
  if cfg.scan_layers:
    raise ValueError(f"ModelConfig.scan_layers=True: not supported for {arch} checkpoints (llama only)")
  model = nnx.eval_shape(lambda: _make(cfg, arch, jax.random.key(0)))
  return nnx.split(model, nnx.Param)


def init(cfg, arch: str, seed: int = 0, shardings=None):
  """(graphdef, randomly initialised params) of the decoder for a Hugging Face architecture, created by one
  jitted program (already sharded with `shardings`, a tree from `nash_lm.parallel.param_shardings`)."""
  graphdef, _ = build_abstract(cfg, arch)
  if arch == "llama":
    return models.init(cfg, "lm", seed, shardings=shardings)
  make = jax.jit(lambda key: nnx.state(_make(cfg, arch, key), nnx.Param), out_shardings=shardings)
  return graphdef, make(jax.random.key(seed))


def architecture_of(graphdef, params) -> str:
  """'llama', 'gemma' or 'qwen2' from the module types in a (graphdef, params) pair."""
  model = nnx.merge(graphdef, params)
  kinds = set()
  for _, m in nnx.iter_modules(model):
    if isinstance(m, GeluMLP):
      kinds.add("gemma")
    elif isinstance(m, BiasedAttention):
      kinds.add("qwen2")
  if len(kinds) > 1:
    raise ValueError(f"model mixes architectures {sorted(kinds)}")
  return kinds.pop() if kinds else "llama"
