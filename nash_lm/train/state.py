"""The train state and its shardings.

`TrainState(step, rng, policy, opt_state, ema, anchor, magnet, predictor)` is one pytree: everything a training
step updates, which the compiled step donates and a checkpoint stores (and a resume restores). The extra trees
`ema`, `anchor`, `magnet` and `predictor` are the ones an algorithm `keeps`
(`nash_lm.train.algorithms.base.Algorithm`; each a copy of the policy at step 0, updated by the algorithm's
`advance`), None otherwise, so a state without them is the same pytree as before they existed. `policy` and
the extra trees have the same structure and are placed by the *same* sharding tree (from
`nash_lm.parallel.param_shardings`); the optimizer state's parameter-shaped parts (Adam moments) reuse it too
and its scalars (counts) are replicated.

The frozen inputs are not part of it: the step functions of `nash_lm.train.step` take them as a separate,
never donated argument, the typed record `Frozen` (the reference mu, the judge's parameters, a LoRA base), and
the stage re-reads them from their input stages' exports on resume.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken
    rng: jax.Array  # uint32 [2], raw PRNG key data
    policy: Any  # trained parameters (an LM, or a preference/reward model in judge stages; a LoRA stage: adapters)
    opt_state: Any
    ema: Any = None  # EMA of the policy parameters (Nash-EMA-PG), else None
    anchor: Any = None  # pi_t, the policy at the start of the current round (INPO, SPPO), else None
    magnet: Any = None  # the magnet of magnetic mirror descent (MPO), else None
    predictor: Any = None  # the optimistic predictor pi_bar (ONPO), else None

    def extras(self) -> dict:
        """{name: tree} of the extra trees this state keeps."""
        return {k: getattr(self, k) for k in EXTRA_TREES if getattr(self, k) is not None}


EXTRA_TREES = ("ema", "anchor", "magnet", "predictor")


class Frozen(NamedTuple):
    """The frozen inputs of a step (never donated, not checkpointed: re-read from the input stages' exports)."""

    ref: Any = None  # policy stages: mu (with LoRA: the base in the adapted structure, zero adapters)
    judge: Any = None  # policy stages: a trained judge's parameters (None for an oracle)
    base: Any = None  # SFT / judge stages with LoRA: the frozen base the trained adapters are joined with


def make_optimizer(st) -> optax.GradientTransformation:
    """AdamW with warmup + constant/linear/cosine schedule and optional global-norm clipping, from a stage."""
    decay_steps = max(st.steps - st.warmup_steps, 1)
    if st.lr_schedule == "constant":
        after = optax.constant_schedule(st.lr)
    elif st.lr_schedule == "linear":
        after = optax.linear_schedule(st.lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(st.lr, decay_steps)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, st.lr, st.warmup_steps), after],
                                    [st.warmup_steps]) if st.warmup_steps else after
    chain = [optax.clip_by_global_norm(st.grad_clip)] if st.grad_clip > 0 else []
    chain.append(optax.adamw(schedule, b1=st.b1, b2=st.b2, weight_decay=st.weight_decay))
    return optax.chain(*chain)


def state_shardings(abstract_state: TrainState, param_sharding, tx: optax.GradientTransformation, mesh):
    """A sharding tree for `abstract_state`: params/EMA by `param_sharding`, optimizer moments likewise."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state.opt_state, param_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return TrainState(
        step=replicated,
        rng=replicated,
        policy=param_sharding,
        opt_state=opt_sh,
        **{k: param_sharding for k in abstract_state.extras()},
    )


def init_state(policy, tx, seed: int, *, keeps: tuple = ()) -> TrainState:
    """A fresh state (to be called under jit with out_shardings, or eagerly on already-placed params); `keeps`:
    the extra trees (EXTRA_TREES) it holds, each a copy of `policy`."""
    unknown = sorted(set(keeps) - set(EXTRA_TREES))
    if unknown:
        raise ValueError(f"init_state: unknown extra tree(s) {unknown}; known: {list(EXTRA_TREES)}")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        policy=policy,
        opt_state=tx.init(policy),
        **{k: jax.tree.map(jnp.copy, policy) for k in keeps},
    )
