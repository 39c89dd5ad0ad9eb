"""Device mesh, logical-axis rules and the one parameter-sharding tree.

What this module owns:
  * `make_mesh(mesh_config)`: a `jax.sharding.Mesh` over the axes ('data', 'fsdp', 'tensor') from a config
    (ConfigDict / mapping {axis: size} or a sequence of (axis, size) pairs). One size may be -1 (auto-fill);
    the product must equal the device count. Errors are one-line ValueErrors naming the field.
  * Logical-axis rules: a priority-ordered list of (logical, mesh_axes) pairs, mesh_axes a mesh-axis name,
    a tuple of names, or None. A logical name may appear several times: the first rule whose mesh axes are
    still free in that array and divide that dimension wins, otherwise the dimension is replicated.
    `validate_rules` rejects unknown logical or mesh axis names before anything is compiled.
  * `param_shardings(params, mesh, rules)`: the `NamedSharding` tree for a parameter `nnx.State` (concrete or
    abstract), derived from the logical axis names each `nnx.Param` carries in its `out_sharding` metadata.
    Policy, reference and EMA trees have the same structure, so this one tree serves all three.
  * `batch_sharding` / `shard_batch`: leading dimension over the 'batch' rule, the rest replicated.
  * `activate(mesh, rules)`: context (jax.set_mesh + flax logical rules) under which the model's activation
    sharding constraints (`constrain`) take effect; outside it they are no-ops.
  * The decode layout: the sampler's KV-cached decode loop runs a forward pass per generated token, so weights
    laid out for training (FSDP: 'embed' over 'fsdp') would be all-gathered inside the loop at every token.
    `DEFAULT_DECODE_RULES` (the training defaults with 'embed' and 'vocab' replicated: weights whole on every
    device of a tensor group, tensor-parallel over 'tensor'; batch over ('data', 'fsdp')) and, for models
    whose compute-dtype copy does not fit a device, `decode_rules_for(model_axes)` (heads / mlp over
    `model_axes`, batch over the other axes; `TENSOR_DECODE_RULES` = over ('fsdp', 'tensor')) are rules for that
    phase. The KV cache stays local only when the heads axes divide n_kv_heads (8 KV heads on fsdp 16 would
    gather the cache at every token), so `tensor_decode_rules(mesh, n_kv_heads, d_ff)` and
    `choose_decode_rules(param_bytes, mesh, budget_bytes, n_kv_heads, d_ff)` pick the axes by the model's head
    counts (the latter the fewest that fit the budget). `relayout(tree, rules,
    dtype)` re-lays a parameter tree once (inside a jitted function, under `activate`: cast to `dtype`, then
    `with_sharding_constraint` to the rules' layout, behind an optimization barrier), and `using_rules(rules)` switches the activation rules
    for the code traced inside it. `nash_lm.sampling.decode_layout` combines them for the training step.

Usage:
    mesh = make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    rules = validate_rules(config.rules, mesh)
    graphdef, params = nash_lm.models.init(cfg, 'lm', seed=0)
    shardings = param_shardings(params, mesh, rules)
    params = jax.device_put(params, shardings)       # same `shardings` for ref and EMA
    with activate(mesh, rules):
      step = jax.jit(fn, in_shardings=(shardings, ...))
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by nash_lm.models. Parameters: embed, mlp, heads, kv, vocab, layers.
# Activations: batch, length, act_embed (the residual width of activations, normally replicated),
# heads, kv, mlp, vocab. 'qkv' is the fused q/k/v slot axis (never sharded). 'lora' is the rank axis of the
# low-rank adapters (`nash_lm.models.lora`): `validate_rules` maps it to None (replicated) unless a rule names it.
LOGICAL_AXES = ("batch", "length", "embed", "act_embed", "mlp", "heads", "kv", "qkv", "vocab", "layers", "lora")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("batch", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("kv", None),
    ("qkv", None),
    ("layers", None),
)

# The decode's layout (see the module docstring): no weight is sharded over 'fsdp' or 'data', so the
# decode loop's per-token forward passes need no weight collective; activations and the KV cache keep the
# batch over ('data', 'fsdp') and heads over 'tensor'. 'vocab' is replicated too: the embedding lookup needs
# the whole table, and a vocab-sharded table would be gathered at every token.
DEFAULT_DECODE_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, None) if name in ("embed", "vocab") else (name, axes) for name, axes in DEFAULT_RULES)

def decode_rules_for(model_axes: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """Decode rules with every weight's 'heads' and 'mlp' axes over `model_axes` (mesh axes, together; () =
    weights whole), 'embed' and 'vocab' whole, and the batch of activations and of the KV cache over the other
    mesh axes (all of them, else each alone). The fused q/k/v kernel's 'heads' axis is the KV-head axis, so when
    the product of `model_axes` divides n_kv_heads (and d_ff) the KV cache is sharded exactly like the
    attention weights and activations that read and write it: it never moves. No fallback for 'heads' or 'mlp'
    on purpose: a second choice for some arrays only would lay weights and activations differently."""
    model_axes = tuple(model_axes)
    rest = tuple(a for a in MESH_AXES if a not in model_axes)
    model = (model_axes or None) if len(model_axes) != 1 else model_axes[0]
    return (("batch", rest),) + tuple(("batch", a) for a in rest) + (
        ("embed", None), ("mlp", model), ("heads", model), ("vocab", None), ("act_embed", None),
        ("length", None), ("kv", None), ("qkv", None), ("layers", None))


# Tensor parallelism over ('fsdp', 'tensor') together, batch over 'data': for models whose decode copy does not
# fit a device AND whose KV heads and d_ff divide fsdp x tensor. Otherwise use `choose_decode_rules` (or
# `tensor_decode_rules`), which pick the mesh axes by the model's head counts.
TENSOR_DECODE_RULES: tuple[tuple[str, Any], ...] = decode_rules_for(("fsdp", "tensor"))


# ----------------------------------------------------------------------------------------------- mesh


def mesh_shape(mesh_config: Any, n_devices: int) -> dict[str, int]:
    """Resolves the mesh sizes (with -1 auto-fill) for `n_devices`; ValueError naming the field on error."""
    if hasattr(mesh_config, "to_dict"):
        mesh_config = mesh_config.to_dict()
    if isinstance(mesh_config, Mapping):
        items = list(mesh_config.items())
    else:
        items = [tuple(p) for p in mesh_config]
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh.{name}: unknown mesh axis (known: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise ValueError(f"mesh.{name}: axis given twice")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r}: must be a positive integer or -1 (auto-fill)")
        sizes[name] = int(size)
    for name in MESH_AXES:
        sizes.setdefault(name, 1)
    auto = [n for n in MESH_AXES if sizes[n] == -1]
    if len(auto) > 1:
        raise ValueError(f"mesh.{auto[1]}=-1: only one axis may be -1 (auto-fill); {auto[0]} already is")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if n_devices % fixed:
            raise ValueError(f"mesh.{auto[0]}=-1: the other axes' product {fixed} does not divide the "
                             f"device count {n_devices}")
        sizes[auto[0]] = n_devices // fixed
    elif fixed != n_devices:
        shape = "x".join(str(sizes[n]) for n in MESH_AXES)
        raise ValueError(f"mesh: product of axes {shape}={fixed} does not equal the device count {n_devices}")
    return {n: sizes[n] for n in MESH_AXES}


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'tensor') (Auto axis types) from a config; see `mesh_shape`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(tuple(sizes[n] for n in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------- rules


def _as_axes(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def validate_rules(rules: Iterable[Any] | None = None, mesh: Mesh | Sequence[str] | None = None
                   ) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Normalises rules to ((logical, mesh_axes|None), ...) (with ('lora', None) last when no rule names 'lora');
    ValueError naming the rule on unknown names."""
    if rules is None:
        rules = DEFAULT_RULES
    if hasattr(rules, "to_dict"):
        rules = rules.to_dict()
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if mesh is None:
        names = MESH_AXES
    elif hasattr(mesh, "axis_names"):  # a Mesh or an AbstractMesh
        names = tuple(mesh.axis_names)
    else:
        names = tuple(mesh)
    out = []
    for i, rule in enumerate(rules):
        try:
            logical, mesh_axes = rule
        except (TypeError, ValueError):
            raise ValueError(f"rules[{i}]={rule!r}: a rule is a pair (logical, mesh_axes)") from None
        if logical not in LOGICAL_AXES:
            raise ValueError(f"rules[{i}]: unknown logical axis {logical!r} (known: {', '.join(LOGICAL_AXES)})")
        axes = _as_axes(mesh_axes)
        for a in axes:
            if a not in names:
                raise ValueError(f"rules[{i}] ({logical!r}): unknown mesh axis {a!r} (mesh axes: {', '.join(names)})")
        if len(set(axes)) != len(axes):
            raise ValueError(f"rules[{i}] ({logical!r}): mesh axis repeated in {axes}")
        out.append((logical, axes if axes else None))
    if not any(logical == "lora" for logical, _ in out):  # the adapters' rank axis: replicated unless ruled
        out.append(("lora", None))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules, mesh_sizes: Mapping[str, int],
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec: first rule whose mesh axes are unused and divide the dim."""
    used: set[str] = set()
    spec = []
    for d, name in enumerate(logical_axes):
        chosen = None
        if name is not None:
            for logical, axes in rules:
                if logical != name:
                    continue
                axes = tuple(a for a in _as_axes(axes) if mesh_sizes.get(a, 1) > 1)
                if not axes:
                    break
                if used.intersection(axes):
                    continue
                n = math.prod(mesh_sizes[a] for a in axes)
                if shape is not None and shape[d] % n:
                    continue
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _logical_axes(var: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    axes = var.get_metadata().get("out_sharding") or ()
    axes = tuple(axes)
    if len(axes) != ndim:
        raise ValueError(f"parameter with shape of rank {ndim} carries logical axes {axes} of another rank")
    return axes


def param_specs(params, mesh: Mesh, rules=None):
    """PartitionSpec tree (same structure as `params`) from each Param's logical axes and the rules."""
    rules = validate_rules(rules, mesh)
    sizes = _mesh_sizes(mesh)

    def f(v):
        if isinstance(v, nnx.Variable):
            shape = v.get_value().shape
            return v.replace(logical_to_spec(_logical_axes(v, len(shape)), rules, sizes, shape))
        return logical_to_spec((None,) * np.ndim(v), rules, sizes)

    return jax.tree.map(f, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params, mesh: Mesh, rules=None):
    """The NamedSharding tree for `params` (concrete or abstract nnx.State); reuse it for policy, ref, EMA."""
    specs = param_specs(params, mesh, rules)
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def describe_shardings(params, shardings) -> list[str]:
    """One line per parameter: path, shape, dtype, PartitionSpec (for logging at start-up)."""
    lines = []
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        lines.append(f"{name:60s} {str(tuple(leaf.shape)):20s} {str(leaf.dtype):9s} {sh.spec}")
    return lines


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a [batch, ...] array: leading dim over the 'batch' rule, other dims replicated."""
    rules = validate_rules(rules, mesh)
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, _mesh_sizes(mesh), shape)
    return NamedSharding(mesh, spec)


def shard_batch(batch, mesh: Mesh, rules=None):
    """device_put every array of a batch pytree with its leading dimension sharded over 'batch'."""
    rules = validate_rules(rules, mesh)
    return jax.tree.map(
        lambda x: jax.device_put(x, batch_sharding(mesh, rules, np.ndim(x), np.shape(x)[0])), batch)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=None):
    """Sets the mesh (jax.set_mesh) and the logical rules (flax) so `constrain` shards activations."""
    rules = validate_rules(rules, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint from logical names, under `activate`; a no-op without mesh and rules."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, _mesh_sizes(mesh), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------------------------- decode layout


def relayout(tree, rules, dtype=None):
    """`tree` (a parameter nnx.State, or None) re-laid to `rules`' layout inside a jitted function, under
    `activate`: each floating matrix is first cast to `dtype` (None: kept; the model casts weights to its
    compute dtype at use, so the decode reads the same values either way, and the cast before the constraint
    halves the bytes moved for float32 masters with bfloat16 compute), then constrained
    (`jax.lax.with_sharding_constraint`) to the PartitionSpec the rules give its logical axes. The compiler
    moves each weight once, where the constraint sits, instead of inside the loops that use it.

    A no-op (the tree returned as is) when `rules` is None, when `tree` is None or outside `activate`."""
    if tree is None or rules is None:
        return tree
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return tree
    rules = validate_rules(rules, mesh)
    sizes = _mesh_sizes(mesh)

    def f(v):
        if not isinstance(v, nnx.Variable):
            return v
        value = v.get_value()
        axes = _logical_axes(v, np.ndim(value))
        spec = logical_to_spec(axes, rules, sizes, np.shape(value))
        if dtype is not None and jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
            if sum(a != "layers" for a in axes) >= 2:
                value = value.astype(dtype)
        return v.replace(jax.lax.with_sharding_constraint(value, spec))

    # The barrier keeps the moved copy where it is: without it XLA may merge the move with an identical one
    # elsewhere in the step (the update's gather of the same frozen weights) and sink it into the decode loop.
    return jax.lax.optimization_barrier(jax.tree.map(f, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@contextlib.contextmanager
def using_rules(rules):
    """The logical rules of the activation constraints (`constrain`) traced inside this context; a no-op when
    `rules` is None or outside `activate` (no rules set)."""
    if rules is None or not flax_spmd.get_logical_axis_rules():
        yield
        return
    mesh = jax.sharding.get_abstract_mesh()
    with nnx.logical_axis_rules(validate_rules(rules, mesh if not mesh.empty else None)):
        yield


def _model_axes_candidates(sizes: Mapping[str, int], n_kv_heads: int | None, d_ff: int | None):
    """Subsets of ('fsdp', 'tensor') (axes of size 1 left out) whose product divides n_kv_heads and d_ff, by
    increasing product ('tensor' alone before 'fsdp' alone at equal size)."""
    axes = [a for a in ("tensor", "fsdp") if sizes.get(a, 1) > 1]
    subsets = [()] + [(a,) for a in axes] + ([("fsdp", "tensor")] if len(axes) == 2 else [])
    ok = []
    for sub in subsets:
        n = math.prod(sizes[a] for a in sub)
        if all(x is None or x % n == 0 for x in (n_kv_heads, d_ff)):
            ok.append((n, sub))
    return [sub for _, sub in sorted(ok, key=lambda t: t[0])]


def _sizes_of(mesh) -> dict[str, int]:
    return dict(mesh) if isinstance(mesh, Mapping) else _mesh_sizes(mesh)


def tensor_decode_rules(mesh, n_kv_heads: int, d_ff: int | None = None):
    """Tensor-parallel decode rules over the largest of ('fsdp', 'tensor'), 'fsdp', 'tensor' whose size divides
    n_kv_heads (and d_ff), batch over the rest: the KV cache stays local (`decode_rules_for`). With none
    (e.g. 8 KV heads on fsdp 16, tensor 1) the weights stay whole: `DEFAULT_DECODE_RULES`."""
    subs = _model_axes_candidates(_sizes_of(mesh), n_kv_heads, d_ff)
    best = subs[-1]
    return DEFAULT_DECODE_RULES if set(best) <= {"tensor"} else decode_rules_for(best)


def choose_decode_rules(param_bytes: int, mesh, budget_bytes: int, n_kv_heads: int | None = None,
                        d_ff: int | None = None):
    """The decode rules that shard the decode's weights (`param_bytes`: the compute-dtype bytes of every tree
    the decode runs, e.g. policy + mu) over the fewest devices such that they fit `budget_bytes` per device:
    `DEFAULT_DECODE_RULES` (whole per 'tensor' group) when that fits, else tensor parallelism over 'fsdp', then
    over ('fsdp', 'tensor'), only over axes whose size divides `n_kv_heads` and `d_ff` (when given), so that
    the KV cache is sharded like the attention that reads it and never moves (`decode_rules_for`). `mesh` is a
    Mesh or {axis: size}. ValueError (one line) when no such layout fits."""
    sizes = _sizes_of(mesh)
    for sub in _model_axes_candidates(sizes, n_kv_heads, d_ff):
        if param_bytes / math.prod(sizes[a] for a in sub) <= budget_bytes:
            return DEFAULT_DECODE_RULES if set(sub) <= {"tensor"} else decode_rules_for(sub)
    shape = ", ".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)
    raise ValueError(f"decode_rules: the decode's weights ({param_bytes / 2**30:.1f} GiB) fit {budget_bytes / 2**30:.1f} "
                     f"GiB per device on no mesh axes that divide n_kv_heads={n_kv_heads} and d_ff={d_ff} "
                     f"(mesh {shape}); give the mesh a 'tensor' axis that divides them")
