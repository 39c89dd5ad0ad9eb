"""LoRA stages of the `train` job (configs/tiny.py's sft_lora, nash_md_lora, nash_ema_lora) through
`python -m nash_lm.main`: what the checkpoints hold (adapters and their Adam moments only, the base's hash), the
merged export against the adapted model (nash-lm and transformers' LlamaForCausalLM), mu = the base exactly,
exact resume, a changed base refused on resume, and bad adapter settings as one-line errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
PIPELINE = "sft,pm,pm_lora,rm_lora,sft_lora,nash_md_lora,nash_ema_lora"
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",
}


def _run(workdir, *overrides, pipeline=PIPELINE):
    cmd = [sys.executable, "-m", "nash_lm.main", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--config.pipeline={pipeline}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _tiny():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    return tiny.get_config()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lora"))
    proc = _run(wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


def _done(workdir, name):
    with open(os.path.join(workdir, "stages", name, "done.json")) as f:
        return json.load(f)


def _tree_paths(directory):
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(directory).item_metadata
    finally:
        ckptr.close()
    return ["/".join(p) for p in _paths(dict(meta))]


def _paths(node, prefix=()):
    if isinstance(node, dict) or hasattr(node, "keys"):
        for k in node.keys():
            yield from _paths(node[k], prefix + (str(k),))
    else:
        yield prefix


def test_checkpoints_hold_the_adapters_and_the_base_hash(workdir):
    for name in ("sft_lora", "nash_md_lora", "nash_ema_lora"):
        stage = os.path.join(workdir, "stages", name)
        done = _done(workdir, name)
        assert done["adapters"]["rank"] == 4 and len(done["adapters"]["base_sha256"]) == 64
        step = max(int(d) for d in os.listdir(os.path.join(stage, "checkpoints")) if d.isdigit())
        paths = _tree_paths(os.path.join(stage, "checkpoints", str(step), "state"))
        params = [p for p in paths if p.split("/")[0] in ("policy", "ema", "opt_state") and "/blocks/" in f"/{p}"]
        assert params and all("/lora_" in p for p in params), [p for p in params if "/lora_" not in p][:3]
        assert not any(p.startswith("policy/embed") or "/embed" in p for p in paths)  # no base weight at all
        with open(os.path.join(stage, "checkpoints", str(step), "meta", "metadata")) as f:
            assert json.load(f)["base_sha256"] == done["adapters"]["base_sha256"]
        # adapters/ holds the adapters alone, export/ a plain tree
        assert all("/lora_" in p for p in _tree_paths(os.path.join(stage, "adapters")))
        assert not any("lora_" in p for p in _tree_paths(os.path.join(stage, "export")))
    # the SFT base of both policy stages
    assert (_done(workdir, "nash_md_lora")["adapters"]["base_sha256"]
            == _done(workdir, "sft_lora")["adapters"]["base_sha256"] == _done(workdir, "sft")["policy_params_sha256"])
    assert _done(workdir, "nash_ema_lora")["ema_params_sha256"] != _done(workdir, "nash_ema_lora")[
        "policy_params_sha256"]


def _load(workdir, name, lora_cfg=None, tree="export", key="policy"):
    from nash_lm import models
    from nash_lm.models import lora
    from nash_lm.train import checkpoint as ckpt_lib, config as cfg_lib

    cfg = cfg_lib.model_config(_tiny())
    graphdef, shapes = models.abstract_init(cfg, "lm", lora_cfg)
    if lora_cfg is not None:
        shapes = lora.split(shapes)[0]
    return graphdef, ckpt_lib.load_params(os.path.join(workdir, "stages", name, tree), {key: shapes})[key]


def _lora_cfg(name):
    from nash_lm.train import config as cfg_lib

    return cfg_lib.lora_config(_tiny().stages[name])


def test_merged_export_equals_the_adapted_model(workdir):
    from nash_lm import models
    from nash_lm.models import lora

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 32, (4, 10)), jnp.int32)
    mask = jnp.ones_like(tokens)
    g_base, base = _load(workdir, "sft")
    for name, key in (("nash_md_lora", "policy"), ("nash_ema_lora", "ema"), ("sft_lora", "policy")):
        g_ad, adapters = _load(workdir, name, _lora_cfg(name), "adapters", key)
        _, merged = _load(workdir, name, key=key)
        adapted = models.lm_logits(g_ad, lora.join(adapters, base), tokens, mask)
        np.testing.assert_allclose(np.asarray(models.lm_logits(g_base, merged, tokens, mask)), np.asarray(adapted),
                                   atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(adapted - models.lm_logits(g_base, base, tokens, mask))).max() > 1e-4, name


def _load_judge(workdir, name, kind, lora_cfg=None, tree="export"):
    from nash_lm import models
    from nash_lm.models import lora
    from nash_lm.train import checkpoint as ckpt_lib, config as cfg_lib

    graphdef, shapes = models.abstract_init(cfg_lib.model_config(_tiny(), "judge_model"), kind, lora_cfg)
    if lora_cfg is not None:
        shapes = lora.split(shapes)[0]
    return graphdef, ckpt_lib.load_params(os.path.join(workdir, "stages", name, tree), {"policy": shapes})["policy"]


@pytest.mark.parametrize("name,kind", [("pm_lora", "preference"), ("rm_lora", "reward")])
def test_adapted_judges_train_adapters_and_head_on_the_sft_decoder(workdir, name, kind):
    """An adapted judge's checkpoint holds its adapters and head only; its export is a plain judge computing the
    adapted one (the SFT decoder + adapters + head), and a policy stage reads it as its judge (nash_ema_lora)."""
    from flax import nnx

    from nash_lm import models
    from nash_lm.models import lora

    stage = os.path.join(workdir, "stages", name)
    done = _done(workdir, name)
    step = max(int(d) for d in os.listdir(os.path.join(stage, "checkpoints")) if d.isdigit())
    paths = [p for p in _tree_paths(os.path.join(stage, "checkpoints", str(step), "state"))
             if p.split("/")[0] in ("policy", "opt_state")]
    heads = ("score",) if kind == "preference" else ("score", "bias")
    backbone = [p for p in paths if "/backbone/" in p]
    assert backbone and all("/lora_" in p for p in backbone), [p for p in backbone if "/lora_" not in p][:3]
    for h in heads:  # the head in the trained tree and in both Adam moments
        assert {p for p in paths if f"/{h}/" in p} >= {f"policy/{h}/value", f"opt_state/1/0/mu/{h}/value"}, h
    assert len(done["adapters"]["base_sha256"]) == 64
    g_plain, exported = _load_judge(workdir, name, kind)
    g_ad, trained = _load_judge(workdir, name, kind, _lora_cfg(name), "adapters")
    _, sft = _load(workdir, "sft")
    adapted = lora.join(trained, nnx.State({"backbone": sft}))
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 32, (4, 10)), jnp.int32)
    mask = jnp.ones_like(tokens)
    if kind == "reward":
        out = lambda g, p: models.reward(g, p, tokens, mask)
    else:
        out = lambda g, p: models.preference_prob(g, p, tokens[:, :4], mask[:, :4], tokens[:, 4:7], mask[:, 4:7],
                                                  tokens[::-1, 7:], mask[:, 7:])
    np.testing.assert_allclose(np.asarray(out(g_plain, exported)), np.asarray(out(g_ad, adapted)), atol=1e-5,
                               rtol=1e-5)
    assert max(float(np.abs(np.asarray(x)).max()) for p, x in jax.tree_util.tree_leaves_with_path(trained)
               if "'b'" in jax.tree_util.keystr(p)) > 0  # the adapters trained (B starts at 0)
    assert _done(workdir, "nash_ema_lora")["policy_params_sha256"]


def test_hf_export_of_the_merged_policy_loads_in_transformers(workdir, tmp_path):
    import torch
    import transformers

    from nash_lm import export, models
    from nash_lm.models import lora

    out = str(tmp_path / "out")
    export.run(workdir, out, stage="nash_md_lora", platforms=("cpu",), params_dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    tokens = np.random.default_rng(1).integers(3, 32, (2, 9))
    with torch.no_grad():
        got = hf(torch.tensor(tokens)).logits.numpy()
    g_base, base = _load(workdir, "sft")
    g_ad, adapters = _load(workdir, "nash_md_lora", _lora_cfg("nash_md_lora"), "adapters")
    want = models.lm_logits(g_ad, lora.join(adapters, base), jnp.asarray(tokens, jnp.int32),
                            jnp.ones(tokens.shape, jnp.int32))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)
    # and the adapters alone
    only = str(tmp_path / "only")
    manifest = export.run(workdir, only, stage="nash_md_lora", adapters_only=True)
    assert sorted(os.listdir(only)) == ["adapters", "adapters.json", "export.json"]
    assert manifest["adapters"]["base_sha256"] == _done(workdir, "sft")["policy_params_sha256"]


def test_mu_is_the_base_and_the_policy_moves_away_from_it(workdir):
    """In the compiled step's own terms: `_policy` joins the adapters with the base; mu (the base with zero
    adapters) gives the base's logits exactly, the trained policy others."""
    from nash_lm import models
    from nash_lm.models import lora
    from nash_lm.train import step

    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 32, (3, 8)), jnp.int32)
    mask = jnp.ones_like(tokens)
    g_base, base = _load(workdir, "sft")
    g_ad, adapters = _load(workdir, "nash_md_lora", _lora_cfg("nash_md_lora"), "adapters")
    mu = lora.join(jax.tree.map(jnp.zeros_like, adapters), base)
    want = models.lm_logits(g_base, base, tokens, mask)
    np.testing.assert_array_equal(np.asarray(models.lm_logits(g_ad, mu, tokens, mask)), np.asarray(want))
    pi = step._policy(adapters, mu)
    assert np.abs(np.asarray(models.lm_logits(g_ad, pi, tokens, mask) - want)).max() > 1e-4


def test_resume_is_exact_and_a_changed_base_is_refused(workdir, tmp_path):
    from nash_lm.train import checkpoint as ckpt_lib

    wd = str(tmp_path / "wd")
    shutil.copytree(workdir, wd)
    stage = os.path.join(wd, "stages", "nash_md_lora")
    for path in ("done.json", "export", "adapters", "adapters.json", "checkpoints/4"):
        full = os.path.join(stage, path)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    os.remove(os.path.join(wd, "summary.json")) if os.path.exists(os.path.join(wd, "summary.json")) else None
    proc = _run(wd, pipeline="sft,pm,nash_md_lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"nash_md_lora:\s+50%.*2/4 \[00:00<\?", proc.stderr)  # its progress bar starts at step 2
    assert _done(wd, "nash_md_lora")["policy_params_sha256"] == _done(workdir, "nash_md_lora")["policy_params_sha256"]
    # the base's content changes under an unchanged config: the adapters' checkpoint is refused
    for path in ("done.json", "export", "adapters", "adapters.json", "checkpoints/4"):
        full = os.path.join(stage, path)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    g, base = _load(wd, "sft")
    sft_export = os.path.join(wd, "stages", "sft", "export")
    shutil.rmtree(sft_export)
    ckpt_lib.export_params(sft_export, {"policy": jax.tree.map(lambda x: x * 1.01, base)})
    proc = _run(wd, pipeline="sft,pm,nash_md_lora")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint 2 adapts a base with sha256" in err, err
    assert not os.path.exists(os.path.join(stage, "done.json"))


@pytest.mark.parametrize("overrides,needle", [
    (dict(lora_rank=-1), "config.stages.nash_md_lora.lora_rank: must be > 0 (or 0: no adapters), got -1"),
    (dict(lora_rank=33), "config.stages.nash_md_lora.lora_rank: 33 exceeds 32"),
    (dict(lora_targets="q,zz"), "config.stages.nash_md_lora.lora_targets: 'zz' matches no projection"),
    (dict(lora_alpha=0.0), "config.stages.nash_md_lora.lora_alpha: must be > 0"),
    (dict(init="sft_lora"), "config.stages.nash_md_lora.init: 'sft_lora': with adapters the policy is its "
                            "reference"),
])
def test_bad_adapter_settings_are_one_line_errors(tmp_path, overrides, needle):
    from nash_lm.train import spec

    config = _tiny()
    config.pipeline = "sft,pm,sft_lora,nash_md_lora"
    for k, v in overrides.items():
        config.stages.nash_md_lora[k] = v
    with pytest.raises(ValueError) as e:
        spec.resolve(config, str(tmp_path))
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)
    assert not os.listdir(tmp_path)


def test_adapters_on_a_judge_or_an_sft_stage_without_base_are_refused(tmp_path):
    from nash_lm.train import spec

    config = _tiny()
    config.pipeline = "sft,pm"
    config.stages.pm.lora_rank = 2  # pm starts from random weights: no decoder to adapt
    with pytest.raises(ValueError, match=r"^config.stages.pm.init: '': an adapted preference model adapts a "
                                         r"language model's decoder"):
        spec.resolve(config, str(tmp_path))
    config.pipeline = "sft,rm,rm_lora"
    config.stages.pm.lora_rank = 0
    config.stages.rm_lora.init = "rm"  # a trained reward model is not a decoder to adapt
    with pytest.raises(ValueError, match=r"^config.stages.rm_lora.init: 'rm': an adapted reward model"):
        spec.resolve(config, str(tmp_path))
    config = _tiny()
    config.pipeline = "sft"
    config.stages.sft.lora_rank = 2
    with pytest.raises(ValueError, match=r"^config.stages.sft.init: adapters need a base to adapt"):
        spec.resolve(config, str(tmp_path))


def test_stages_without_adapters_keep_their_fingerprints():
    """The LoRA fields enter a stage's fingerprint only when lora_rank > 0 (old workdirs still resume)."""
    from nash_lm.train import config as cfg_lib

    config = _tiny()
    fp = cfg_lib.stage_fingerprint(config, "nash_md")
    assert not any(k.startswith("lora_") for k in fp["stage"])
    assert cfg_lib.stage_fingerprint(config, "nash_md_lora")["stage"]["lora_rank"] == 4


def test_adapters_on_a_hugging_face_base(tmp_path):
    """init / ref = 'hf:/dir': the adapters train on the imported checkpoint, whose content hash is the base's."""
    from test_train_pretrained import _make_hf, _model_config, _model_overrides

    from nash_lm.interop import hf
    from nash_lm.train import checkpoint as ckpt_lib

    ckpt = str(tmp_path / "hf")
    _make_hf("llama", ckpt)
    wd = str(tmp_path / "wd")
    proc = _run(wd, *_model_overrides(), "--config.model.max_len=24", f"--config.stages.sft_lora.init=hf:{ckpt}",
                f"--config.stages.nash_md_lora.ref=hf:{ckpt}", pipeline="pm,sft_lora,nash_md_lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = hf.load_pretrained(ckpt, config=_model_config(), tokenizer=False).params
    for name in ("sft_lora", "nash_md_lora"):
        assert _done(wd, name)["adapters"]["base_sha256"] == ckpt_lib.params_sha256(imported), name
    assert _done(wd, "nash_md_lora")["policy_params_sha256"] != ckpt_lib.params_sha256(imported)
