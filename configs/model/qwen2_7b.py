"""A Qwen2-7B-shaped model: vocabulary 152064, d_model 3584, 28 layers, 28 query heads over 4 key/value heads
(GQA, head_dim 128), biases on the q/k/v projections, SwiGLU d_ff 18944, RoPE theta 1e6, RMSNorm eps 1e-6,
untied embeddings (7.62B parameters). Source: the published Hugging Face config.json of Qwen/Qwen2-7B
(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers, vocab_size,
rope_theta, rms_norm_eps, tie_word_embeddings; attention biases are part of the Qwen2 architecture).

`architecture='qwen2'` selects the Qwen2 variant of the decoder (`nash_lm.interop.variants`), which has no
scanned-layer form, so `scan_layers` is False. max_len 32768 (the published max_position_embeddings is 131072;
sliding-window attention is off in the config). bf16 compute with f32 masters, rematerialised layers, FSDP over
every device for training; the decode may be tensor-parallel (`decode_rules='tensor'`: over the mesh axes whose
size divides the 4 KV heads, `parallel.tensor_decode_rules`): a bf16 copy of policy + mu (30 GB) does not fit
one 16 GB v5e chip."""
import ml_collections

from nash_lm import parallel


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        architecture="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
        max_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=False, qkv_bias=True,
        dtype="bfloat16", param_dtype="float32", scan_layers=False, remat=True))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.rules = list(parallel.DEFAULT_RULES)  # [(logical axis, mesh axes)], edit per run
    c.decode_rules = "tensor"  # config.decode_rules: parallel.tensor_decode_rules(mesh, n_kv_heads, d_ff)
    return c
