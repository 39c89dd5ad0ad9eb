"""A tiny Llama-family model (CPU tests, smoke runs): `get_config()` returns the `model` ConfigDict that
`nash_lm.models.ModelConfig.from_config` validates, plus the mesh and logical-axis rules for
`nash_lm.parallel`."""
import ml_collections

from nash_lm import parallel


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=256,
        rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=True, dtype="float32", param_dtype="float32",
        scan_layers=False, remat=False))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.rules = list(parallel.DEFAULT_RULES)  # [(logical axis, mesh axes)], edit per run
    return c
