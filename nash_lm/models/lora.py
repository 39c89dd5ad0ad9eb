"""Low-rank adapters (LoRA) on the decoder's projections: their configuration, the adapter layer, and the
parameter trees of an adapted model (split, join, merge).

An adapted projection computes W x + s · B(A x), s = alpha / rank, with A [in, r] drawn like a weight of fan-in
`in` and B [r, out] zero, so that the adapted model equals its base exactly at step 0 (the low-rank term is an
exact 0 added to the base output). The adapters are `nnx.LoRAParam`s (a subclass of `nnx.Param`) carrying
logical axes like every other parameter: the projection's own axes on its side, 'lora' (replicated by default,
see `nash_lm.parallel`) on the rank side, and 'layers' for stacked blocks. A per-row `lora_scale` given to the
decoder multiplies the low-rank term row by row: [B] scales a row's whole term (0 runs the base alone there),
[B, r] each of its rank components (a row keeps its half of two adapter sets concatenated along the rank). The
token-level mixture decode runs π = base + adapters and μ = base (or base + other adapters) in one pass over
the base weights that way (`nash_lm.sampling`).

Targets (`TARGETS`): the attention's query, key, value and output projections 'q', 'k', 'v', 'o' (q/k/v are slots
of the fused kernel, so an adapter on 'q' adds its low-rank term to the query slots only) and the MLP's 'gate',
'up', 'down'. The rank may not exceed the smaller dimension of any targeted projection.

Trees: an adapted decoder's parameter State holds the base's parameters under the same paths as the plain
decoder's State, plus the adapters. `split(params) -> (adapters, base)` and `join(adapters, base)` convert
between them (no copies), so the base State of a plain checkpoint is the frozen half of an adapted model;
`is_adapters(tree)` tells a trained adapter tree from a full one, and `merge(cfg, lora, params)` folds the
adapters into the base weights (a plain State for exports).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r >= 1, alpha (the low-rank term is scaled by alpha / r) and the targeted projections."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def validate(self, cfg) -> "LoRAConfig":
        """One-line ValueErrors starting with the field ('rank', 'targets', 'alpha'); returns self."""
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets: {unknown[0] if unknown else 'empty'!r} matches no projection "
                             f"(known: {', '.join(TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: repeated in {list(self.targets)}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank: must be > 0, got {self.rank!r}")
        limit = max_rank(cfg, self.targets)
        if self.rank > limit:
            raise ValueError(f"rank: {self.rank} exceeds {limit}, the smaller dimension of a targeted projection")
        if not float(self.alpha) > 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha!r}")
        return self


def shapes(cfg, target: str):
    """((input dims, their logical axes), (output dims, their logical axes)) of a target's projection."""
    d, kv, g, hd, f = cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.d_ff
    embed = ((d,), ("embed",))
    return {
        "q": (embed, ((kv, g, hd), ("heads", "qkv", "kv"))),
        "k": (embed, ((kv, hd), ("heads", "kv"))),
        "v": (embed, ((kv, hd), ("heads", "kv"))),
        "o": (((kv, g, hd), ("heads", "qkv", "kv")), embed),
        "gate": (embed, ((f,), ("mlp",))),
        "up": (embed, ((f,), ("mlp",))),
        "down": (((f,), ("mlp",)), embed),
    }[target]


def max_rank(cfg, targets=TARGETS) -> int:
    """The largest rank every targeted projection allows (its smaller dimension)."""
    return min(min(math.prod(shapes(cfg, t)[0][0]), math.prod(shapes(cfg, t)[1][0])) for t in targets)


class Adapter(nnx.Module):
    """The low-rank term s · B(A x) of one projection: x [B, T, *in] -> [B, T, *out]."""

    def __init__(self, cfg, lora: LoRAConfig, target: str, key):
        (in_dims, in_axes), (out_dims, out_axes) = shapes(cfg, target)
        fan_in = math.prod(in_dims)
        self.scale = lora.scale
        self.dtype = cfg.compute_dtype
        a = (fan_in ** -0.5 * jax.random.normal(key, in_dims + (lora.rank,), jnp.float32)).astype(cfg.weight_dtype)
        self.a = nnx.LoRAParam(a, out_sharding=in_axes + ("lora",), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((lora.rank,) + out_dims, cfg.weight_dtype),
                               out_sharding=("lora",) + out_axes, eager_sharding=False)

    def __call__(self, x, row_scale=None):
        n_in = self.a.ndim - 1
        h = jnp.tensordot(x, self.a[...].astype(self.dtype), axes=n_in) * jnp.asarray(self.scale, self.dtype)
        if row_scale is not None:  # [B]: the row's term; [B, r]: each rank component of the row
            rs = row_scale.astype(self.dtype)
            h = h * (rs[:, None, None] if rs.ndim == 1 else rs[:, None, :])
        return jnp.tensordot(h, self.b[...].astype(self.dtype), axes=1)


def adapter_key(key, target: str):
    """The key of a target's adapter, derived apart from the base's keys (the base draws the same weights
    with or without adapters)."""
    return jax.random.fold_in(key, 1 + TARGETS.index(target))


# ---------------------------------------------------------------------------------------------------------------
# Trees of an adapted model


def split(params):
    """(adapters, base) of an adapted model's parameter State."""
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    return adapters, base


def join(adapters, base):
    """The adapted model's parameter State from its adapters and a base State (the plain decoder's)."""
    return nnx.merge_state(base, adapters)


def trained_head(var: nnx.Variable) -> nnx.LoRAParam:
    """A judge's fresh score head in an adapted judge: trained with the adapters (an `nnx.LoRAParam`, so that
    `split` puts it on the adapters' side), a plain `nnx.Param` again in `merge`'s output."""
    return nnx.LoRAParam(var.get_value(), **var.get_metadata())


def is_adapters(tree) -> bool:
    """Whether `tree` (a parameter State) holds adapters only (the trained tree of a LoRA stage)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return bool(leaves) and all(isinstance(v, nnx.LoRAParam) for v in leaves)


def _delta(a, b, layered: bool):
    """s-less weight update A ⊗ B [*in, *out] (with a leading layer axis on both when `layered`)."""
    fn = lambda a, b: jnp.tensordot(a, b, axes=1)
    return jax.vmap(fn)(a, b) if layered else fn(a, b)


def merge(cfg, lora: LoRAConfig, params):
    """The plain model's State with every adapter folded into its projection: W + s · A ⊗ B (float32 sums,
    stored in the base's dtype). The merged model computes the adapted model's function. For a judge the
    decoder is its 'backbone' and the trained head comes back as plain parameters."""
    adapters, base = split(params)
    base = jax.tree.map(lambda v: v.replace(v.get_value()), base, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if "backbone" in base:  # a preference or reward model: the adapted decoder under 'backbone', then the head
        _fold_decoder(cfg, lora, base["backbone"], adapters["backbone"])
        head = nnx.State({k: v for k, v in adapters.items() if k != "backbone"})
        head = jax.tree.map(lambda v: nnx.Param(v.get_value(), **v.get_metadata()), head,
                            is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge_state(base, head)
    _fold_decoder(cfg, lora, base, adapters)
    return base


def _fold_decoder(cfg, lora: LoRAConfig, base, adapters):
    """Adds each adapter's s · A ⊗ B into the decoder State `base` (in place)."""
    layered = cfg.scan_layers
    g = cfg.group_size
    slot = {"q": (slice(None), slice(0, g)), "k": (slice(None), g), "v": (slice(None), g + 1),
            "gate": (0,), "up": (1,)}

    def fold(block_base, block_ad):
        attn, mlp = block_base["attn"], block_base["mlp"]
        for target in lora.targets:
            owner = "attn" if target in ("q", "k", "v", "o") else "mlp"
            ad = block_ad[owner][f"lora_{target}"]
            d = lora.scale * _delta(ad["a"][...].astype(jnp.float32), ad["b"][...].astype(jnp.float32), layered)
            name = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "out", "gate": "gate_up", "up": "gate_up",
                    "down": "down"}[target]
            var = (attn if owner == "attn" else mlp)[name]
            w = var[...].astype(jnp.float32)
            lead = (slice(None),) * (1 + layered)  # the input axis (and the layer axis)
            idx = lead + slot.get(target, ())
            w = w.at[idx].add(d) if target in slot else w + d
            var.set_value(w.astype(var[...].dtype))

    if layered:
        fold(base["blocks"], adapters["blocks"])
    else:
        for i in adapters["blocks"]:
            fold(base["blocks"][i], adapters["blocks"][i])
