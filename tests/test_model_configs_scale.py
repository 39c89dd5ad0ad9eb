"""The real-size model configs (configs/model/llama3_8b.py, qwen2_7b.py): they validate, their rules and decode
rules name known axes, and their parameter counts equal the closed form from the published widths (and the
published totals: 8.03B for Llama-3.1-8B, 7.62B for Qwen2-7B)."""
import importlib.util
import pathlib

import jax
import pytest

from nash_lm import models, parallel


def _load(name):
    path = pathlib.Path(__file__).parents[1] / "configs" / "model" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _closed_form(v, d, layers, h, kv, f, tied, qkv_bias):
    hd = d // h
    per_layer = 2 * d + d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + ((h + 2 * kv) * hd if qkv_bias else 0)
    return v * d * (1 if tied else 2) + layers * per_layer + d


@pytest.mark.parametrize("name,published,shape", [
    ("llama3_8b", 8.03e9, dict(v=128256, d=4096, layers=32, h=32, kv=8, f=14336, tied=False, qkv_bias=False)),
    ("qwen2_7b", 7.62e9, dict(v=152064, d=3584, layers=28, h=28, kv=4, f=18944, tied=False, qkv_bias=True)),
])
def test_real_size_configs(name, published, shape):
    c = _load(name)
    fields = c.model.to_dict()
    arch = fields.pop("architecture", "llama")
    cfg = models.ModelConfig(**fields).validate()
    assert cfg.num_params() == _closed_form(**shape)
    assert abs(cfg.num_params() - published) < 0.005e9
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == tuple(
        shape[k] for k in ("v", "d", "layers", "h", "kv", "f"))
    parallel.validate_rules(c.rules)
    assert c.decode_rules == "tensor"  # by head counts: the KV cache stays local
    rules = parallel.tensor_decode_rules({"data": 1, "fsdp": 16, "tensor": 4}, cfg.n_kv_heads, cfg.d_ff)
    assert dict(parallel.validate_rules(rules))["heads"] == ("tensor",)
    if arch == "llama":  # the shapes-only tree (no allocation) has the closed-form size
        _, abstract = models.abstract_init(cfg)
        assert sum(x.size for x in jax.tree.leaves(abstract)) == cfg.num_params()
