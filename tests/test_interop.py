"""Hugging Face interop against transformers' own forward pass (tiny random models built in-process, torch CPU).

Import of Llama (untied, GQA), Gemma (GeLU-tanh, (1 + w) norms, scaled tied embedding) and Qwen2 (q/k/v biases,
tied) must give transformers' logits within 1e-4; exporting back must load in `LlamaForCausalLM` with the same
logits; every bad input is one line naming what differs; pickled checkpoints are never opened.
"""
import json
import os
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch  # noqa: E402  (test dependency: torch==2.13.0 CPU)
import transformers  # noqa: E402  (test dependency: transformers==5.23.0)

from nash_lm import models  # noqa: E402
from nash_lm.interop import hf, safetensors_io  # noqa: E402

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_theta=500.0)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def _tokenizer_json(path, n_tokens):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n_tokens)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def _make_hf(arch, directory, seed=0):
    cls_cfg, cls_model, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**COMMON, **extra)).eval()
    with torch.no_grad():  # move norms and biases away from their 0/1 initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    _tokenizer_json(os.path.join(directory, "tokenizer.json"), V - 3)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        d = str(root / arch)
        out[arch] = (d, _make_hf(arch, d))
    return out


def _tokens(b=3, t=11, seed=0):
    return np.random.RandomState(seed).randint(0, V, (b, t))


def _torch_logits(model, tokens, mask=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw = dict(attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)))
        return model(torch.tensor(tokens), **kw).logits.float().numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers(hf_dirs, arch):
    d, model = hf_dirs[arch]
    p = hf.load_pretrained(d)
    assert p.architecture == arch
    assert p.tokenizer.get_vocab_size() == V - 3
    toks = _tokens()
    ref = _torch_logits(model, toks)
    got = np.asarray(models.lm_logits(p.graphdef, p.params, jnp.asarray(toks), jnp.ones(toks.shape, jnp.int32)))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_import_left_padded_and_scanned(hf_dirs):
    d, model = hf_dirs["llama"]
    toks = _tokens(seed=1)
    mask = np.ones_like(toks)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ref = _torch_logits(model, toks, mask)
    for scan in (False, True):
        p = hf.load_pretrained(d, scan_layers=scan, tokenizer=False)
        got = np.asarray(models.lm_logits(p.graphdef, p.params, jnp.asarray(toks), jnp.asarray(mask)))
        np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=1e-4, rtol=0)


def test_export_roundtrip_loads_in_transformers(hf_dirs, tmp_path):
    d, model = hf_dirs["llama"]
    p = hf.load_pretrained(d)
    out = str(tmp_path / "exported")
    hf.export_llama(p.graphdef, p.params, out, eos_token_id=2, bos_token_id=1, pad_token_id=0,
                    tokenizer_json=os.path.join(d, "tokenizer.json"))
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    toks = _tokens(seed=2)
    np.testing.assert_allclose(_torch_logits(back, toks), _torch_logits(model, toks), atol=1e-5, rtol=0)
    # and the export imports again to the same parameters
    again = hf.load_pretrained(out)
    for a, b in zip(hf.pure_to_hf(nnx.to_pure_dict(p.params), p.config).items(),
                    hf.pure_to_hf(nnx.to_pure_dict(again.params), again.config).items()):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("tied,scan", [(True, False), (False, True)])
def test_export_of_native_params(tmp_path, tied, scan):
    """Parameters made by nash-lm itself (random init, tied or untied, scanned or not) load in transformers."""
    cfg = models.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=40, max_len=32,
                             rope_theta=1000.0, norm_eps=1e-6, tie_embeddings=tied, scan_layers=scan)
    graphdef, params = models.init(cfg, "lm", seed=3)
    out = str(tmp_path / "native")
    hf.export_llama(graphdef, params, out)
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    toks = np.random.RandomState(4).randint(0, 40, (2, 9))
    ours = np.asarray(models.lm_logits(graphdef, params, jnp.asarray(toks), jnp.ones(toks.shape, jnp.int32)))
    np.testing.assert_allclose(_torch_logits(back, toks), ours, atol=1e-4, rtol=0)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is tied


def test_bf16_checkpoint_reads_exactly(hf_dirs, tmp_path):
    d, model = hf_dirs["llama"]
    out = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    p = hf.load_pretrained(out, tokenizer=False)
    emb = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(p.params["embed"][...]), emb)


def test_gemma_and_qwen2_cannot_be_exported(hf_dirs, tmp_path):
    for arch in ("gemma", "qwen2"):
        p = hf.load_pretrained(hf_dirs[arch][0], tokenizer=False)
        with pytest.raises(ValueError, match=f"llama architecture only; this model is {arch}"):
            hf.export_llama(p.graphdef, p.params, str(tmp_path / arch))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming what differs


def _copy(src, tmp_path, name="bad"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_config_mismatch_is_named(hf_dirs):
    d, _ = hf_dirs["llama"]
    want = hf.load_pretrained(d, tokenizer=False).config
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d, config=models.ModelConfig(**{**want.to_dict(), "d_ff": 64}))
    assert "d_ff=48" in _one_line(e) and "ModelConfig.d_ff=64" in str(e.value)


def test_shape_mismatch_missing_and_extra_tensors(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama"]
    d = _copy(src, tmp_path, "shape")
    _edit_config(d, intermediate_size=40)
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d)
    assert "model.layers.0.mlp.gate_proj.weight" in _one_line(e) and "[48, 32]" in str(e.value)

    d = _copy(src, tmp_path, "missing")
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    os.remove(path)
    from safetensors.numpy import save_file
    save_file(tensors, path)
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d)
    assert "missing tensor 'model.layers.1.self_attn.k_proj.weight'" in _one_line(e)

    d = _copy(src, tmp_path, "arch")
    _edit_config(d, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=true"):
        hf.load_pretrained(d)
    d = _copy(hf_dirs["qwen2"][0], tmp_path, "qwen_as_llama")
    _edit_config(d, model_type="llama")
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d)
    assert "unexpected tensor 'model.layers.0.self_attn.k_proj.bias'" in _one_line(e)
    d = _copy(src, tmp_path, "mistral")
    _edit_config(d, model_type="mistral")
    with pytest.raises(ValueError, match="model_type='mistral': unsupported architecture"):
        hf.load_pretrained(d)


def test_unknown_dtype_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"][0], tmp_path, "dtype")
    path = os.path.join(d, "model.safetensors")
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "Z99"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n
    with open(path, "wb") as f:
        f.write(raw[:8] + new + raw[8 + n:])
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d)
    assert "'model.norm.weight'" in _one_line(e) and "'Z99'" in str(e.value)
    with pytest.raises(ValueError, match="unknown dtype 'Z99'"):
        safetensors_io.load(path)


def test_tokenizer_that_does_not_fit(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"][0], tmp_path, "tok")
    _tokenizer_json(os.path.join(d, "tokenizer.json"), V + 5)
    with pytest.raises(ValueError) as e:
        hf.load_pretrained(d)
    assert f"has id {V + 4}" in _one_line(e) and f"vocab_size={V}" in str(e.value)
    _tokenizer_json(os.path.join(d, "tokenizer.json"), 10)
    _edit_config(d, eos_token_id=20)
    with pytest.raises(ValueError, match="eos_token_id=20 is not a token"):
        hf.load_pretrained(d)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf.load_pretrained(d)


class _Boom:
    """Unpickling this writes a marker file (it must never happen)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoints_are_never_loaded(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama"][0], tmp_path, "pickle")
    os.remove(os.path.join(d, "model.safetensors"))
    marker = str(tmp_path / "unpickled")
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_Boom(marker), f)
    with pytest.raises(FileNotFoundError) as e:
        hf.load_pretrained(d)
    assert "never loaded" in _one_line(e)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_decode_matches_full_forward(hf_dirs, arch):
    """Prefill + one-token decode steps through the KV cache give the full forward's logits (every variant)."""
    p = hf.load_pretrained(hf_dirs[arch][0], tokenizer=False)
    toks = _tokens(b=2, t=9, seed=5)
    mask = np.ones_like(toks)
    full = np.asarray(models.lm_logits(p.graphdef, p.params, jnp.asarray(toks), jnp.asarray(mask)))
    cache = models.init_cache(p.config, 2, 9)
    logits, cache = models.forward_cached(p.graphdef, p.params, jnp.asarray(toks[:, :6]), jnp.asarray(mask[:, :6]),
                                          cache, 0)
    got = [np.asarray(logits)]
    for i in range(6, 9):
        logits, cache = models.forward_cached(p.graphdef, p.params, jnp.asarray(toks[:, i:i + 1]),
                                              jnp.asarray(mask[:, i:i + 1]), cache, i)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)


def test_long_sequences_match_transformers(tmp_path):
    """300 tokens, left-padded: the cache-free causal attention runs by query blocks (128, 128, 44; keys up to each
    block's end only) and must still give transformers' logits; so must the KV-cached decode that continues it."""
    from nash_lm.models import transformer

    assert 2 * transformer.ATTN_BLOCK < 300
    cls_cfg, cls_model, extra = ARCHS["llama"]
    torch.manual_seed(3)
    model = cls_model(cls_cfg(**{**COMMON, "max_position_embeddings": 320}, **extra)).eval()
    model.save_pretrained(str(tmp_path))
    p = hf.load_pretrained(str(tmp_path), tokenizer=False)
    toks = _tokens(b=2, t=300, seed=7)
    mask = np.ones_like(toks)
    mask[1, :37] = 0
    ref = _torch_logits(model, toks, mask)
    got = np.asarray(models.lm_logits(p.graphdef, p.params, jnp.asarray(toks), jnp.asarray(mask)))
    real = mask > 0
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)
    cache = models.init_cache(p.config, 2, 300)
    _, cache = models.forward_cached(p.graphdef, p.params, jnp.asarray(toks[:, :290]), jnp.asarray(mask[:, :290]),
                                     cache, 0)
    logits, _ = models.forward_cached(p.graphdef, p.params, jnp.asarray(toks[:, 290:]), jnp.asarray(mask[:, 290:]),
                                      cache, 290)
    np.testing.assert_allclose(np.asarray(logits), ref[:, 290:], atol=1e-4, rtol=0)
