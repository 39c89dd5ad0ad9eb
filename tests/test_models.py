"""Tests of nash_lm.models: the decoder against an independent NumPy Llama forward, the KV cache against the
full forward pass, left padding, bf16, remat, the preference model's exact antisymmetry, the reward head,
and config validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nash_lm import models
from nash_lm.models import ModelConfig

LM = jax.jit(models.lm_logits, static_argnums=0)
PREF = jax.jit(models.preference_prob, static_argnums=0)
REWARD = jax.jit(models.reward, static_argnums=0)

TINY = ModelConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_len=24)


def _cfg(**kw):
    return dataclasses.replace(TINY, **kw)


def _data(b=3, t=9, v=13, seed=0, pads=(3, 0, 1)):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, v, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i, p in enumerate(pads[:b]):
        mask[i, :p] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


# ------------------------------------------------------------------------ independent NumPy reference


def _np(x):
    return np.asarray(x[...], np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [T, H, hd]
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None]  # [T, hd/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def numpy_lm_forward(cfg, params, tokens, mask):
    """Textbook Llama forward (repeat-KV GQA, one sequence at a time, float64)."""
    h_, k_, g_, hd = cfg.n_heads, cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    emb = _np(params["embed"])
    out = []
    for toks, m in zip(np.asarray(tokens), np.asarray(mask)):
        t = len(toks)
        pos = np.maximum(np.cumsum(m) - 1, 0).astype(np.float64)
        x = emb[toks]
        allowed = (np.tril(np.ones((t, t), bool)) & (m[None, :] > 0)) | np.eye(t, dtype=bool)  # pad rows: self
        for i in range(cfg.n_layers):
            if cfg.scan_layers:
                blk = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
            else:
                blk = params["blocks"][i]
            qkv = _np(blk["attn"]["qkv"])  # [D, K, G+2, hd]
            wq = qkv[:, :, :g_].reshape(cfg.d_model, h_ * hd)
            wk = qkv[:, :, g_].reshape(cfg.d_model, k_ * hd)
            wv = qkv[:, :, g_ + 1].reshape(cfg.d_model, k_ * hd)
            wo = _np(blk["attn"]["out"]).reshape(h_ * hd, cfg.d_model)
            y = _rms(x, _np(blk["attn_norm"]["scale"]), cfg.norm_eps)
            q = _rope((y @ wq).reshape(t, h_, hd), pos, cfg.rope_theta)
            kk = _rope((y @ wk).reshape(t, k_, hd), pos, cfg.rope_theta)
            vv = (y @ wv).reshape(t, k_, hd)
            kk, vv = np.repeat(kk, g_, axis=1), np.repeat(vv, g_, axis=1)  # head h uses kv head h // G
            att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
            att = np.where(allowed[None], att, -np.inf)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = x + np.einsum("hts,shd->thd", att, vv).reshape(t, h_ * hd) @ wo
            y = _rms(x, _np(blk["mlp_norm"]["scale"]), cfg.norm_eps)
            gu = _np(blk["mlp"]["gate_up"])
            gate, up = y @ gu[:, 0], y @ gu[:, 1]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ _np(blk["mlp"]["down"])
        x = _rms(x, _np(params["final_norm"]["scale"]), cfg.norm_eps)
        w = emb.T if cfg.tie_embeddings else _np(params["head"])
        out.append(x @ w)
    return np.stack(out)


@pytest.mark.parametrize("kw", [{}, {"scan_layers": True, "tie_embeddings": False, "n_kv_heads": 1}])
def test_forward_matches_numpy_reference(kw):
    cfg = _cfg(**kw)
    g, p = models.init(cfg, "lm", seed=1)
    tokens, mask = _data()
    got = np.asarray(LM(g, p, tokens, mask))
    want = numpy_lm_forward(cfg, p, tokens, mask)
    real = np.asarray(mask) > 0
    assert got.dtype == np.float32 and got.shape == (3, 9, cfg.vocab_size)
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward(scan):
    cfg = _cfg(scan_layers=scan)
    g, p = models.init(cfg, "lm", seed=2)
    tokens, mask = _data(t=12, pads=(4, 0, 2))
    tp = 5  # prompt = first 5 columns (left padded), then 7 decode steps of one token
    full = np.asarray(LM(g, p, tokens, mask))

    step = jax.jit(models.forward_cached, static_argnums=0)  # one program per chunk length, index traced
    cache = models.init_cache(cfg, 3, 14)  # two spare slots at the end stay masked
    logits, cache = step(g, p, tokens[:, :tp], mask[:, :tp], cache, jnp.int32(0))
    outs = [logits]
    for i in range(tp, 12):
        logits, cache = step(g, p, tokens[:, i:i + 1], mask[:, i:i + 1], cache, jnp.int32(i))
        outs.append(logits)
    cached = np.asarray(jnp.concatenate(outs, 1))
    real = np.asarray(mask) > 0
    print(f"cached decode vs full forward (scan={scan}): max |diff| = {np.abs(cached[real] - full[real]).max():.2e}")
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)


def test_left_padding_is_invisible():
    g, p = models.init(TINY, "lm", seed=3)
    tokens, _ = _data(b=1, t=6, pads=(0,))
    padded = jnp.concatenate([jnp.full((1, 4), 7, jnp.int32), tokens], 1)
    pmask = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 6), jnp.int32)], 1)
    a = LM(g, p, tokens, jnp.ones_like(tokens))
    b = LM(g, p, padded, pmask)[:, 4:]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bf16_compute_close_and_logits_f32():
    cfg16 = _cfg(dtype="bfloat16")
    g32, p = models.init(TINY, "lm", seed=4)
    g16, p16 = models.init(cfg16, "lm", seed=4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))  # f32 master weights
    tokens, mask = _data()
    a = np.asarray(LM(g32, p, tokens, mask))
    b = LM(g16, p16, tokens, mask)
    assert b.dtype == jnp.float32
    real = np.asarray(mask) > 0
    assert np.max(np.abs(a[real] - np.asarray(b)[real])) < 0.1


@pytest.mark.parametrize("scan", [True])
def test_remat_gives_same_gradients(scan):
    tokens, mask = _data()

    def grads(remat):
        g, p = models.init(_cfg(remat=remat, scan_layers=scan), "lm", seed=5)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(models.lm_logits(g, p, tokens, mask))[..., 0])
        return jax.jit(jax.grad(loss))(p)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True, "activation": "gelu_tanh"}])
def test_every_param_carries_logical_axes(variant):
    for kind in models.KINDS:
        for scan in (False, True):
            _, p = models.abstract_init(_cfg(scan_layers=scan, **variant), kind)
            for path, var in jax.tree_util.tree_flatten_with_path(
                p, is_leaf=lambda x: hasattr(x, "get_metadata"))[0]:
                axes = var.get_metadata().get("out_sharding")
                assert axes is not None and len(axes) == len(var.get_value().shape), (kind, path, axes)
                assert ("layers" in axes) == (scan and "blocks" in jax.tree_util.keystr(path))
            assert models.num_params(p) == _cfg(scan_layers=scan, **variant).num_params(kind)


# ---------------------------------------------------------------------------------- heads


def _pair_data(seed=0):
    rs = np.random.RandomState(seed)
    prompt = jnp.asarray(rs.randint(0, 13, (4, 5)), jnp.int32)
    pm = jnp.asarray(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]), jnp.int32)
    y = jnp.asarray(rs.randint(0, 13, (4, 4)), jnp.int32)
    ym = jnp.asarray(np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]), jnp.int32)
    y2 = jnp.asarray(rs.randint(0, 13, (4, 4)), jnp.int32)
    y2m = jnp.asarray(np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]), jnp.int32)
    return prompt, pm, y, ym, y2, y2m


def test_preference_antisymmetry_is_exact():
    g, p = models.init(TINY, "preference", seed=6)
    prompt, pm, y, ym, y2, y2m = _pair_data()
    pref = PREF
    p12 = np.asarray(pref(g, p, prompt, pm, y, ym, y2, y2m))
    p21 = np.asarray(pref(g, p, prompt, pm, y2, y2m, y, ym))
    p11 = np.asarray(pref(g, p, prompt, pm, y, ym, y, ym))
    assert p12.shape == (4,) and p12.dtype == np.float32
    assert np.all(p12 + p21 == 1.0), p12 + p21
    assert np.all(p11 == 0.5), p11
    assert np.ptp(p12) > 1e-4  # not a constant model


def test_preference_is_logistic_of_score_difference():
    """P(y ≻ y') = σ(f(x,y,y') − f(x,y',y)), f read at the last real token of [x; y; y'] (separate passes)."""
    g, p = models.init(TINY, "preference", seed=7)
    prompt, pm, y, ym, y2, y2m = _pair_data(1)
    score = jax.jit(lambda p, t, m: nnx.merge(g, p).pair_score(t, m))
    f1 = score(p, jnp.concatenate([prompt, y, y2], 1), jnp.concatenate([pm, ym, y2m], 1))
    f2 = score(p, jnp.concatenate([prompt, y2, y], 1), jnp.concatenate([pm, y2m, ym], 1))
    want = 1 / (1 + np.exp(-(np.asarray(f1, np.float64) - np.asarray(f2, np.float64))))
    np.testing.assert_allclose(np.asarray(PREF(g, p, prompt, pm, y, ym, y2, y2m)), want,
                               atol=1e-6)


def test_reward_shape_and_padding_invariance():
    g, p = models.init(TINY, "reward", seed=8)
    tokens, _ = _data(b=2, t=6, pads=(0, 0))
    r = REWARD(g, p, tokens, jnp.ones_like(tokens))
    assert r.shape == (2,) and r.dtype == jnp.float32
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens, jnp.full((2, 2), 5, jnp.int32)], 1)
    pmask = jnp.concatenate([jnp.zeros((2, 3)), jnp.ones((2, 6)), jnp.zeros((2, 2))], 1).astype(jnp.int32)
    np.testing.assert_allclose(np.asarray(REWARD(g, p, padded, pmask)), np.asarray(r), atol=1e-5)
    assert abs(float(r[0] - r[1])) > 1e-6


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,field", [
    ({"n_heads": 3}, "n_heads"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"d_model": 12, "n_heads": 4}, "d_model"),  # head_dim 3, odd for RoPE
    ({"dtype": "float16"}, "dtype"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"activation": "relu"}, "activation"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError) as e:
        models.init(_cfg(**kw), "lm", 0)
    msg = str(e.value)
    assert f"ModelConfig.{field}=" in msg and "\n" not in msg


def test_config_from_configdict():
    import ml_collections
    cd = ml_collections.ConfigDict(dict(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8))
    cfg = ModelConfig.from_config(cd)
    assert cfg.vocab_size == 8 and cfg.n_kv_heads == 1 and hash(cfg) == hash(ModelConfig(**cfg.to_dict()))
    cd.unlock() if hasattr(cd, "unlock") else None
    with pytest.raises(ValueError, match=r"ModelConfig\.n_head: unknown field"):
        ModelConfig.from_config({"n_head": 2})
    with pytest.raises(ValueError, match=r"ModelConfig\.n_kv_heads=3"):
        ModelConfig.from_config(dict(cd.to_dict(), n_kv_heads=3))


def test_sequence_longer_than_max_len_fails_before_compiling():
    g, p = models.init(TINY, "lm", 0)
    tokens = jnp.zeros((1, TINY.max_len + 1), jnp.int32)
    with pytest.raises(ValueError, match=r"^tokens: length 25 exceeds ModelConfig.max_len=24"):
        jax.jit(models.lm_logits, static_argnums=0).lower(g, p, tokens, tokens)
    gp, pp = models.init(TINY, "preference", 0)
    x = jnp.zeros((1, 10), jnp.int32)
    with pytest.raises(ValueError, match=r"prompt \+ y \+ y2: length 30"):
        PREF(gp, pp, x, x, x, x, x, x)


@pytest.mark.parametrize("name", ["tiny", "llama_1b"])
def test_model_configs_validate_and_size(name):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "configs" / "model" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    cfg = ModelConfig.from_config(c.model)
    from nash_lm import parallel
    parallel.validate_rules(c.rules)
    _, abstract = models.abstract_init(cfg) if name == "tiny" else (None, None)
    if abstract is not None:
        assert models.num_params(abstract) == cfg.num_params()
    if name == "llama_1b":
        assert 1.0e9 < cfg.num_params() < 1.5e9
