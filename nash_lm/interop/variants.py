"""Hugging Face architectures as settings of the nash-lm decoder: Llama, Gemma and Qwen2.

The decoder in `nash_lm.models` is Llama's. The two other architectures differ from it in ways that cannot be
folded into the weights, and each is a `ModelConfig` switch of the same modules:

  * Gemma's feed-forward gate is GeLU (tanh approximation) instead of SiLU -> `activation='gelu_tanh'`.
  * Qwen2's q/k/v projections have biases -> `qkv_bias=True` (a `qkv_bias` [kv-heads, group + 2, head_dim] in
    the fused projection's layout, added before RoPE).

The rest of Gemma folds into Llama's parameters at import time (see `nash_lm.interop.hf`): the RMSNorm
`(1 + w)` scale becomes the scale, and the `sqrt(d_model)` input-embedding multiplier goes into an untied
input embedding. `build_abstract(cfg, arch)` and `init(cfg, arch)` give the matching `(graphdef, params)`, which
plug into every entry point (`models.lm_logits`, `sampling.sample`, the training steps) unchanged.
"""
from __future__ import annotations

import dataclasses

from nash_lm import models

ARCHS = ("llama", "gemma", "qwen2")
_SETTINGS = {"llama": {}, "gemma": {"activation": "gelu_tanh"}, "qwen2": {"qkv_bias": True}}


def config_for(cfg, arch: str):
    """`cfg` with the architecture's decoder settings (activation, q/k/v biases)."""
    if arch not in ARCHS:
        raise ValueError(f"architecture {arch!r}: must be one of {ARCHS}")
    return dataclasses.replace(cfg, **_SETTINGS[arch]).validate()


def build_abstract(cfg, arch: str, lora_cfg=None):
    """(graphdef, params of ShapeDtypeStruct) of the decoder for a Hugging Face architecture (with adapters when
    `lora_cfg`, a `nash_lm.models.lora.LoRAConfig`, is given)."""
    return models.abstract_init(config_for(cfg, arch), "lm", lora_cfg)


def init(cfg, arch: str, seed: int = 0, shardings=None, lora_cfg=None):
    """(graphdef, randomly initialised params) of the decoder for a Hugging Face architecture, created by one
    jitted program (already sharded with `shardings`, a tree from `nash_lm.parallel.param_shardings`)."""
    return models.init(config_for(cfg, arch), "lm", seed, shardings=shardings, lora_cfg=lora_cfg)


def architecture_of(graphdef, params) -> str:
    """'llama', 'gemma' or 'qwen2' from the decoder settings of a (graphdef, params) pair."""
    cfg = models.config_of(graphdef, params)
    found = [arch for arch, settings in _SETTINGS.items()
             if settings and all(getattr(cfg, k) == v for k, v in settings.items())]
    if len(found) > 1:
        raise ValueError(f"model mixes architectures {found}")
    return found[0] if found else "llama"
