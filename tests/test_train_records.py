"""The `train` job on the user's own data: a Llama checkpoint written by transformers and three JSONL files.

sft -> preference -> Nash-MD-PG through `python -m nash_lm.main`, reading SFT demonstrations, preference pairs
and prompts (a few rows malformed: reported as path:line and skipped), tokenized by the checkpoint's
tokenizer.json through its chat template (checked token for token against transformers' `apply_chat_template`);
the export loads in `transformers.LlamaForCausalLM`. `kill -9` during the policy stage, then the same command:
the final parameters equal an uninterrupted run's (the grain iterator's position is restored with the
checkpoint). Bad input is one line naming the file and line or the field, exit code 2, nothing written."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import transformers  # noqa: E402  (test dependency)

from nash_lm.data import features
from nash_lm.data import tokenizer as tokenizer_lib
from nash_lm.train import spec as spec_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = dict(vocab_size=len(SPECIAL) + len(WORDS), d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
             max_len=64)


def _checkpoint(path):
    """A random tiny Llama + a word-level tokenizer.json with a chat template, written by transformers."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=MODEL["vocab_size"], hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _files(d):
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS[:20], size=n))
    sft, prefs, prompts = [], [], []
    for _ in range(24):
        p = text(int(rng.integers(2, 6)))
        good = " ".join(reversed(p.split()))
        sft.append(json.dumps({"prompt": p, "response": good}))
        prefs.append(json.dumps({"prompt": p, "chosen": good, "rejected": text(3),
                                 "label": float(rng.uniform(0.6, 1.0))}))
        prompts.append(json.dumps({"prompt": p}))
    sft.insert(2, '{"prompt": "w1 w2", "response": ')  # line 3: invalid JSON
    sft.insert(5, json.dumps({"prompt": "w3"}))  # line 6: no response
    prefs.insert(0, json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3", "label": 1.5}))  # line 1
    paths = {}
    for name, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts)):
        paths[name] = os.path.join(d, f"{name}.jsonl")
        with open(paths[name], "wb") as f:
            f.write("\n".join(rows).encode() + b"\n")
    with open(paths["prompts"], "ab") as f:
        f.write(b'{"prompt": "\xff\xfe"}\n')  # the last line (25): not UTF-8
    return paths


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    return {"ckpt": _checkpoint(str(d / "tiny_llama")), **_files(str(d)), "dir": str(d)}


def _config_text(user, **data):
    data = {"kind": "records", "prompt_len": 12, "response_len": 6, "tokenizer": "", "chat_template": True,
            "truncation": "keep_end", "on_error": "skip", **data}
    return f'''
import ml_collections
from nash_lm.train.config import stage

def get_config():
    c = ml_collections.ConfigDict()
    c.job = "train"
    c.seed = 0
    c.peak_tflops = 1.0
    c.async_checkpoints = True
    c.data = ml_collections.ConfigDict({data!r})
    c.model = ml_collections.ConfigDict({MODEL!r})
    c.judge_model = ml_collections.ConfigDict({MODEL!r})
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = ""
    c.stages = ml_collections.ConfigDict()
    c.stages.sft = stage("sft", init="hf:{user['ckpt']}", train_data={user['sft']!r}, eval_data={user['sft']!r},
                         steps=4, batch_size=4, lr=1e-3, log_every=2, checkpoint_every=4, eval_batches=1)
    c.stages.pm = stage("preference", init="sft", train_data={user['prefs']!r}, eval_data={user['prefs']!r},
                        steps=4, batch_size=4, lr=1e-3, log_every=2, checkpoint_every=4, eval_batches=1)
    c.stages.md = stage("nash_md_pg", ref="sft", judge="pm", train_data={user['prompts']!r},
                        eval_data={user['prompts']!r}, steps=8, batch_size=4, lr=1e-3, beta=0.125, tau=0.1,
                        max_new_tokens=6, missing_eos_penalty=0.1, log_every=2, checkpoint_every=2, eval_batches=1)
    c.pipeline = "sft,pm,md"
    return c
'''


def _write_config(user, name="config.py", **data):
    path = os.path.join(user["dir"], name)
    with open(path, "w") as f:
        f.write(_config_text(user, **data))
    return path


def _cmd(config, workdir):
    return [sys.executable, "-m", "nash_lm.main", f"--config={config}", f"--workdir={workdir}"]


def _load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_chat_prompts_match_transformers_apply_chat_template(user):
    tok = tokenizer_lib.HFTokenizer(os.path.join(user["ckpt"], "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    theirs = transformers.AutoTokenizer.from_pretrained(user["ckpt"])
    for prompt in ("w1 w2 w3", "w7"):
        ref = theirs.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        assert features.prompt_ids(tok, prompt, chat=True) == ref
        assert features.prompt_ids(tok, prompt) == list(theirs(prompt)["input_ids"])
    ids = features.prompt_ids(tok, "w1 w2 w3 w4 w5", chat=True)  # <|user|> w1 .. w5 <|assistant|>
    tokens, mask = features.encode_prompt(tok, "w1 w2 w3 w4 w5", 4, chat=True, truncation="keep_end")
    assert tokens.tolist() == ids[-4:] and mask.tolist() == [1, 1, 1, 1]  # the generation prompt survives
    tokens, _ = features.encode_prompt(tok, "w1 w2 w3 w4 w5", 4, chat=True, truncation="keep_start")
    assert tokens.tolist() == ids[:4]


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, **kw)


def test_user_data_pipeline_reports_bad_rows_exports_to_transformers_and_resumes_after_kill_9(user, tmp_path):
    config = _write_config(user)
    full = str(tmp_path / "full")
    r = _run(_cmd(config, full))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for where in (f"{user['sft']}:3: invalid JSON", f"{user['sft']}:6: missing field 'response'",
                  f"{user['prefs']}:1: field 'label': expected a number in [0, 1], got 1.5",
                  f"{user['prompts']}:25: invalid UTF-8"):
        assert where in out, where
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["pipeline"] == ["sft", "pm", "md"]
    done = json.load(open(os.path.join(full, "stages", "sft", "done.json")))
    assert done["data"]["train"]["kept"] == 24 and done["data"]["train"]["skipped"] == 2
    md = summary["stages"]["md"]["final_metrics"]
    assert 0.0 <= md["missing_eos_rate"] <= 1.0

    # the export loads in transformers and gives the logits of nash-lm's own policy
    export = str(tmp_path / "export")
    r = _run([sys.executable, "-m", "nash_lm.export", f"--workdir={full}", f"--out={export}", "--platforms=cpu"])
    assert r.returncode == 0, r.stderr[-2000:]
    # by default the run's own tokenizer (the hf: checkpoint's) and its ids, as transformers reads them
    with open(os.path.join(export, "export.json")) as f:
        manifest = json.load(f)
    assert manifest["tokenizer"] == os.path.join(user["ckpt"], "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(user["ckpt"])
    assert (manifest["sampler"]["eos_id"], manifest["sampler"]["pad_id"]) == (hf_tok.eos_token_id,
                                                                                hf_tok.pad_token_id)
    assert os.path.isfile(os.path.join(export, "hf", "tokenizer.json"))
    import torch

    model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(export, "hf"))
    tokens = np.array([[1, 3, 10, 11, 12, 4, 13, 14]], np.int32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    from nash_lm import export as export_lib, models

    cfg = models.ModelConfig.from_config(MODEL)
    graphdef, params = export_lib.load_stage_params(full, "md", cfg)
    ours = np.asarray(models.lm_logits(graphdef, params, tokens, np.ones_like(tokens)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    # kill -9 while the policy stage runs (after its first checkpoint), then the same command
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(config, killed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = os.path.join(killed, "stages", "md", "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(killed, "stages", "md", "done.json"))
    r = _run(_cmd(config, killed))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.load(open(os.path.join(killed, "summary.json")))
    assert resumed["policy_params_sha256"] == summary["policy_params_sha256"]


@pytest.mark.parametrize("case", ["missing", "empty", "raise", "label_raise", "too_long", "max_len", "vocab",
                                  "synthetic", "no_tokenizer"])
def test_bad_input_is_one_line_naming_the_file_or_field(user, tmp_path, case):
    data, stages = {}, {}
    if case == "missing":
        stages["sft"] = {"train_data": os.path.join(user["dir"], "nope.jsonl")}
        expect = f"config.stages.sft.train_data: {os.path.join(user['dir'], 'nope.jsonl')}: no such file"
    elif case == "empty":
        empty = os.path.join(user["dir"], "empty.jsonl")
        open(empty, "w").close()
        stages["sft"] = {"train_data": empty}
        expect = f"config.stages.sft.train_data: no valid 'sft' records in {empty}"
    elif case == "raise":
        data["on_error"] = "raise"
        expect = f"config.stages.sft.train_data: {user['sft']}:3: invalid JSON"
    elif case == "label_raise":
        data["on_error"] = "raise"
        stages["sft"] = {"train_data": os.path.join(user["dir"], "sft_ok.jsonl"),
                         "eval_data": os.path.join(user["dir"], "sft_ok.jsonl")}
        with open(stages["sft"]["train_data"], "w") as f:
            f.write("\n".join(json.dumps({"prompt": "w1", "response": "w2"}) for _ in range(8)) + "\n")
        expect = f"config.stages.pm.train_data: {user['prefs']}:1: field 'label': expected a number in [0, 1]"
    elif case == "too_long":
        data.update(truncation="error", prompt_len=3, on_error="raise")  # every chat prompt has >= 4 tokens
        expect = f"config.stages.sft.train_data: {user['sft']}:1: prompt has"
    elif case == "max_len":
        data.update(prompt_len=50, response_len=20)
        expect = "config.data.prompt_len: prompt_len 50 + response_len 20 = 70 tokens exceed config.model.max_len 64"
    elif case == "vocab":
        tok = os.path.join(user["dir"], "big_tokenizer.json")
        from tokenizers import Tokenizer, models as tok_models

        Tokenizer(tok_models.WordLevel({**{t: i for i, t in enumerate(SPECIAL)}, **{f"x{i}": 5 + i for i in
                                                                                    range(100)}},
                                       unk_token="<pad>")).save(tok)
        data["tokenizer"] = tok
        expect = "config.data.tokenizer: the tokenizer"
    elif case == "synthetic":
        data = None
        expect = "config.stages.sft.train_data: names records files, which need config.data.kind = 'records'"
    else:
        data["tokenizer"] = ""
        stages["sft"] = {"init": ""}
        expect = "config.data.tokenizer: '' takes the tokenizer of the pipeline's hf: checkpoint"
    config = _load_config(_write_config(user, f"config_{case}.py", **(data or {})))
    if data is None:
        config.data = dict(kind="synthetic", vocab_size=MODEL["vocab_size"], prompt_len=12, response_len=6,
                           n_examples=64, seed=0)
    for name, fields in stages.items():
        for k, v in fields.items():
            config.stages[name][k] = v
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError) as e:
        spec_lib.resolve(config, workdir, devices=jax.devices()[:1])
    msg = str(e.value)
    assert msg.startswith(expect), msg
    assert "\n" not in msg
    assert not os.path.exists(workdir)


def test_cli_bad_row_exit_2_nothing_written(user, tmp_path):
    config = _write_config(user, "config_cli.py", on_error="raise")
    workdir = str(tmp_path / "w")
    r = _run(_cmd(config, workdir))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].endswith(f"config.stages.sft.train_data: {user['sft']}:3: invalid JSON (Expecting value at "
                              f"column 32)") or f"{user['sft']}:3: invalid JSON" in lines[-1], lines[-1]
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("algorithm", ["dpo", "offline_ipo"])
def test_offline_stages_read_preference_records_and_refuse_prompt_only_data(user, tmp_path, algorithm):
    """A DPO / offline-IPO stage reads its pairs from preference records (chosen/rejected and a soft label, the
    judges' format); pointed at prompt-only records it is one line naming the field and the file, before
    anything is written."""
    from nash_lm.train import config as cfg_lib

    config = _load_config(_write_config(user, f"config_{algorithm}.py"))
    config.stages.off = cfg_lib.stage(algorithm, ref="sft", train_data=user["prefs"], eval_data=user["prefs"],
                                      steps=4, batch_size=4, lr=1e-3, eval_batches=1)
    config.pipeline = "sft,off"
    workdir = str(tmp_path / "w")
    run = spec_lib.resolve(config, workdir, devices=jax.devices()[:1])
    train = run.sources["off"]["train"]
    assert train.kind == "preference" and len(train) == 24  # the 24 valid pairs (line 1's label is rejected)
    config.stages.off.train_data = user["prompts"]
    with pytest.raises(ValueError) as e:
        spec_lib.resolve(config, workdir, devices=jax.devices()[:1])
    msg = str(e.value)
    assert msg.startswith("config.stages.off.train_data: no valid 'preference' records in ") and "\n" not in msg, msg
    assert user["prompts"] in msg
    assert not os.path.exists(workdir)
