"""A Llama-3.1-8B-shaped model: vocabulary 128256, d_model 4096, 32 layers, 32 query heads over 8 key/value heads
(GQA, head_dim 128), SwiGLU d_ff 14336, RoPE theta 500000, RMSNorm eps 1e-5, untied embeddings (8.03B
parameters). Source: the published Hugging Face config.json of meta-llama/Llama-3.1-8B (hidden_size,
intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers, vocab_size, rope_theta,
rms_norm_eps, tie_word_embeddings).

Not reproduced: the 'llama3' RoPE frequency scaling (factor 8, original context 8192) of the released weights
(nash_lm's RoPE is unscaled), so max_len stays at the original 8192 context. bf16 compute with f32 masters,
scanned and rematerialised layers, FSDP over every device for training. A bf16 copy of policy + mu is 32 GB,
more than one 16 GB v5e chip holds, so the decode (`decode_rules`, read by the training step as
`PolicyHParams.decode_rules`) may be tensor-parallel: `'tensor'` shards heads and d_ff over the mesh axes whose
size divides the 8 KV heads (`parallel.tensor_decode_rules`; e.g. tensor = 4 with fsdp = 16 on v5e-64), so the KV
cache never moves; on a mesh with no such axis (fsdp 16, tensor 1) the weights stay whole per chip (fine on a
95 GiB v5p chip; `bench/aot_step.py --decode_rules=auto` chooses by HBM)."""
import ml_collections

from nash_lm import parallel


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_len=8192,
        rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
        scan_layers=True, remat=True))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.rules = list(parallel.DEFAULT_RULES)  # [(logical axis, mesh axes)], edit per run
    c.decode_rules = "tensor"  # config.decode_rules: parallel.tensor_decode_rules(mesh, n_kv_heads, d_ff)
    return c
