"""The Llama-family decoder in Flax NNX, and its KV cache.

Owns: RMSNorm, rotary position embedding (RoPE), grouped-query attention with a fused q/k/v projection,
the SwiGLU feed-forward with a fused gate/up projection, the block, the `Transformer` (embedding, blocks,
final norm, tied or untied LM head), and `KVCache`.

Conventions
  * Every parameter is an `nnx.Param` in `param_dtype` carrying logical axis names in its `out_sharding`
    metadata (eager sharding off): embed, mlp, heads, kv, qkv, vocab and, for stacked blocks, layers.
    `nash_lm.parallel` maps them onto the mesh. Activations get `parallel.constrain` calls
    (batch, length, act_embed, heads, kv, mlp, vocab), no-ops outside `parallel.activate`.
  * Compute in `cfg.dtype` (weights are cast at use); attention softmax, norms and logits in float32.
  * Sequences are [B, T] tokens with a [B, T] mask (1 = real token). Positions are `cumsum(mask) - 1`, so
    left padding (and holes, as in a concatenated prompt/answer pair) is handled; a query attends to earlier
    buffer slots holding real tokens (a padded query attends nowhere useful; its output is finite garbage).
  * Attention is grouped: the fused projection is [embed, kv-heads, group + 2, head_dim], so slot g < group
    is a query head of that kv head and slots group, group + 1 are its key and value. No head repetition.
  * Scanned layers (`cfg.scan_layers`): blocks created with `nnx.vmap` (leading 'layers' axis) and run with
    `lax.scan`; otherwise an `nnx.List` of blocks run in a Python loop. Both use the same per-layer function;
    the `KVCache` holds per-layer [B, n_kv_heads, S, head_dim] buffers, stacked for the scan.
  * `cfg.remat` wraps each block in `jax.checkpoint`, only on the cache-free (training) path.
  * LoRA (`lora=LoRAConfig(...)`, `nash_lm.models.lora`): adapters `lora_<target>` on the attention and MLP
    projections add their low-rank term to the projection's output (zeros in the fused kernels' untargeted
    slots), times a per-row `lora_scale`; without `lora` the modules and their parameters are the plain ones.
  * Cache-free causal attention over T > ATTN_BLOCK tokens runs by query blocks, each over the keys up to its
    last query only (the fully masked upper blocks are skipped; exact).

KV cache: `KVCache(k, v, mask)`; `Transformer(tokens, mask, cache=c, index=i)` writes the new keys/values
and the token mask at buffer slots [i, i + T) and attends over the whole buffer, so one call with the prompt
is the prefill and calls with T = 1 are decode steps. A decode step's cost depends on the buffer size, not on the
position (a slice of the filled prefix would be a copy on XLA:CPU); the sampler therefore starts with a small
buffer and grows it between decode loops (`nash_lm.sampling.GROW`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nash_lm.models import lora as lora_lib
from nash_lm.models.config import ModelConfig
from nash_lm.parallel import constrain

NEG_INF = -1e30


def _param(key, shape, std, axes, dtype):
    value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _ones(shape, axes, dtype):
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


class KVCache(NamedTuple):
    """Keys and values, and the slot mask [B, S] (int32). Per layer [B, n_kv_heads, S, head_dim]: a tuple of
    n_layers arrays (layers in a Python loop), or one array stacked along a leading layer axis (`scan_layers`).

    One array per layer lets each decode step update its layer's buffer in place and hand it to the attention
    as is: no per-step copy of a layer's slice out of a stacked buffer. Heads before slots, so each
    (batch, kv-head) block of the buffer is contiguous for the attention matmuls."""
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache with `length` slots, in the compute dtype."""
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    if cfg.scan_layers:
        z = jnp.zeros((cfg.n_layers,) + shape, cfg.compute_dtype)
    else:
        z = tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.n_layers))
    return KVCache(z, z, jnp.zeros((batch, length), jnp.int32))


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position of each real token: number of real tokens before it (+ offset); padding gets its neighbour's."""
    mask = mask.astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1 + jnp.asarray(offset, jnp.int32)[..., None]
    return jnp.maximum(pos, 0)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, hd/2] float32 of the rotary angles at positions [B, T]; computed once per forward pass
    and shared by every layer's queries and keys."""
    freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * freq
    return jnp.cos(ang), jnp.sin(ang)


def rope(x: jax.Array, rot: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding (rotate-half form) on the last axis of x [B, T, ..., hd] with rot = `rope_angles(...)`."""
    cos, sin = (a.reshape(a.shape[:2] + (1,) * (x.ndim - 3) + a.shape[-1:]) for a in rot)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _add_adapters(module, cfg, lora, targets, key):
    """`module.lora_<target>`: an adapter per target of `lora` among `targets` (nothing without `lora`)."""
    for target in targets:
        if lora is not None and target in lora.targets:
            setattr(module, f"lora_{target}", lora_lib.Adapter(cfg, lora, target, lora_lib.adapter_key(key, target)))


def _adapter(module, target):
    return getattr(module, f"lora_{target}", None)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, axes=("embed",)):
        self.eps = float(cfg.norm_eps)
        self.scale = _ones((cfg.d_model,), axes, cfg.weight_dtype)

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


ATTN_BLOCK = 128  # query block of the cache-free causal attention


def _attend(q, keys, vals, key_mask, start, cfg):
    """Softmax attention of queries q [B, T, K, g, hd] at buffer slots start + [0, T) over keys/values
    [B, K, S, hd]: a query sees slots at or before its own that hold real tokens (key_mask [B, S] > 0)."""
    t, s = q.shape[1], keys.shape[2]
    scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim ** -0.5)
    q_slot = start + jnp.arange(t)[:, None]
    allowed = (jnp.arange(s)[None, :] <= q_slot)[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, vals.astype(cfg.compute_dtype))
    return out.transpose(0, 3, 1, 2, 4)  # [B, T, K, g, hd]


class Attention(nnx.Module):
    """Grouped-query self-attention with a fused q/k/v kernel [embed, kv-heads, group + 2, head_dim] and, with
    `cfg.qkv_bias` (Qwen2), a bias [kv-heads, group + 2, head_dim] added before RoPE."""

    def __init__(self, cfg: ModelConfig, key, lora: lora_lib.LoRAConfig | None = None):
        self.cfg = cfg
        k1, k2 = jax.random.split(key)
        d, kv, g, hd = cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim
        _add_adapters(self, cfg, lora, ("q", "k", "v", "o"), key)
        self.qkv = _param(k1, (d, kv, g + 2, hd), d ** -0.5, ("embed", "heads", "qkv", "kv"), cfg.weight_dtype)
        self.out = _param(k2, (kv, g, hd, d), (cfg.n_heads * hd) ** -0.5 / math.sqrt(2 * cfg.n_layers),
                          ("heads", "qkv", "kv", "embed"), cfg.weight_dtype)
        if cfg.qkv_bias:
            self.qkv_bias = nnx.Param(jnp.zeros((kv, g + 2, hd), cfg.weight_dtype), out_sharding=("heads", "qkv", "kv"),
                                      eager_sharding=False)

    def __call__(self, x, rot, key_mask, cache_kv=None, index=None, lora_scale=None):
        """x [B,T,D]; rot = `rope_angles` of the T positions; key_mask [B,S] (S = T without cache).
        Returns (out [B,T,D], (k, v) or None).

        With a cache, `cache_kv` is this layer's keys/values (k, v), each [B, K, S, hd]: the new keys/values are
        written in place at [:, :, index] (a small dynamic-update-slice on the loop-carried buffer) and the whole
        buffer is attended over. `lora_scale` [B] (or [B, r]) scales the adapters' low-rank terms per row (None: 1).
        """
        cfg = self.cfg
        dt = cfg.compute_dtype
        g = cfg.group_size
        qkv = jnp.einsum("btd,dkgh->btkgh", x, self.qkv[...].astype(dt))
        if cfg.qkv_bias:
            qkv = qkv + self.qkv_bias[...].astype(dt)
        slots = [(_adapter(self, t), n) for t, n in (("q", g), ("k", 1), ("v", 1))]
        if any(a is not None for a, _ in slots):  # the q/k/v adapters' terms, zeros in untargeted slots
            b, t = x.shape[:2]
            zero = lambda n: jnp.zeros((b, t, cfg.n_kv_heads, n, cfg.head_dim), qkv.dtype)
            qkv = qkv + jnp.concatenate(
                [zero(n) if a is None else a(x, lora_scale).reshape(b, t, cfg.n_kv_heads, n, cfg.head_dim)
                 for a, n in slots], axis=3)
        qkv = constrain(qkv, ("batch", "length", "heads", "qkv", "kv"))
        q = rope(qkv[:, :, :, :g], rot)
        k = rope(qkv[:, :, :, g], rot)
        v = qkv[:, :, :, g + 1]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, hd]
        t = x.shape[1]
        if cache_kv is None:
            keys, vals, start = k, v, 0
        else:
            k_buf, v_buf = cache_kv
            zero = jnp.zeros((), jnp.int32)
            at = (zero, zero, jnp.asarray(index, jnp.int32), zero)
            k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), at)
            v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), at)
            keys, vals, start = k_buf, v_buf, index
        keys = constrain(keys, ("batch", "heads", "length", "kv"))
        vals = constrain(vals, ("batch", "heads", "length", "kv"))
        if cache_kv is None and t > ATTN_BLOCK:
            # Causal attention by query blocks: block [a, b) needs keys [0, b) only, so the fully masked upper
            # blocks are never computed (about half the score FLOPs and memory at long T; exact).
            o = jnp.concatenate([_attend(q[:, a:a + ATTN_BLOCK], keys[:, :, :a + ATTN_BLOCK],
                                         vals[:, :, :a + ATTN_BLOCK], key_mask[:, :a + ATTN_BLOCK], a, cfg)
                                 for a in range(0, t, ATTN_BLOCK)], axis=1)
        else:
            o = _attend(q, keys, vals, key_mask, start, cfg)
        o = constrain(o, ("batch", "length", "heads", "qkv", "kv"))
        out = jnp.einsum("btkgh,kghd->btd", o, self.out[...].astype(dt))
        if _adapter(self, "o") is not None:
            out = out + self.lora_o(o, lora_scale)
        return out, (None if cache_kv is None else (k_buf, v_buf))


class MLP(nnx.Module):
    """Gated MLP with a fused gate/up kernel [embed, 2, mlp]: SwiGLU, or GeGLU (tanh GeLU) with
    `cfg.activation='gelu_tanh'` (Gemma)."""

    def __init__(self, cfg: ModelConfig, key, lora: lora_lib.LoRAConfig | None = None):
        self.cfg = cfg
        k1, k2 = jax.random.split(key)
        _add_adapters(self, cfg, lora, ("gate", "up", "down"), key)
        self.gate_up = _param(k1, (cfg.d_model, 2, cfg.d_ff), cfg.d_model ** -0.5, ("embed", "qkv", "mlp"),
                              cfg.weight_dtype)
        self.down = _param(k2, (cfg.d_ff, cfg.d_model), cfg.d_ff ** -0.5 / math.sqrt(2 * cfg.n_layers),
                           ("mlp", "embed"), cfg.weight_dtype)

    def __call__(self, x, lora_scale=None):
        dt = self.cfg.compute_dtype
        h = jnp.einsum("btd,dcf->btcf", x, self.gate_up[...].astype(dt))
        if _adapter(self, "gate") is not None or _adapter(self, "up") is not None:
            h = h + jnp.stack([jnp.zeros(h.shape[:2] + h.shape[3:], h.dtype) if a is None else a(x, lora_scale)
                               for a in (_adapter(self, "gate"), _adapter(self, "up"))], axis=2)
        h = constrain(h, ("batch", "length", "qkv", "mlp"))
        gate = h[:, :, 0]
        gate = jax.nn.silu(gate) if self.cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        h = gate * h[:, :, 1]
        out = jnp.einsum("btf,fd->btd", h, self.down[...].astype(dt))
        if _adapter(self, "down") is not None:
            out = out + self.lora_down(h, lora_scale)
        return out


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, key, lora: lora_lib.LoRAConfig | None = None):
        k1, k2 = jax.random.split(key)
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, k1, lora)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, k2, lora)

    def __call__(self, x, rot, key_mask, cache_kv=None, index=None, lora_scale=None):
        h, new_kv = self.attn(self.attn_norm(x), rot, key_mask, cache_kv, index, lora_scale)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x), lora_scale), ("batch", "length", "act_embed"))
        return x, new_kv


class Transformer(nnx.Module):
    """Decoder: embedding -> blocks -> final RMSNorm -> (LM head, tied or not) when `lm_head`; with `lora`,
    low-rank adapters on its targeted projections (`nash_lm.models.lora`)."""

    def __init__(self, cfg: ModelConfig, key, *, lm_head: bool = True, lora: lora_lib.LoRAConfig | None = None):
        cfg.validate()
        if lora is not None:
            lora.validate(cfg)
        self.cfg = cfg
        self.lm_head = lm_head
        k_emb, k_blocks, k_head = jax.random.split(key, 3)
        self.embed = _param(k_emb, (cfg.vocab_size, cfg.d_model), cfg.d_model ** -0.5, ("vocab", "embed"),
                            cfg.weight_dtype)
        keys = jax.random.split(k_blocks, cfg.n_layers)
        if cfg.scan_layers:
            make = nnx.vmap(lambda k: Block(cfg, k, lora), in_axes=0, out_axes=0,
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            self.blocks = make(keys)
        else:
            self.blocks = nnx.List([Block(cfg, keys[i], lora) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg)
        if lm_head and not cfg.tie_embeddings:
            self.head = _param(k_head, (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5, ("embed", "vocab"),
                               cfg.weight_dtype)

    def _run_blocks(self, x, rot, key_mask, cache, index, lora_scale):
        cfg = self.cfg

        def layer(block_state, block_def, x, kv):  # kv: this layer's (k, v) or None
            block = nnx.merge(block_def, block_state)
            if kv is None:
                y, _ = block(x, rot, key_mask, lora_scale=lora_scale)
                return y, None
            return block(x, rot, key_mask, kv, index, lora_scale)

        use_remat = cfg.remat and cache is None
        if cfg.scan_layers:  # the stacked caches are scanned over with the blocks and come back stacked
            block_def, stacked = nnx.split(self.blocks)

            def body(x, xs):
                block_state, kv = xs
                return layer(block_state, block_def, x, kv)

            if use_remat:
                body = jax.checkpoint(body, prevent_cse=False)
            x, kv = jax.lax.scan(body, x, (stacked, None if cache is None else (cache.k, cache.v)))
            return x, kv
        new = []
        for i, blk in enumerate(self.blocks):
            block_def, block_state = nnx.split(blk)
            fn = lambda st, x, kv, block_def=block_def: layer(st, block_def, x, kv)
            if use_remat:
                fn = jax.checkpoint(fn, prevent_cse=False)
            x, kv = fn(block_state, x, None if cache is None else (cache.k[i], cache.v[i]))
            new.append(kv)
        return x, (None if cache is None else (tuple(k for k, _ in new), tuple(v for _, v in new)))

    def __call__(self, tokens, mask, cache: KVCache | None = None, index=None, outputs: slice = slice(None),
                 lora_scale=None):
        """tokens, mask [B, T] -> (logits [B,T',V] f32 or hidden [B,T',D] f32, updated cache or None).

        With `cache`, the T tokens go to buffer slots [index, index + T) and attend over the whole buffer.
        `outputs` (a static slice of the T positions; default all) selects the positions that get the final norm
        and the LM head: `slice(-1, None)` for the sampler's prefill, the response positions for teacher-forced
        log-probs (the head's FLOPs and the [B, T, V] logits are not spent on the prompt). `lora_scale` [B]
        multiplies the adapters' low-rank terms row by row (0: that row runs the base alone; None: 1), [B, r]
        each rank component of a row (`nash_lm.models.lora`).
        """
        cfg = self.cfg
        mask = mask.astype(jnp.int32)
        if cache is None:
            positions = positions_from_mask(mask)
            key_mask = mask
        else:
            offset = jnp.sum(cache.mask, axis=-1)  # real tokens already in the buffer
            positions = positions_from_mask(mask, offset)
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, index, axis=1)
        # FSDP semantics: gather the (vocab/embed-sharded) table before the lookup; a gather from a table
        # sharded along the looked-up axis would force XLA into a full rematerialisation.
        table = constrain(self.embed[...], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        rot = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        x, kv = self._run_blocks(x, rot, key_mask, cache, index, lora_scale)
        x = x[:, outputs]
        x = self.final_norm(x)
        new_cache = None if cache is None else KVCache(kv[0], kv[1], key_mask)
        if not self.lm_head:
            return x.astype(jnp.float32), new_cache
        w = self.embed[...].T if cfg.tie_embeddings else self.head[...]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab")), new_cache
