"""The `train` job starting from a local Hugging Face checkpoint (`init="hf:/dir"` / `ref="hf:/dir"`).

A tiny random Llama built with `transformers` (torch CPU) and saved as safetensors initialises the SFT stage
through `python -m nash_lm.main`; with lr=0 the SFT stage's export is its initial parameters, which must be
exactly the imported ones (same `params_sha256`; their logits match transformers' within 1e-4), and the policy
stage after it (reference = the SFT export) trains from them. A changed checkpoint is refused on resume. Gemma
and Qwen2 checkpoints run through the same loop with `config.model.architecture`. Bad input (a shape that does
not match, a missing directory, a hub name, a tokenizer that does not fit, the wrong architecture) is one line
with exit code 2 before anything is written.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (test dependency: torch CPU)
import transformers  # noqa: E402

from nash_lm import models  # noqa: E402
from nash_lm.interop import hf, safetensors_io  # noqa: E402
from nash_lm.train import checkpoint as ckpt_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
}
V = 32  # configs/tiny.py's data and model vocabulary
HF_COMMON = dict(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# config.model of configs/tiny.py changed to the checkpoint's shape (the fields tiny.py has, so the command line can
# override them; the Llama checkpoint keeps ModelConfig's defaults for rope_theta, norm_eps and tied embeddings).
MODEL = dict(d_model=48, d_ff=40, n_layers=2, n_heads=4, n_kv_heads=2)
# arch: (config class, model class, config.json extras, config.model extras)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6), {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=12, rms_norm_eps=1e-5),
              dict(tie_embeddings=False, norm_eps=1e-5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=1000.0, rms_norm_eps=1e-6), dict(rope_theta=1000.0)),
}


def _tokenizer_json(path, n_tokens):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n_tokens)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def _make_hf(arch, directory, seed=0):
    cls_cfg, cls_model, extra, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**HF_COMMON, **extra)).eval()
    with torch.no_grad():  # move norms and biases away from their 0/1 initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    _tokenizer_json(os.path.join(directory, "tokenizer.json"), V)
    return model


def _model_overrides(arch="llama", **changes):
    fields = {**MODEL, **ARCHS[arch][3], **changes}
    return [f"--config.model.{k}={v}" for k, v in fields.items()]


def _model_config(arch="llama"):
    return models.ModelConfig(vocab_size=V, max_len=24, **MODEL, **ARCHS[arch][3])


def _run(workdir, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "nash_lm.main", f"--config={CONFIG}", f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf") / "llama")
    return d, _make_hf("llama", d)


def _job(d):
    return ["--config.pipeline=sft,nash_md_oracle", f"--config.stages.sft.init=hf:{d}", "--config.stages.sft.steps=1",
            "--config.stages.sft.lr=0.0", "--config.stages.sft.log_every=1", "--config.stages.nash_md_oracle.steps=1",
            "--config.stages.nash_md_oracle.log_every=1", *_model_overrides()]


def test_sft_starts_from_the_checkpoint_and_resume_detects_a_changed_one(tmp_path):
    d = str(tmp_path / "llama")
    model = _make_hf("llama", d)
    workdir = str(tmp_path / "run")
    proc = _run(workdir, *_job(d))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    imported = hf.load_pretrained(d, config=_model_config())
    # lr=0: the SFT export is the stage's initial policy, bit for bit the imported parameters ...
    assert summary["stages"]["sft"]["policy_params_sha256"] == ckpt_lib.params_sha256(imported.params)
    # ... whose logits are transformers' (within 1e-4).
    toks = np.random.RandomState(0).randint(0, V, (3, 12))
    with torch.no_grad():
        ref = model(torch.tensor(toks)).logits.float().numpy()
    got = np.asarray(models.lm_logits(imported.graphdef, imported.params, jnp.asarray(toks),
                                      jnp.ones(toks.shape, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # The policy stage (reference = the SFT export) trained one step away from it.
    policy = summary["stages"]["nash_md_oracle"]
    assert policy["steps"] == 1 and policy["policy_params_sha256"] != summary["stages"]["sft"]["policy_params_sha256"]
    assert np.isfinite(policy["final_metrics"]["loss"])
    with open(os.path.join(workdir, "stages", "sft", "fingerprint.json")) as f:
        init = json.load(f)["inputs"]["init"]
    assert init == {"hf": d, "sha256": hf.checkpoint_sha256(d)}

    # A checkpoint changed in place (same shapes, other values) is refused on resume, the workdir untouched.
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + np.float32(0.5)
    safetensors_io.save(path, tensors, metadata={"format": "pt"})
    before = _snapshot(workdir)
    line = _one_error_line(_run(workdir, *_job(d), timeout=120))
    assert "stage 'sft'" in line and "inputs.init.sha256" in line, line
    assert _snapshot(workdir) == before


def test_bad_checkpoint_inputs_exit_2_with_one_line(llama_dir, tmp_path):
    d, _ = llama_dir
    workdir = str(tmp_path / "bad")
    # config.model does not match the checkpoint's shapes (d_ff 64 in the config, 40 in the checkpoint)
    line = _one_error_line(_run(workdir, *_job(d), "--config.model.d_ff=64", timeout=120))
    assert "config.stages.sft.init" in line and "d_ff=40" in line and "ModelConfig.d_ff=64" in line, line
    # a directory that does not exist
    line = _one_error_line(_run(workdir, *_job(str(tmp_path / "nowhere")), timeout=120))
    assert "config.stages.sft.init" in line and "no such checkpoint directory" in line, line
    assert not os.path.exists(workdir)


def _tiny(arch="llama", **model_changes):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    config = tiny.get_config()
    fields = {**MODEL, **ARCHS[arch][3], **model_changes}
    with config.unlocked():
        for k, v in fields.items():
            config.model[k] = v
        if arch != "llama":
            config.model.architecture = arch
    return config


def test_bad_inputs_in_process(llama_dir, tmp_path):
    from nash_lm.train import spec as spec_lib

    d, _ = llama_dir
    workdir = str(tmp_path / "w")

    def refused(config, needle):
        with pytest.raises(ValueError) as e:
            spec_lib.resolve(config, workdir)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)

    config = _tiny()
    config.stages.sft.init = "hf:meta-llama/Llama-3.2-1B"  # a hub name: refused, nothing is downloaded
    refused(config, "config.stages.sft.init: 'hf:meta-llama/Llama-3.2-1B': expected 'hf:/absolute/path")
    config = _tiny()
    config.stages.pm.init = f"hf:{d}"  # judges are not language models
    refused(config, "config.stages.pm.init")
    config = _tiny(architecture="gemma")
    config.stages.sft.init = f"hf:{d}"
    refused(config, "checkpoint is a 'llama' model (config.json model_type) but config.model.architecture is "
                    "'gemma'")
    config = _tiny(rope_theta=500.0)
    config.stages.nash_md_oracle.ref = f"hf:{d}"  # a reference from a checkpoint is checked the same way
    config.pipeline = "nash_md_oracle"
    refused(config, "config.stages.nash_md_oracle.ref: " + d + ": checkpoint has rope_theta=10000.0")
    bad_tok = str(tmp_path / "tok")
    os.makedirs(bad_tok)
    for f in os.listdir(d):
        os.symlink(os.path.join(d, f), os.path.join(bad_tok, f))
    os.remove(os.path.join(bad_tok, "tokenizer.json"))
    _tokenizer_json(os.path.join(bad_tok, "tokenizer.json"), V + 4)
    config = _tiny()
    config.stages.sft.init = f"hf:{bad_tok}"
    refused(config, f"has id {V + 3}, which does not fit the model's vocab_size={V}")
    os.remove(os.path.join(bad_tok, "tokenizer.json"))
    refused(config, "no tokenizer.json")
    assert not os.path.exists(workdir)


def test_policy_reference_straight_from_the_checkpoint(llama_dir, tmp_path):
    """`ref="hf:/dir"` on a policy stage: validated, and its reference and initial policy are the imported
    parameters, placed with the stage's parameter shardings (built without compiling the step)."""
    from nash_lm.train import inputs as inputs_lib
    from nash_lm.train import spec as spec_lib

    d, _ = llama_dir
    workdir = str(tmp_path / "w")
    config = _tiny()
    config.stages.nash_md_oracle.ref = f"hf:{d}"
    config.pipeline = "nash_md_oracle"
    run = spec_lib.resolve(config, workdir)
    assert not os.path.exists(workdir)
    spec = run.stages["nash_md_oracle"]
    assert spec.fingerprint["inputs"]["ref"] == {"hf": d, "sha256": hf.checkpoint_sha256(d)}
    inputs = inputs_lib.StageInputs(spec, run)
    want = ckpt_lib.params_sha256(hf.load_pretrained(d, config=_model_config()).params)
    policy = inputs.init_policy()
    assert ckpt_lib.params_sha256(inputs.ref) == want and ckpt_lib.params_sha256(policy) == want
    for got, abstract in zip(jax.tree.leaves(policy), jax.tree.leaves(inputs.abstract_policy)):
        assert got.sharding == abstract.sharding and got.dtype == abstract.dtype


@pytest.mark.parametrize("arch", ["gemma", "qwen2"])
def test_gemma_and_qwen2_through_the_loop(arch, tmp_path):
    """In process: an SFT stage (lr=0) from the checkpoint exports exactly the imported parameters, built with the
    architecture's decoder variant; a policy stage samples and trains with that variant against it."""
    from nash_lm.train import pipeline

    d = str(tmp_path / arch)
    _make_hf(arch, d)
    config = _tiny(arch)
    config.pipeline = "sft,nash_md_oracle"
    config.stages.sft.init = f"hf:{d}"
    config.stages.sft.steps = 1
    config.stages.sft.lr = 0.0
    config.stages.nash_md_oracle.steps = 1
    config.peak_tflops = 1.0
    summary = pipeline.run(config, str(tmp_path / "run"))
    imported = hf.load_pretrained(d, config=_model_config(arch))
    assert imported.architecture == arch
    assert summary["stages"]["sft"]["policy_params_sha256"] == ckpt_lib.params_sha256(imported.params)
    assert np.isfinite(summary["stages"]["nash_md_oracle"]["final_metrics"]["loss"])
