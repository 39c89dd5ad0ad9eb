"""Interoperability with Hugging Face checkpoints (safetensors + config.json + tokenizer.json).

Owns: `safetensors_io` (reading/writing .safetensors without pickle), `variants` (the Gemma and Qwen2
variants of the decoder), and `hf` (import of Llama, Gemma and Qwen2 checkpoints from local directories,
export of Llama-architecture policies). See `nash_lm.interop.hf` for the weight mapping.
"""
from nash_lm.interop.hf import Pretrained, export_llama, load_pretrained, model_config_from_hf, read_config

__all__ = ["Pretrained", "export_llama", "load_pretrained", "model_config_from_hf", "read_config"]
