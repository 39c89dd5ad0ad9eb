"""Model configuration: the frozen `ModelConfig` dataclass, its validation, and construction from a config.

`ModelConfig` sizes the Llama-family decoder in `nash_lm.models` from a toy (vocabulary 4, one layer) to
billions of parameters. It is hashable, so it lives in the NNX graph definition as static data.
`validate()` raises `ValueError` with one line naming the offending field, before anything is traced or
compiled. `ModelConfig.from_config(cd)` builds one from an `ml_collections.ConfigDict` (or a plain mapping),
rejecting unknown keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder (shared by the LM, preference and reward models).

    Attributes:
      vocab_size: number of token ids.
      d_model: residual width.
      n_layers: number of transformer blocks.
      n_heads: query heads; must divide d_model (head_dim = d_model // n_heads, even for RoPE).
      n_kv_heads: key/value heads (grouped-query attention); must divide n_heads.
      d_ff: hidden width of the SwiGLU feed-forward.
      max_len: longest sequence (prompt + completion) the model accepts.
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: share the input embedding with the LM head.
      dtype: compute dtype, 'float32' or 'bfloat16' (logits and softmaxes are always float32).
      param_dtype: master-weight dtype, normally 'float32'.
      scan_layers: stack the blocks along a leading 'layers' axis and run them with `lax.scan`.
      remat: rematerialise each block in the backward pass (the sampler never remats).
      activation: the gated MLP's gate, 'silu' (SwiGLU: Llama, Qwen2) or 'gelu_tanh' (GeGLU: Gemma).
      qkv_bias: biases on the q/k/v projections (Qwen2).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    activation: str = "silu"
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def validate(self) -> "ModelConfig":
        """Checks every field; raises ValueError with one line naming the field. Returns self."""
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, "must be a positive integer")
        need(self.vocab_size >= 2, "vocab_size", "must be at least 2")
        need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, "d_model",
             f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        need(float(self.rope_theta) > 0, "rope_theta", "must be positive")
        need(float(self.norm_eps) > 0, "norm_eps", "must be positive")
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {sorted(DTYPES)}")
        need(self.activation in ACTIVATIONS, "activation", f"must be one of {list(ACTIVATIONS)}")
        for f in ("tie_embeddings", "scan_layers", "remat", "qkv_bias"):
            need(isinstance(getattr(self, f), bool), f, "must be a bool")
        return self

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "ModelConfig":
        """Builds and validates a ModelConfig from an ml_collections ConfigDict or a mapping."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"ModelConfig.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
        return cls(**dict(config)).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self, kind: str = "lm") -> int:
        """Analytic parameter count (matches the initialised tree)."""
        d, f, l = self.d_model, self.d_ff, self.n_layers
        qkv = d * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        block = qkv + self.n_heads * self.head_dim * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            block += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        n = self.vocab_size * d + l * block + d
        if kind == "lm" and not self.tie_embeddings:
            n += d * self.vocab_size
        if kind == "preference":
            n += d
        if kind == "reward":
            n += d + 1
        return n
