"""Tests of the low-rank adapters (nash_lm.models.lora) against independent computations: the plain decoder's
logits (step 0, and rows whose adapter scale is 0), the chain rule through a weight merged here with plain jnp
(dL/dA = s dL/dW' B^T, dL/dB = s A^T dL/dW'), and `merge` against the adapted forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nash_lm import models, parallel, sampling
from nash_lm.models import ModelConfig, lora

CFG = ModelConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_len=16)
LC = lora.LoRAConfig(rank=3, alpha=6.0)


def _tokens(b=3, t=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32).at[0, :2].set(0)  # a left-padded row
    return tokens, mask


def _randomised(adapters, seed=1, std=0.3):
    """Adapters with B drawn at random too (at init B = 0), so that the low-rank term is not zero."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("scan", [False, True])
def test_step0_logits_equal_base_exactly(scan):
    cfg = CFG if not scan else ModelConfig(**{**CFG.to_dict(), "scan_layers": True})
    g_base, base = models.init(cfg, "lm", seed=0)
    g_ad, full = models.init(cfg, "lm", seed=0, lora_cfg=LC)
    adapters, base_part = lora.split(full)
    assert jax.tree.structure(base_part) == jax.tree.structure(base)
    tokens, mask = _tokens()
    want = models.lm_logits(g_base, base, tokens, mask)
    got = models.lm_logits(g_ad, lora.join(adapters, base), tokens, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # 7 targets x 2 tensors per layer; A nonzero, B zero
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    assert len(flat) == 14 * (1 if scan else cfg.n_layers)
    for path, leaf in flat:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        assert (np.asarray(leaf) == 0).all() == ("b" in keys[-2:]), keys


def test_row_scale_zero_runs_the_base_exactly():
    g_base, base = models.init(CFG, "lm", seed=0)
    g_ad, full = models.init(CFG, "lm", seed=0, lora_cfg=LC)
    adapters = _randomised(lora.split(full)[0])
    params = lora.join(adapters, base)
    tokens, mask = _tokens()
    cache = models.init_cache(CFG, 3, 7)
    scale = jnp.asarray([1.0, 0.0, 1.0])
    got, _ = models.forward_cached(g_ad, params, tokens, mask, cache, 0, lora_scale=scale)
    adapted, _ = models.forward_cached(g_ad, params, tokens, mask, cache, 0)
    plain, _ = models.forward_cached(g_base, base, tokens, mask, cache, 0)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(plain[1]))
    np.testing.assert_array_equal(np.asarray(got)[[0, 2]], np.asarray(adapted)[[0, 2]])
    assert np.abs(np.asarray(adapted[1] - plain[1])).max() > 1e-3  # the adapters do change the model


def _merged_here(base, adapters, s):
    """W' = W + s A B for every target, written out per target with plain jnp (no nash_lm.models.lora)."""
    g = CFG.group_size
    out = jax.tree.map(lambda x: x, base)
    for i in range(CFG.n_layers):
        blk, ad = out["blocks"][i], adapters["blocks"][i]
        A = lambda m, t: ad[m][f"lora_{t}"]["a"][...]
        B = lambda m, t: ad[m][f"lora_{t}"]["b"][...]
        qkv = blk["attn"]["qkv"][...]
        qkv = qkv.at[:, :, :g].add(s * jnp.einsum("dr,rkgh->dkgh", A("attn", "q"), B("attn", "q")))
        qkv = qkv.at[:, :, g].add(s * jnp.einsum("dr,rkh->dkh", A("attn", "k"), B("attn", "k")))
        qkv = qkv.at[:, :, g + 1].add(s * jnp.einsum("dr,rkh->dkh", A("attn", "v"), B("attn", "v")))
        blk["attn"]["qkv"].set_value(qkv)
        blk["attn"]["out"].set_value(blk["attn"]["out"][...]
                                     + s * jnp.einsum("kghr,rd->kghd", A("attn", "o"), B("attn", "o")))
        gu = blk["mlp"]["gate_up"][...]
        gu = gu.at[:, 0].add(s * A("mlp", "gate") @ B("mlp", "gate")).at[:, 1].add(s * A("mlp", "up") @ B("mlp", "up"))
        blk["mlp"]["gate_up"].set_value(gu)
        blk["mlp"]["down"].set_value(blk["mlp"]["down"][...] + s * A("mlp", "down") @ B("mlp", "down"))
    return out


def _loss(graphdef, params, tokens, mask):
    logits = models.lm_logits(graphdef, params, tokens, mask)
    w = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32).reshape(logits.shape))  # a fixed linear functional
    return jnp.sum(jax.nn.log_softmax(logits) * w)


def test_adapter_gradient_is_the_chain_rule_projection_of_the_full_gradient():
    g_base, base = models.init(CFG, "lm", seed=0)
    g_ad, full = models.init(CFG, "lm", seed=0, lora_cfg=LC)
    adapters = _randomised(lora.split(full)[0])
    tokens, mask = _tokens()
    s = LC.scale
    g_adapters = jax.grad(lambda a: _loss(g_ad, lora.join(a, base), tokens, mask))(adapters)
    merged = _merged_here(base, adapters, s)
    np.testing.assert_allclose(np.asarray(_loss(g_base, merged, tokens, mask)),
                               np.asarray(_loss(g_ad, lora.join(adapters, base), tokens, mask)), rtol=1e-5)
    g_w = jax.grad(lambda p: _loss(g_base, p, tokens, mask))(merged)
    _check_chain_rule(g_w, adapters, g_adapters, s)


def _check_chain_rule(g_w, adapters, g_adapters, s, tol=1e-4):
    """dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW' for every target of every layer of a decoder's trees."""
    g = CFG.group_size
    for i in range(CFG.n_layers):
        gw, ad, ga = g_w["blocks"][i], adapters["blocks"][i], g_adapters["blocks"][i]
        dW = {"q": gw["attn"]["qkv"][...][:, :, :g], "k": gw["attn"]["qkv"][...][:, :, g],
              "v": gw["attn"]["qkv"][...][:, :, g + 1], "o": gw["attn"]["out"][...],
              "gate": gw["mlp"]["gate_up"][...][:, 0], "up": gw["mlp"]["gate_up"][...][:, 1],
              "down": gw["mlp"]["down"][...]}
        for t, d in dW.items():
            m = "attn" if t in ("q", "k", "v", "o") else "mlp"
            A, B = ad[m][f"lora_{t}"]["a"][...], ad[m][f"lora_{t}"]["b"][...]
            n_in = A.ndim - 1
            out_axes = tuple(range(n_in, d.ndim))
            want_a = s * jnp.tensordot(d, B, axes=(out_axes, tuple(range(1, B.ndim))))  # s dW B^T
            want_b = s * jnp.tensordot(A, d, axes=(tuple(range(n_in)), tuple(range(n_in))))  # s A^T dW
            for name, want in (("a", want_a), ("b", want_b)):  # float32 sums: tolerance relative to the tensor
                # (1e-5 of it was exceeded by one element in 48 on one CPU; a wrong projection is off by O(1))
                np.testing.assert_allclose(np.asarray(ga[m][f"lora_{t}"][name][...]), np.asarray(want), rtol=0,
                                           atol=tol * float(np.abs(want).max()), err_msg=f"layer {i} {t} {name}")


def _judge_out(kind, graphdef, params, tokens, mask):
    if kind == "reward":
        return models.reward(graphdef, params, tokens, mask)
    return models.preference_prob(graphdef, params, tokens[:, :3], mask[:, :3], tokens[:, 3:5], mask[:, 3:5],
                                  tokens[::-1, 5:], mask[:, 5:])


@pytest.mark.parametrize("kind", ["preference", "reward"])
def test_adapted_judge_step0_gradient_and_merge(kind):
    """An adapted judge: its backbone carries the adapters, its fresh head trains with them. At step 0 it is the
    plain judge of the same seed exactly; the head's gradient is the plain model's, the adapters' the chain-rule
    projection of the merged backbone's weight gradient; `merge` gives a plain judge computing the same."""
    g_plain, plain = models.init(CFG, kind, seed=0)
    g_ad, full = models.init(CFG, kind, seed=0, lora_cfg=LC)
    trained, base = lora.split(full)
    heads = ("score",) if kind == "preference" else ("score", "bias")
    assert sorted(trained.keys()) == sorted(("backbone",) + heads) and "backbone" in base
    tokens, mask = _tokens(t=8)
    np.testing.assert_array_equal(np.asarray(_judge_out(kind, g_ad, full, tokens, mask)),
                                  np.asarray(_judge_out(kind, g_plain, plain, tokens, mask)))
    trained = _randomised(trained)
    s = LC.scale
    w = jnp.asarray([0.7, -1.3, 0.4])
    loss = lambda g, p: jnp.sum(w * _judge_out(kind, g, p, tokens, mask))
    g_trained = jax.grad(lambda a: loss(g_ad, lora.join(a, base)))(trained)
    merged_here = jax.tree.map(lambda x: x, plain)  # the plain tree: backbone W + s A B, the trained head
    merged_here["backbone"] = _merged_here(base["backbone"], trained["backbone"], s)
    for h in heads:
        merged_here[h].set_value(trained[h][...])
    np.testing.assert_allclose(np.asarray(loss(g_plain, merged_here)), np.asarray(loss(g_ad, lora.join(trained, base))),
                               rtol=5e-5)
    g_w = jax.grad(lambda p: loss(g_plain, p))(merged_here)
    for h in heads:
        want = np.asarray(g_w[h][...])  # float32 sums in another order: tolerance relative to the tensor
        np.testing.assert_allclose(np.asarray(g_trained[h][...]), want, rtol=0, atol=2e-5 * np.abs(want).max())
    # (a difference of two pooled scores: float32 cancellation, so a looser tolerance than the decoder's)
    _check_chain_rule(g_w["backbone"], trained["backbone"], g_trained["backbone"], s, tol=1e-4)
    merged = lora.merge(CFG, LC, lora.join(trained, base))
    assert jax.tree.structure(merged) == jax.tree.structure(plain)
    np.testing.assert_allclose(np.asarray(_judge_out(kind, g_plain, merged, tokens, mask)),
                               np.asarray(_judge_out(kind, g_plain, merged_here, tokens, mask)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scan,targets", [(False, lora.TARGETS), (True, ("q", "v", "down"))])
def test_merge_equals_the_adapted_model(scan, targets):
    cfg = CFG if not scan else ModelConfig(**{**CFG.to_dict(), "scan_layers": True})
    lc = lora.LoRAConfig(rank=2, alpha=3.0, targets=targets)
    g_base, base = models.init(cfg, "lm", seed=0)
    g_ad, full = models.init(cfg, "lm", seed=0, lora_cfg=lc)
    adapters = _randomised(lora.split(full)[0])
    params = lora.join(adapters, base)
    merged = lora.merge(cfg, lc, params)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    tokens, mask = _tokens()
    want = models.lm_logits(g_ad, params, tokens, mask)
    np.testing.assert_allclose(np.asarray(models.lm_logits(g_base, merged, tokens, mask)), np.asarray(want),
                               atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(want - models.lm_logits(g_base, base, tokens, mask))).max() > 1e-3
    # the base is left as it was
    np.testing.assert_array_equal(np.asarray(base["blocks"][0]["mlp"]["down"][...] if not scan
                                             else base["blocks"]["mlp"]["down"][...]),
                                  np.asarray(models.init(cfg, "lm", seed=0)[1]["blocks"][0]["mlp"]["down"][...]
                                             if not scan else models.init(cfg, "lm", seed=0)[1]["blocks"]["mlp"]
                                             ["down"][...]))


def test_adapters_carry_logical_axes_and_shard_by_the_rules():
    _, shapes = models.abstract_init(CFG, "lm", LC)
    adapters, _ = lora.split(shapes)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sh = parallel.param_shardings(adapters, mesh)
    blk = sh["blocks"][0]
    assert blk["attn"]["lora_q"]["a"].spec == jax.sharding.PartitionSpec("fsdp")  # ('embed', 'lora')
    assert blk["attn"]["lora_q"]["b"].spec == jax.sharding.PartitionSpec(None, "tensor")  # ('lora','heads',..)
    assert blk["mlp"]["lora_down"]["a"].spec == jax.sharding.PartitionSpec("tensor")  # ('mlp', 'lora')
    rules = parallel.DEFAULT_RULES + (("lora", "tensor"),)  # a rule for the rank axis, where it divides
    assert parallel.param_shardings(adapters, mesh, rules)["blocks"][0]["mlp"]["lora_gate"]["a"].spec == \
        jax.sharding.PartitionSpec("fsdp")  # rank 3 does not divide over 2 devices
    even, _ = lora.split(models.abstract_init(CFG, "lm", lora.LoRAConfig(rank=2))[1])
    assert parallel.param_shardings(even, mesh, rules)["blocks"][0]["mlp"]["lora_gate"]["a"].spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("kw,msg", [
    (dict(rank=0), "rank: must be > 0, got 0"),
    (dict(rank=9), "rank: 9 exceeds 8"),  # k and v: 2 kv heads x head_dim 4
    (dict(rank=2, targets=("q", "qq")), "targets: 'qq' matches no projection"),
    (dict(rank=2, alpha=0.0), "alpha: must be > 0"),
])
def test_bad_lora_configs_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")) as e:
        lora.LoRAConfig(**kw).validate(CFG)
    assert "\n" not in str(e.value)


def test_max_rank_is_the_smallest_projection_dimension():
    cfg = ModelConfig(vocab_size=13, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=12, max_len=8)
    assert lora.max_rank(cfg, ("q",)) == 32 and lora.max_rank(cfg, ("k",)) == 8  # kv heads x head_dim
    assert lora.max_rank(cfg, ("down",)) == 12 and lora.max_rank(cfg) == 8


# ---------------------------------------------------------------------------------------------------------------
# The mixture decode with adapters: pi = base + adapters and mu = base from one pass over the base weights

SAMPLE_KW = dict(max_new_tokens=6, eos_id=None, pad_id=0, temperature=1.0)
PAIR = jax.jit(sampling.sample_pair, static_argnums=0, static_argnames=tuple(SAMPLE_KW) + ("beta",))
ONE = jax.jit(sampling.sample, static_argnums=0, static_argnames=tuple(SAMPLE_KW) + ("beta",))


def _adapted_and_merged(scan=False):
    cfg = CFG if not scan else ModelConfig(**{**CFG.to_dict(), "scan_layers": True})
    g_base, base = models.init(cfg, "lm", seed=0)
    g_ad, full = models.init(cfg, "lm", seed=0, lora_cfg=LC)
    params = lora.join(_randomised(lora.split(full)[0], std=0.5), base)
    return g_base, base, g_ad, params, _merged_here(base, lora.split(params)[0], LC.scale) if not scan else \
        lora.merge(cfg, LC, params)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_mixture_decode_with_adapters_draws_the_tokens_of_merged_pi_and_base_mu(beta):
    g_base, base, g_ad, params, merged = _adapted_and_merged()
    prompts, mask = _tokens(b=4, t=5, seed=3)
    for seed in range(3):
        keys = tuple(jax.random.split(jax.random.key(seed)))
        y, y2 = PAIR(g_ad, params, prompts, mask, keys, mix_params=sampling.ADAPTERS_OFF, beta=beta, **SAMPLE_KW)
        w, w2 = PAIR(g_base, merged, prompts, mask, keys, mix_params=base, beta=beta, **SAMPLE_KW)
        for a, b in ((y, w), (y2, w2)):
            np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
            for f in ("logp_policy", "logp_ref", "logp_sample"):
                np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), atol=1e-4)
    # the adapters matter: pi's samples differ from mu's with the same key
    mu, _ = PAIR(g_base, base, prompts, mask, keys, **SAMPLE_KW)
    assert (np.asarray(mu.tokens) != np.asarray(y.tokens)).any()


def test_mixture_sample_with_adapters_and_growing_cache():
    """`sample` (every row the mixture) through a decode that grows its cache (GROW = 4 here), stacked layers."""
    g_base, base, g_ad, params, merged = _adapted_and_merged(scan=True)
    prompts, mask = _tokens(b=3, t=4, seed=5)
    old = sampling.GROW
    sampling.GROW = 4
    try:
        kw = dict(SAMPLE_KW, max_new_tokens=10)
        key = jax.random.key(7)
        got = sampling.sample(g_ad, params, prompts, mask, key, mix_params=sampling.ADAPTERS_OFF, beta=0.3, **kw)
        want = sampling.sample(g_base, merged, prompts, mask, key, mix_params=base, beta=0.3, **kw)
    finally:
        sampling.GROW = old
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logp_ref), np.asarray(want.logp_ref), atol=1e-4)


@pytest.mark.parametrize("scan,beta", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_second_adapter_set_on_the_base_draws_the_tokens_of_two_merged_trees(scan, beta):
    """`mix_params=Adapters(other)` (Nash-EMA-PG's EMA of a LoRA stage's adapters, beta = 1): pi's rows and the
    second set's rows in one pass (the sets concatenated along the rank, a [rows, 2r] scale) against two separate
    merged trees, base + adapters and base + other (merged with plain jnp for unstacked layers)."""
    g_base, base, g_ad, params, merged = _adapted_and_merged(scan)
    other = _randomised(lora.split(params)[0], seed=9, std=0.5)
    merged_other = (_merged_here(base, other, LC.scale) if not scan else
                    lora.merge(ModelConfig(**{**CFG.to_dict(), "scan_layers": True}), LC, lora.join(other, base)))
    prompts, mask = _tokens(b=4, t=5, seed=3)
    for seed in range(3):
        keys = tuple(jax.random.split(jax.random.key(seed)))
        y, y2 = PAIR(g_ad, params, prompts, mask, keys, mix_params=sampling.Adapters(other), beta=beta, **SAMPLE_KW)
        w, w2 = PAIR(g_base, merged, prompts, mask, keys, mix_params=merged_other, beta=beta, **SAMPLE_KW)
        for a, b in ((y, w), (y2, w2)):
            np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
            for f in ("logp_policy", "logp_ref", "logp_sample"):
                np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), atol=1e-4)
    # the second set matters: its samples differ from pi's with the same key
    pi2, _ = PAIR(g_base, merged, prompts, mask, (keys[1], keys[0]), **SAMPLE_KW)
    assert (np.asarray(pi2.tokens) != np.asarray(y2.tokens)).any()


def test_nash_ema_lora_rollout_samples_pi_and_the_ema_as_two_merged_trees():
    """The compiled Nash-EMA-PG rollout of a LoRA stage (y ~ pi, y' ~ the EMA of the adapters, in pi's pass)
    draws the tokens of `sample_pair` on two trees merged here, base + pi's adapters and base + the EMA's, with
    the keys the rollout documents (its rng split in three: next, y, y')."""
    from nash_lm.train import config as cfg_lib
    from nash_lm.train import state as state_lib
    from nash_lm.train import step as step_lib

    g_base, base, g_ad, params, merged = _adapted_and_merged()
    pol, _ = lora.split(params)
    ema = _randomised(pol, seed=11, std=0.5)
    hp = step_lib.PolicyHParams(algorithm="nash_ema_pg", tau=0.1, max_new_tokens=6, steps=10, eos_id=None, pad_id=0)
    tx = state_lib.make_optimizer(cfg_lib.stage("nash_ema_pg", lr=1e-2, batch_size=4, steps=10))
    mut = state_lib.init_state(pol, tx, 5, keeps=("ema",)).replace(ema=ema)
    ref = lora.join(jax.tree.map(jnp.zeros_like, pol), base)
    prompts, mask = _tokens(b=4, t=5, seed=3)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with parallel.activate(mesh, None):
        _, samples = jax.jit(lambda m: step_lib.rollout(hp, g_ad, m, step_lib.Frozen(ref=ref),
                                                        {"prompt": prompts, "prompt_mask": mask}))(mut)
    _, k_y, k_y2 = jax.random.split(mut.rng, 3)
    y, y2 = PAIR(g_base, merged, prompts, mask, (k_y, k_y2), mix_params=_merged_here(base, ema, LC.scale),
                 beta=1.0, **SAMPLE_KW)
    np.testing.assert_array_equal(np.asarray(samples["y"]), np.asarray(y.tokens))
    np.testing.assert_array_equal(np.asarray(samples["y2"]), np.asarray(y2.tokens))
    # y' is the EMA's: pi with y''s key draws other tokens
    pi2, _ = PAIR(g_base, merged, prompts, mask, (k_y2, k_y), **SAMPLE_KW)
    assert (np.asarray(pi2.tokens) != np.asarray(samples["y2"])).any()
