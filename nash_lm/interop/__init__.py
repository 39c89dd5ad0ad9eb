"""Interoperability with Hugging Face checkpoints (safetensors + config.json + tokenizer.json).

Owns: `safetensors_io` (reading/writing .safetensors without pickle), `variants` (the Gemma and Qwen2
variants of the decoder), `hf` (import of Llama, Gemma and Qwen2 checkpoints from local directories,
export of Llama-architecture policies) and `gguf` (a Llama GGUF file -> a local Hugging Face checkpoint
directory for `hf` import; imported on its own, `from nash_lm.interop import gguf`, since it needs the `gguf`
extra). See `nash_lm.interop.hf` for the weight mapping.
"""
from nash_lm.interop.hf import Pretrained, export_llama, load_pretrained, model_config_from_hf, read_config

__all__ = ["Pretrained", "export_llama", "load_pretrained", "model_config_from_hf", "read_config"]
