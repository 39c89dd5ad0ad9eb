"""`configs/own_data.py`: a checkpoint written by transformers and three JSONL files, no Python config.

The command of the README (`python -m nash_lm.main --config=configs/own_data.py --config.checkpoint=...
--config.sft_data=... --config.pairs_data=... --config.prompts_data=...`) on a tiny random LlamaForCausalLM whose
tokenizer has a ChatML-style chat template and `<|im_end|>` as its EOS (like SmolLM2-Instruct), saved with
transformers' `save_pretrained`. Checked against transformers itself: the export's tokenizer renders a
conversation with `apply_chat_template(..., add_generation_prompt=True)` to the same ids as the base checkpoint's
tokenizer, its generation_config stops `generate` at `<|im_end|>`, and the exported model's logits are the trained
policy's. Each malformed row is printed once (the same file is the train and the eval split) and counted per file.
Bad input is one line naming the field, exit code 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import transformers  # noqa: E402  (test dependency)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
IM_END = SPECIAL.index("<|im_end|>")


def _checkpoint(path):
    """A random tiny Llama + a word-level tokenizer with a chat template, both saved by transformers."""
    import torch
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL[:4])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=IM_END, pad_token_id=0, tie_word_embeddings=True,
                                   rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = [IM_END, 1]  # a list, as chat models ship: the export keeps it
    model.save_pretrained(path)
    return path


def _files(d):
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS[:20], size=n))
    sft, pairs, prompts = [], [], []
    for _ in range(16):
        p = text(int(rng.integers(2, 5)))
        good = " ".join(reversed(p.split()))
        sft.append(json.dumps({"prompt": p, "response": good}))
        pairs.append(json.dumps({"prompt": p, "chosen": good, "rejected": text(3), "label": 0.9}))
        prompts.append(json.dumps({"prompt": p}))
    sft.insert(2, '{"prompt": "w1 w2", "response": ')  # line 3: invalid JSON
    pairs.insert(0, json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3", "label": 1.5}))  # line 1
    pairs.insert(4, json.dumps({"prompt": "w1", "chosen": "w2"}))  # line 5: no 'rejected'
    paths = {}
    for name, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        paths[name] = os.path.join(d, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.write("\n".join(rows) + "\n")
    return paths


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    return {"ckpt": _checkpoint(str(d / "tiny_chat")), **_files(str(d))}


def _cmd(user, workdir, *extra):
    small = [f"--config.train.stages.{s}.{k}={v}" for s in ("sft", "pm", "policy")
             for k, v in (("steps", 3), ("batch_size", 4), ("warmup_steps", 0), ("log_every", 1),
                          ("checkpoint_every", 3), ("eval_batches", 1))]
    return [sys.executable, "-m", "nash_lm.main", "--config=configs/own_data.py", f"--workdir={workdir}",
            f"--config.checkpoint={user['ckpt']}", f"--config.sft_data={user['sft']}",
            f"--config.pairs_data={user['pairs']}", f"--config.prompts_data={user['prompts']}",
            "--config.prompt_len=12", "--config.response_len=6", "--config.export_platforms=cpu", *small, *extra]


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def test_own_data_command_exports_a_complete_chat_model(user, tmp_path):
    workdir = str(tmp_path / "mine")
    r = _run(_cmd(user, workdir, "--config.beta=0.25"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    bad = {f"{user['sft']}:3: invalid JSON": 1, f"{user['pairs']}:1: field 'label'": 1,
           f"{user['pairs']}:5: missing field 'rejected'": 1}
    for where, n in bad.items():  # each bad row once, though each file is read as the train and the eval split
        assert out.count(where) == n, (where, out.count(where), out[-3000:])
    assert f"[data] {user['sft']}: 1 malformed row skipped" in out
    assert f"[data] {user['pairs']}: 2 malformed rows skipped" in out
    assert user["prompts"] + ":" not in out.replace(f"--config.prompts_data={user['prompts']}", "")

    config = json.load(open(os.path.join(workdir, "config.json")))  # the train config it stands for
    assert config["pipeline"] == "sft,pm,policy"
    assert config["stages"]["policy"]["algorithm"] == "nash_md_pg" and config["stages"]["policy"]["beta"] == 0.25
    hf_config = json.load(open(os.path.join(user["ckpt"], "config.json")))
    assert (config["model"]["d_model"], config["model"]["vocab_size"], config["model"]["n_layers"]) == (
        hf_config["hidden_size"], hf_config["vocab_size"], hf_config["num_hidden_layers"])
    assert config["model"]["max_len"] == 12 + 2 * 6

    export = os.path.join(workdir, "export", "hf")
    base_tok = transformers.AutoTokenizer.from_pretrained(user["ckpt"])
    tok = transformers.AutoTokenizer.from_pretrained(export)
    msgs = [{"role": "user", "content": "w3 w4 w5"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    base = base_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    base = base["input_ids"] if isinstance(base, dict) or hasattr(base, "keys") else base
    assert list(ids) == list(base) and len(ids) == 8
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", IM_END, 0)

    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.generation_config.eos_token_id == [IM_END, 1]
    # the exported weights are the trained policy's
    from nash_lm import export as export_lib, models

    cfg = models.ModelConfig.from_config({k: v for k, v in config["model"].items() if k != "architecture"})
    graphdef, params = export_lib.load_stage_params(workdir, "policy", cfg)
    tokens = np.array([list(base)], np.int32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(models.lm_logits(graphdef, params, tokens, np.ones_like(tokens)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    # generate stops at <|im_end|> (the generation_config's EOS): forced as the second new token, it ends a
    # generation that could run to 5 tokens
    n = len(base)

    def force_end(input_ids, scores):
        if input_ids.shape[1] == n + 1:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, IM_END] = 0.0
        return scores

    with torch.no_grad():
        gen = model.generate(torch.tensor([list(base)]), max_new_tokens=5, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([force_end]))
    assert gen.shape[1] == n + 2 and int(gen[0, -1]) == IM_END and IM_END not in gen[0, n:-1].tolist()


@pytest.mark.parametrize("override,expect", [
    ("--config.checkpoint=", "config.checkpoint: required"),
    ("--config.sft_data=", "config.sft_data: required"),
    ("--config.algorithm=rlhf", "config.algorithm: 'rlhf': expected a policy algorithm that takes a preference"),
])
def test_own_data_bad_input_is_one_line(user, tmp_path, override, expect):
    workdir = str(tmp_path / "w")
    r = _run(_cmd(user, workdir, override))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: " + expect), r.stderr[-1000:]
    assert not os.path.exists(workdir)
