"""Batched autoregressive sampling: plain, token-level geometric-mixture, and both at once, pure jittable functions.

`sample(graphdef, params, prompts, prompt_mask, rng, *, max_new_tokens, eos_id, pad_id, temperature=1.0,
top_k=0, top_p=1.0, mix_params=None, beta=0.0) -> Samples`

  * prompts [B, Tp] int32, left-padded (prompt_mask 1 on real tokens). One prefill over the prompt fills a
    KV cache with room for the first GROW = 128 new tokens, then a `lax.while_loop` decodes one token per
    iteration over that cache, stopping early once every row has emitted `eos_id` (None: never stop early).
    Longer completions run one loop per GROW tokens, the caches grown by GROW slots in between, so that a
    decode step attends over at most GROW − 1 empty slots instead of the whole final buffer (its cost is set by
    the buffer size). `cache_len` instead fixes one buffer of that size for the whole decode.
  * Plain mode (mix_params None): token n is drawn from log π_T = log_softmax(policy_logits / T).
  * Geometric-mixture mode (App. F.1 of Munos et al., the one-step-at-a-time regularised policy): with the
    second tree μ (reference or EMA, same graphdef) token n is drawn from
        log π̃ = (1 − β)·log_softmax(policy / T) + β·log_softmax(μ / T) − log C(prefix),
    and both KV caches advance with the drawn token. β may be a traced scalar (a schedule).
  * top_k (static int, 0 = off) and top_p (1.0 = off) restrict the sampling distribution after mixing;
    it is renormalised over the kept tokens.
  * Sampling is Gumbel-max: argmax((1 − β)·z_π/T + β·z_μ/T + G) (the mixture up to a per-row constant),
    with G drawn once for the whole decode ([N, B, V], or one [B, V] draw per step when that would exceed
    `predraw_limit` elements). With β = 0 the argmax input is exactly the policy's z_π/T + G, with β = 1
    exactly μ's, so the same rng gives exactly the tokens of plain sampling from the policy or from μ.
    `rng` may also be a tuple of k keys: the rows are then k equal blocks, block j drawing its noise from
    key j exactly as a call on those rows alone with that key would.
  * Returns `Samples(tokens, mask, logp_policy, logp_ref, logp_sample)`, all [B, N]: tokens int32 (pad_id
    after the first EOS), mask int32 (1 up to and including the first EOS), and float32 log-probabilities of
    the chosen tokens under π_T, μ_T (= π_T when mix_params is None) and the actual sampling distribution
    (mixture, top-k/top-p, renormalised), all at temperature T; 0 where mask is 0.

`sample_pair(...)` (same arguments) returns `(y, y2)`: y ~ π and y2 ~ π^(1−β)·μ^β for the same prompts, the
pair a Nash-MD-PG step needs, from ONE decode loop over 2B rows instead of two loops of B: the policy runs on
the y rows and, unless β = 1, the y2 rows (one call on 2B rows); μ runs only on the y2 rows (none when β = 0 or
mix_params is None); the prompt is prefilled once per tree and the policy's cache copied for the y2 rows. With
`rng = (key_y, key_y2)` its tokens are those of `sample(..., rng=key_y)` and `sample(..., mix_params, beta,
rng=key_y2)` (up to floating-point ties): the same distribution, half the sequential decode iterations.

LoRA (`mix_params=ADAPTERS_OFF` or `mix_params=Adapters(tree)`; the policy an adapted decoder,
`nash_lm.models.lora`): the second model is the policy's own base, with its adapters off (ADAPTERS_OFF: μ = the
reference of a LoRA policy stage) or with another set of adapters on the same base (`Adapters`: the Nash-EMA-PG
EMA of the adapters). The prefill and every decode step then run the model ONCE over the policy's rows and the
second model's rows together, with a per-row scale on the adapters' low-rank terms (`lora_scale`): with
ADAPTERS_OFF 1 on the policy's rows and 0 on μ's, so μ's rows compute the base exactly (the low-rank term is an
exact 0 there); with `Adapters` the two sets are concatenated along the rank and each row's scale [2r] keeps
its own set's half. Each layer's base weights are read once per step for both models. The tokens are those of
the same decode with the adapters merged into two separate trees (up to floating-point ties).

The mechanism behind both is `decode`'s row layout: the policy covers rows [0, Rp) and μ the last Rm of the R
rows, with Rp + Rm ≥ R; rows covered by both sample the mixture, the others their one model. Plain sampling is
Rp = R, Rm = 0; the mixture Rp = Rm = R; the pair R = 2B with Rp ∈ {B, 2B}, Rm ∈ {0, B}.

`decode_layout(graphdef, rules)` is the context a jitted caller (the training step) samples in: it yields
`to_decode(params)`, the tree re-laid once to the decode's layout (`nash_lm.parallel.relayout`: matrices cast
to the model's compute dtype, then constrained to `rules`, by default `parallel.DEFAULT_DECODE_RULES`), and
traces the activation constraints inside it with `rules`, so the decode loop moves no weights per token.
`rules=None` leaves everything as laid out for training.

`sample` = `decode(prefill(...))` (named scopes 'prefill' and 'decode': the decode loops' op_name in the HLO
ends in 'decode/while'); both halves are public (pure, jittable) so that a caller can time or
schedule them separately (bench/sampling.py times the decode loop alone).

The functions are pure (no host callbacks, no Python side effects beyond shape checks) and can be called
inside another `jax.jit` (the training step does). Remat is never applied on this path. Shape errors
(prompt longer than ModelConfig.max_len, bad arguments) raise ValueError naming the field while tracing,
i.e. before compiling.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nash_lm import parallel
from nash_lm.models import KVCache, init_cache, lora
from nash_lm.parallel import constrain

__all__ = ["Samples", "Prefilled", "sample", "sample_pair", "prefill", "decode", "filter_logits", "sample_jit",
           "decode_layout", "ADAPTERS_OFF", "Adapters", "same_base"]

GROW = 128  # the decode's KV buffers start with room for GROW new tokens and grow by GROW slots


class _AdaptersOff:
    """The `mix_params` meaning "μ = the policy's base, adapters off" (a pytree with no leaves, so it passes
    through `jax.jit` and tree maps as static structure)."""

    def __repr__(self):
        return "sampling.ADAPTERS_OFF"


ADAPTERS_OFF = _AdaptersOff()
jax.tree_util.register_pytree_node(_AdaptersOff, lambda x: ((), None), lambda aux, children: ADAPTERS_OFF)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tree"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Adapters:
    """The `mix_params` meaning "the second model = the policy's base with these adapters" (`tree`: an adapter
    State of the policy's structure, e.g. the EMA of a LoRA stage's adapters)."""
    tree: object


def same_base(mix_params) -> bool:
    """Whether `mix_params` names a second model on the policy's own base (ADAPTERS_OFF or `Adapters`), which
    the sampler runs in the policy's pass."""
    return mix_params is ADAPTERS_OFF or isinstance(mix_params, Adapters)


def _one_pass(params, mix_params, rp: int, rm: int):
    """(parameters, lora_scale) of one model pass over rp policy rows then rm rows of the second model on the
    same base (`same_base(mix_params)`): ADAPTERS_OFF scales the adapters by 1 on the policy's rows and 0 on the
    others ([rp + rm]); `Adapters` concatenates the policy's adapters and the second set along the rank axis and
    gives each row the half of its own set ([rp + rm, r + r2])."""
    if mix_params is ADAPTERS_OFF:
        return params, jnp.concatenate([jnp.ones((rp,), jnp.float32), jnp.zeros((rm,), jnp.float32)])
    pol, base = lora.split(params)
    ranks = []

    def cat(a, b):
        axis = a.get_metadata()["out_sharding"].index("lora")
        ranks.append((a.shape[axis], b.shape[axis]))
        return a.replace(jnp.concatenate([a.get_value(), b.get_value().astype(a.dtype)], axis=axis))

    both = jax.tree.map(cat, pol, mix_params.tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    r, r2 = ranks[0]
    first = jnp.concatenate([jnp.ones((r,), jnp.float32), jnp.zeros((r2,), jnp.float32)])  # the policy's half
    return lora.join(both, base), jnp.concatenate([jnp.tile(first, (rp, 1)), jnp.tile(1.0 - first, (rm, 1))])


class Samples(NamedTuple):
    tokens: jax.Array       # [B, N] int32
    mask: jax.Array         # [B, N] int32, 1 up to and including the first EOS
    logp_policy: jax.Array  # [B, N] float32, log π_T(token)
    logp_ref: jax.Array     # [B, N] float32, log μ_T(token) (the policy's when no mix_params)
    logp_sample: jax.Array  # [B, N] float32, log of the sampling distribution at the token

    def split(self, b: int) -> tuple["Samples", "Samples"]:
        """(rows [0, b), rows [b, ...)): the two halves of a sample drawn for the prompts twice."""
        return Samples(*(x[:b] for x in self)), Samples(*(x[b:] for x in self))


def _is_static(x, value) -> bool:
    return isinstance(x, (int, float)) and float(x) == value


def filter_logits(logits: jax.Array, top_k: int = 0, top_p=1.0) -> jax.Array:
    """Sets to -inf the tokens outside the top-k and outside the nucleus of mass top_p (keeps ≥ 1 token)."""
    v = logits.shape[-1]
    if top_k and top_k < v:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if not _is_static(top_p, 1.0):
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first index of the maximum) as two plain reductions, a max and a min over the
    indices attaining it: XLA:CPU emits the fused (value, index) reduction of argmax as a scalar loop."""
    v = x.shape[-1]
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first, v - 1)  # a valid id even for NaN logits (the step's finiteness check reports those)


def _check_args(cfg, prompts, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, beta,
                cache_len):
    if prompts.ndim != 2:
        raise ValueError(f"prompts: expected [B, Tp], got shape {prompts.shape}")
    if prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask: shape {prompt_mask.shape} differs from prompts {prompts.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive int")
    total = prompts.shape[1] + max_new_tokens
    if total > cfg.max_len:
        raise ValueError(f"prompts: prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds ModelConfig.max_len={cfg.max_len}")
    if cache_len is not None and not total <= cache_len <= cfg.max_len:
        raise ValueError(f"cache_len={cache_len}: must lie in [prompt length + max_new_tokens = {total}, "
                         f"max_len = {cfg.max_len}]")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id}: must be a token id in [0, {cfg.vocab_size}) or None")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id={pad_id}: must be a token id in [0, {cfg.vocab_size})")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be positive")
    if not isinstance(top_k, int) or not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k!r}: must be an int in [0, vocab_size={cfg.vocab_size}] (0 = off)")
    if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must lie in (0, 1]")
    if isinstance(beta, (int, float)) and not 0 <= beta <= 1:
        raise ValueError(f"beta={beta}: must lie in [0, 1]")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["logits_pol", "cache_pol", "logits_mix", "cache_mix"],
                   meta_fields=["prompt_len", "mu_rows"])
@dataclasses.dataclass(frozen=True)
class Prefilled:
    """The decode loop's starting point: last-position logits and KV cache of each tree ([Rp, V] for the policy,
    [Rm, V] for the second tree; see the row layout in the module docstring), and the prompt length (static: the
    first cache slot of the completion; it survives a jit boundary as pytree metadata). With a second model on
    the policy's base (`same_base`; `mu_rows` = Rm > 0) the policy's logits and cache hold Rp + Rm rows, the
    second model's last, and the second tree's are None."""
    logits_pol: jax.Array
    cache_pol: KVCache
    logits_mix: jax.Array | None
    cache_mix: KVCache | None
    prompt_len: int
    mu_rows: int = 0


def _model_fn(graphdef, p, tokens, mask, cache, index, outputs=slice(None), lora_scale=None):
    return nnx.merge(graphdef, p)(tokens, mask, cache=cache, index=index, outputs=outputs, lora_scale=lora_scale)


def _prefill_tree(graphdef, p, lora_scale, prompts, prompt_mask, cache_len):
    cfg = nnx.merge(graphdef, p).cfg
    b, tp = prompts.shape
    cache = init_cache(cfg, b, cache_len)
    logits, cache = _model_fn(graphdef, p, prompts.astype(jnp.int32), prompt_mask.astype(jnp.int32), cache, 0,
                              slice(-1, None), lora_scale)
    return logits[:, 0], cache


def _row_axis(x):
    return 1 if x.ndim == 5 else 0  # the batch axis of a stacked [L, B, K, S, hd] cache is 1


def _cat_rows(parts):
    """Prefilled rows (logits, cache) of several parts, concatenated along the batch (a part alone as is)."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda *xs: jnp.concatenate(xs, axis=_row_axis(xs[0]))
    return jax.tree.map(cat, *parts)


def _take_rows(part, lo, hi):
    """Rows [lo, hi) of prefilled (logits, cache)."""
    return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, lo, hi, axis=_row_axis(x)), part)


def _tile_rows(logits, cache: KVCache, copies: int):
    """The same prefilled rows `copies` times along the batch."""
    return _cat_rows([(logits, cache)] * copies)


def prefill(graphdef, params, prompts, prompt_mask, *, max_new_tokens: int, mix_params=None,
            cache_len: int | None = None, policy_copies: int = 1) -> Prefilled:
    """Runs the left-padded prompts through the policy (and the second tree) into fresh KV caches; the policy's
    rows are then repeated `policy_copies` times (the pair sampler's y and y' rows share one prefill).

    The caches get `cache_len` slots when it is given, otherwise room for the first GROW new tokens (`decode`
    grows them as it goes). With a second model on the policy's base (`same_base(mix_params)`) one pass over
    the prompts twice (the policy's adapters, then the second model's) gives the policy's rows and the second
    model's, kept in one cache (policy rows first)."""
    s = cache_len or prompts.shape[1] + min(max_new_tokens, GROW)
    if same_base(mix_params):
        b = prompts.shape[0]
        two = lambda x: jnp.concatenate([x, x])
        both = _prefill_tree(graphdef, *_one_pass(params, mix_params, b, b), two(prompts), two(prompt_mask), s)
        pol, mu = _take_rows(both, 0, b), _take_rows(both, b, 2 * b)
        logits, cache = _cat_rows([pol] * policy_copies + [mu])
        return Prefilled(logits, cache, None, None, prompts.shape[1], mu_rows=b)
    logits_pol, cache_pol = _tile_rows(*_prefill_tree(graphdef, params, None, prompts, prompt_mask, s), policy_copies)
    logits_mix, cache_mix = (_prefill_tree(graphdef, mix_params, None, prompts, prompt_mask, s)
                             if mix_params is not None else (None, None))
    return Prefilled(logits_pol, cache_pol, logits_mix, cache_mix, prompts.shape[1])


def sample(graphdef, params, prompts, prompt_mask, rng, *, max_new_tokens: int, eos_id: int | None,
           pad_id: int, temperature=1.0, top_k: int = 0, top_p=1.0, mix_params=None, beta=0.0,
           cache_len: int | None = None, predraw_limit: int = 1 << 24) -> Samples:
    """Samples `max_new_tokens` tokens after each left-padded prompt; see the module docstring.

    `cache_len` (at most max_len) fixes the KV buffer size (default: grown by GROW slots per loop, see above);
    `predraw_limit` is the largest [N, B, V] Gumbel-noise array drawn up front.
    """
    cfg = nnx.merge(graphdef, params).cfg
    _check_args(cfg, prompts, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, beta,
                cache_len)
    with jax.named_scope("prefill"):
        state = prefill(graphdef, params, prompts, prompt_mask, max_new_tokens=max_new_tokens,
                        mix_params=mix_params, cache_len=cache_len)
    with jax.named_scope("decode"):
        return decode(graphdef, params, state, rng, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                      temperature=temperature, top_k=top_k, top_p=top_p, mix_params=mix_params, beta=beta,
                      predraw_limit=predraw_limit)


def sample_pair(graphdef, params, prompts, prompt_mask, rng, *, max_new_tokens: int, eos_id: int | None,
                pad_id: int, temperature=1.0, top_k: int = 0, top_p=1.0, mix_params=None, beta=0.0,
                cache_len: int | None = None, predraw_limit: int = 1 << 24) -> tuple[Samples, Samples]:
    """`(y, y2)`: y ~ π and y2 ~ π^(1−β)·μ^β (μ = mix_params; y2 ~ π when it is None) in one decode loop.

    `rng` is `(key_y, key_y2)` or one key (split in two). See the module docstring."""
    cfg = nnx.merge(graphdef, params).cfg
    _check_args(cfg, prompts, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, beta,
                cache_len)
    if not isinstance(rng, (tuple, list)):
        rng = tuple(jax.random.split(rng))
    if len(rng) != 2:
        raise ValueError(f"rng: expected one key or a pair (key_y, key_y2), got {len(rng)} keys")
    b = prompts.shape[0]
    if mix_params is not None and _is_static(beta, 0.0):
        mix_params = None  # y2 ~ π alone
    policy_on_y2 = not (mix_params is not None and _is_static(beta, 1.0))
    with jax.named_scope("prefill"):
        state = prefill(graphdef, params, prompts, prompt_mask, max_new_tokens=max_new_tokens,
                        mix_params=mix_params, cache_len=cache_len, policy_copies=2 if policy_on_y2 else 1)
    with jax.named_scope("decode"):
        out = decode(graphdef, params, state, tuple(rng), max_new_tokens=max_new_tokens, eos_id=eos_id,
                     pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p, mix_params=mix_params,
                     beta=beta, predraw_limit=predraw_limit, rows=2 * b)
    return out.split(b)


def decode(graphdef, params, state: Prefilled, rng, *, max_new_tokens: int, eos_id: int | None, pad_id: int,
           temperature=1.0, top_k: int = 0, top_p=1.0, mix_params=None, beta=0.0,
           predraw_limit: int = 1 << 24, rows: int | None = None) -> Samples:
    """The `lax.while_loop` decode from a `prefill` state (arguments as in `sample`, which checks them).

    `rows` (default: the policy's rows Rp) is the number R of sampled rows: the policy covers rows [0, Rp), the
    second tree the last Rm; `rng` is one key or a tuple of keys, one per equal block of rows."""
    cfg = nnx.merge(graphdef, params).cfg
    mixing, fused = mix_params is not None, same_base(mix_params)
    if (mixing and not fused) != (state.cache_mix is not None) or fused != (state.mu_rows > 0):
        raise ValueError("mix_params: must be given to both prefill and decode, or to neither")
    rp = state.logits_pol.shape[0] - state.mu_rows
    rm = state.mu_rows if fused else (state.logits_mix.shape[0] if mixing else 0)
    r = rows or rp
    if not (rp <= r and rm <= r and rp + rm >= r):
        raise ValueError(f"rows={r}: the policy's {rp} rows and the second tree's {rm} must cover them")
    lo = r - rm  # rows [0, lo): policy only; [lo, rp): both (the mixture); [rp, r): second tree only
    keys = tuple(rng) if isinstance(rng, (tuple, list)) else (rng,)
    if r % len(keys):
        raise ValueError(f"rng: {len(keys)} keys do not split {r} rows into equal blocks")
    blk, v, n = r // len(keys), cfg.vocab_size, max_new_tokens
    tp = state.prompt_len
    inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
    model_fn = functools.partial(_model_fn, graphdef)
    filtering = bool(top_k) or not _is_static(top_p, 1.0)

    predraw = n * r * v <= predraw_limit
    if predraw:
        gumbel_all = jnp.concatenate([jax.random.gumbel(k, (n, blk, v), jnp.float32) for k in keys], axis=1)

    def step_noise(i):
        if predraw:
            return jax.lax.dynamic_index_in_dim(gumbel_all, i, 0, keepdims=False)
        return jnp.concatenate([jax.random.gumbel(jax.random.fold_in(k, i), (blk, v), jnp.float32) for k in keys])

    def cat(*parts):
        parts = [x for x in parts if x.shape[0]]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    zeros_f = jnp.zeros((r, n), jnp.float32)
    params, row_scale = _one_pass(params, mix_params, rp, rm) if fused else (params, None)
    st = dict(
        i=jnp.zeros((), jnp.int32),
        done=jnp.zeros((r,), bool),
        tokens=jnp.full((r, n), pad_id, jnp.int32),
        mask=jnp.zeros((r, n), jnp.int32),
        lp_pol=zeros_f, lp_ref=zeros_f, lp_samp=zeros_f,
        logits_pol=state.logits_pol, cache_pol=state.cache_pol,
        logits_mix=state.logits_mix, cache_mix=state.cache_mix,
    )

    st = _constrain_state(st)

    def body(st):
        i = st["i"]
        # Scaled logits z/T; log-softmaxes are only needed at the chosen token (z_tok/T − logsumexp), and the
        # argmax input skips the per-row normalising constants (argmax and top-k/top-p are shift-invariant).
        z_pol = st["logits_pol"][:rp] * inv_t
        if mixing:
            z_mix = (st["logits_pol"][rp:] if fused else st["logits_mix"]) * inv_t
            both = (1.0 - beta) * z_pol[lo:] + beta * z_mix[:rp - lo]  # exactly z_pol at β = 0 and z_mix at β = 1
            unnorm = cat(z_pol[:lo], both, z_mix[rp - lo:])
        else:
            unnorm = z_pol
        unnorm = filter_logits(unnorm, top_k, top_p)
        unnorm = constrain(unnorm, ("batch", "vocab"))
        tok = _argmax(unnorm + step_noise(i))
        pick = lambda z, t: jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        lse = lambda z: jax.nn.logsumexp(z, axis=-1)
        lp_a = pick(z_pol, tok[:rp]) - lse(z_pol)  # [Rp]
        if mixing:
            lp_b = pick(z_mix, tok[lo:]) - lse(z_mix)  # [Rm]
            lp_pol_tok, lp_ref_tok = cat(lp_a, lp_b[rp - lo:]), cat(lp_a[:lo], lp_b)
        else:
            lp_pol_tok = lp_ref_tok = lp_a
        if (mixing and rp > lo) or filtering:
            lp_samp_tok = pick(unnorm, tok) - lse(unnorm)
        else:
            lp_samp_tok = lp_pol_tok  # every row samples one model, unfiltered
        live = ~st["done"]
        tok = jnp.where(live, tok, pad_id)
        out = dict(st)
        out["tokens"] = st["tokens"].at[:, i].set(tok)
        out["mask"] = st["mask"].at[:, i].set(live.astype(jnp.int32))
        out["lp_pol"] = st["lp_pol"].at[:, i].set(jnp.where(live, lp_pol_tok, 0.0))
        out["lp_ref"] = st["lp_ref"].at[:, i].set(jnp.where(live, lp_ref_tok, 0.0))
        out["lp_samp"] = st["lp_samp"].at[:, i].set(jnp.where(live, lp_samp_tok, 0.0))
        out["done"] = st["done"] | (tok == eos_id) if eos_id is not None else st["done"]
        step_mask = live.astype(jnp.int32)[:, None]
        if fused:  # the policy's rows and the second model's in one pass over the base weights
            logits, out["cache_pol"] = model_fn(params, cat(tok[:rp], tok[lo:])[:, None],
                                                cat(step_mask[:rp], step_mask[lo:]), st["cache_pol"], tp + i,
                                                lora_scale=row_scale)
        else:
            logits, out["cache_pol"] = model_fn(params, tok[:rp, None], step_mask[:rp], st["cache_pol"], tp + i)
        out["logits_pol"] = logits[:, 0]
        if mixing and not fused:
            logits, out["cache_mix"] = model_fn(mix_params, tok[lo:, None], step_mask[lo:], st["cache_mix"], tp + i)
            out["logits_mix"] = logits[:, 0]
        out["i"] = i + 1
        return _constrain_state(out)

    # One while loop per buffer size: iterations [0, end) fit in the slots the prefill allocated; each later loop
    # first grows both caches by GROW slots (one copy of the caches per loop).
    size = state.cache_pol.mask.shape[1]
    while True:
        end = min(n, size - tp)
        st = jax.lax.while_loop(lambda st, end=end: (st["i"] < end) & ~jnp.all(st["done"]), body, st)
        if end == n:
            break
        size = min(tp + n, size + GROW)
        st = {**st, "cache_pol": _grow(st["cache_pol"], size),
              "cache_mix": _grow(st["cache_mix"], size) if st["cache_mix"] is not None else None}
    return Samples(st["tokens"], st["mask"], st["lp_pol"], st["lp_ref"], st["lp_samp"])


@contextlib.contextmanager
def decode_layout(graphdef, rules=parallel.DEFAULT_DECODE_RULES):
    """Inside a jitted function under `parallel.activate`: yields `to_decode(params)` (None stays None), the
    parameters re-laid once to `rules` in the model's compute dtype (`parallel.relayout`), and traces the
    activation and KV-cache constraints of the code inside it with `rules`. A no-op with `rules=None`."""
    def to_decode(params):
        if params is None or params is ADAPTERS_OFF or rules is None:
            return params
        if isinstance(params, Adapters):  # small: cast to the policy's adapters' dtype when concatenated with them
            return Adapters(parallel.relayout(params.tree, rules))
        return parallel.relayout(params, rules, nnx.merge(graphdef, params).cfg.compute_dtype)

    with parallel.using_rules(rules):
        yield to_decode


def _constrain_cache(cache: KVCache | None) -> KVCache | None:
    if cache is None:
        return None
    kv = lambda x: constrain(x, ("layers",) * (x.ndim - 4) + ("batch", "heads", "length", "kv"))
    return KVCache(jax.tree.map(kv, cache.k), jax.tree.map(kv, cache.v), constrain(cache.mask, ("batch", "length")))


def _constrain_state(st: dict) -> dict:
    """The decode loop's carry pinned to the active logical rules (rows over 'batch', caches also over 'heads'),
    so that the loop keeps one layout from iteration to iteration (no-ops outside `parallel.activate`)."""
    out = dict(st)
    for name in ("tokens", "mask", "lp_pol", "lp_ref", "lp_samp"):
        out[name] = constrain(st[name], ("batch", None))
    out["done"] = constrain(st["done"], ("batch",))
    for name in ("logits_pol", "logits_mix"):
        if st[name] is not None:
            out[name] = constrain(st[name], ("batch", "vocab"))
    out["cache_pol"], out["cache_mix"] = _constrain_cache(st["cache_pol"]), _constrain_cache(st["cache_mix"])
    return out


def _grow(cache: KVCache, size: int) -> KVCache:
    """The cache with empty slots appended up to `size` (keys/values [..., S, hd], mask [B, S])."""
    pad = lambda x, axis: jnp.pad(x, [(0, size - x.shape[axis]) if a == axis % x.ndim else (0, 0)
                                      for a in range(x.ndim)])
    return KVCache(jax.tree.map(lambda x: pad(x, -2), cache.k), jax.tree.map(lambda x: pad(x, -2), cache.v),
                   pad(cache.mask, 1))


def sample_jit(**static):
    """`jax.jit`-compiled `sample` with the keyword arguments in `static` fixed (max_new_tokens, eos_id,
    pad_id, temperature, top_k, top_p, ...); graphdef is a static argument.

    Returns fn(graphdef, params, prompts, prompt_mask, rng, mix_params=None, beta=0.0) -> Samples.
    """
    def fn(graphdef, params, prompts, prompt_mask, rng, mix_params=None, beta=0.0):
        return sample(graphdef, params, prompts, prompt_mask, rng, mix_params=mix_params, beta=beta, **static)
    return jax.jit(fn, static_argnums=0)
