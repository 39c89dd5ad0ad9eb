"""`nash_lm.export`: the serialized `jax.export` sampler against the in-process sampler, and the CLI end to end
(a tiny `train` run -> params-only bf16 orbax, HF safetensors loaded by transformers, StableHLO sampler)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nash_lm import export, models, sampling
from nash_lm.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _prompts(b, t, vocab, seed=0):
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        pad = rng.randint(0, t - 1)
        mask[i, :pad] = 0
        toks[i, :pad] = 0
    return toks, mask


def test_serialized_sampler_reproduces_in_process_tokens():
    cfg = models.ModelConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=32)
    graphdef, params = models.init(cfg, "lm", seed=1)
    settings = dict(max_new_tokens=9, eos_id=2, pad_id=0, temperature=0.7, top_k=20, top_p=0.95)
    exp = export.export_sampler(graphdef, params, batch_size=4, prompt_len=7, platforms=("cpu", "tpu"), **settings)
    blob = exp.serialize()
    restored = jax.export.deserialize(bytearray(blob))
    assert set(restored.platforms) == {"cpu", "tpu"}
    assert "stablehlo" in restored.mlir_module()
    flat = export.flatten(ckpt_lib.to_pure_dict(params))
    prompts, mask = _prompts(4, 7, 37)
    ref_fn = jax.jit(lambda p, x, m, k: sampling.sample(graphdef, p, x, m, k, **settings))
    for seed in range(3):
        key_data = jax.random.key_data(jax.random.key(seed))
        got = restored.call(flat, prompts, mask, key_data)
        ref = ref_fn(params, prompts, mask, jax.random.wrap_key_data(key_data))
        np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(got["mask"]), np.asarray(ref.mask))
        np.testing.assert_allclose(np.asarray(got["logp"]), np.asarray(ref.logp_sample), atol=1e-6)
    assert len(set(np.asarray(ref.tokens).ravel().tolist())) > 3  # a real sample, not a constant


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("train") / "wd")
    cmd = [sys.executable, "-m", "nash_lm.main", "--config=configs/tiny.py", f"--workdir={wd}",
           "--config.pipeline=sft", "--config.stages.sft.steps=3", "--config.async_checkpoints=False",
           "--config.peak_tflops=1.0"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def test_cli_export_end_to_end(workdir, tmp_path):
    import torch
    import transformers
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "nash_lm.export", f"--workdir={workdir}", f"--out={out}",
                        "--batch_size=3", "--max_new_tokens=5", "--platforms=cpu,cuda,tpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.load(open(os.path.join(out, "export.json")))
    assert manifest["stage"] == "sft" and manifest["platforms"] == ["cpu", "cuda", "tpu"]
    done = json.load(open(os.path.join(workdir, "stages", "sft", "done.json")))
    assert manifest["params_sha256"] == done["policy_params_sha256"]

    cfg, _ = export.find_policy_stage(workdir)[1:]
    graphdef, params = export.load_stage_params(workdir, "sft", cfg)

    # 1. params-only checkpoint: bfloat16 copies of the trained parameters
    import orbax.checkpoint as ocp
    ck = ocp.StandardCheckpointer()
    low = export.flatten(ck.restore(os.path.join(out, "params"))["policy"])
    ck.close()
    full = export.flatten(ckpt_lib.to_pure_dict(params))
    assert set(low) == set(full)
    for k in full:
        assert np.asarray(low[k]).dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(low[k]), np.asarray(full[k]).astype(jnp.bfloat16))

    # 2. Hugging Face export: transformers' LlamaForCausalLM gives nash-lm's logits
    hf_model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = hf_model(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(models.lm_logits(graphdef, params, jnp.asarray(toks), jnp.ones(toks.shape, jnp.int32)))
    np.testing.assert_allclose(ref, ours, atol=1e-4, rtol=0)

    # 3. the serialized sampler, with OUT/params bound, reproduces the in-process sampler on those params
    serve = export.load_sampler(out)
    meta = json.load(open(os.path.join(out, "sampler", "sampler.json")))
    prompts, mask = _prompts(3, meta["prompt_len"], cfg.vocab_size, seed=5)
    low_tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    key_data = jax.random.key_data(jax.random.key(11))
    got = serve(prompts, mask, key_data)
    ref = jax.jit(lambda p: sampling.sample(graphdef, p, prompts, mask, jax.random.wrap_key_data(key_data),
                                            max_new_tokens=5, eos_id=2, pad_id=0))(low_tree)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(ref.tokens))


def test_bad_input_is_one_line(workdir, tmp_path):
    cases = [
        (dict(workdir=f"{tmp_path}/nowhere", out=f"{tmp_path}/o1"), "no config.json"),
        (dict(workdir=workdir, out=f"{tmp_path}/o2", stage="nope"), "--stage=nope: not a stage"),
        (dict(workdir=workdir, out=f"{tmp_path}/o3", prompt_len=20, max_new_tokens=20),
         "exceeds ModelConfig.max_len=24"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError) as e:
            export.run(**kwargs)
        assert msg in str(e.value) and "\n" not in str(e.value)
        assert not os.path.exists(kwargs["out"])
    # the CLI: one "error:" line and exit code 2
    r = subprocess.run([sys.executable, "-m", "nash_lm.export", f"--workdir={workdir}", f"--out={tmp_path}/o4",
                        "--stage=nope"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--stage=nope: not a stage" in err[0], r.stderr[-2000:]
