"""A ~1.2B-parameter Llama-family model (Llama-3.2-1B-like shape, 32k vocabulary), bf16 compute with f32
master weights, scanned and rematerialised layers, FSDP × tensor parallel mesh. Same layout as tiny.py."""
import ml_collections

from nash_lm import parallel


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, max_len=2048,
        rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
        scan_layers=True, remat=True))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.rules = list(parallel.DEFAULT_RULES)  # [(logical axis, mesh axes)], edit per run
    return c
