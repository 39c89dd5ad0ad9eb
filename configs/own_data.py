"""Your model and your data, no Python: a local Hugging Face checkpoint and three JSONL files -> SFT -> preference
model -> Nash-MD-PG (or another policy algorithm) -> an export that transformers loads as a chat model.

    python -m nash_lm.main --config=configs/own_data.py --workdir=runs/mine \
        --config.checkpoint=/abs/path/to/hf_checkpoint \
        --config.sft_data=sft.jsonl --config.pairs_data=pairs.jsonl --config.prompts_data=prompts.jsonl

Records, one JSON object per line: SFT {"prompt", "response"}, pairs {"prompt", "chosen", "rejected", "label"?}
(label = P(chosen beats rejected), default 1), prompts {"prompt"}. A malformed row is printed once as
`[data] path:line: reason (skipped)`, with a count per file after the data check. The checkpoint's config.json
gives the model's shape, its tokenizer.json and chat template the tokenization (`nash_lm.train.own_data`).

Overrides: `--config.algorithm=` (nash_md_pg, nash_ema_pg, online_ipo, ipo_md, egpo, ...), `--config.beta=`,
`--config.tau=`, `--config.prompt_len=`, `--config.response_len=`, evaluation files `--config.sft_eval_data=`
(etc.; '' = the training file), any stage field `--config.train.stages.{sft,pm,policy}.<field>=` (steps,
batch_size, lr, lora_rank, ...), the mesh `--config.train.mesh.data=-1`. The defaults are sized for a 100M-class
model on one accelerator; on a CPU shrink the steps (`tests/test_own_data.py` runs a few steps of each).
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "own_data"
    c.checkpoint = ""  # required: a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)
    c.sft_data = ""  # required: SFT demonstrations {"prompt", "response"}
    c.pairs_data = ""  # required: preference pairs {"prompt", "chosen", "rejected", "label"?}
    c.prompts_data = ""  # required: prompts {"prompt"} (a pairs file serves too)
    c.sft_eval_data = ""  # '' = evaluate on sft_data
    c.pairs_eval_data = ""
    c.prompts_eval_data = ""
    c.algorithm = "nash_md_pg"  # the policy stage's algorithm (one that takes a preference judge)
    c.beta = 0.125  # Nash-MD's mixture weight (used by algorithms with a beta field)
    c.tau = 0.01  # the KL regularisation towards the SFT model
    c.prompt_len = 256  # prompt tokens, chat template included (too-long prompts keep their end)
    c.response_len = 128  # response tokens (the policy samples up to this many)
    c.export_platforms = "cpu,cuda,tpu"  # the serialized sampler in WORKDIR/export/sampler
    c.model_settings = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", scan_layers=False,
                                                      remat=False))
    c.data = ml_collections.ConfigDict(dict(chat_template=True, truncation="keep_end", on_error="skip"))
    t = ml_collections.ConfigDict()
    t.seed = 0
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.rules = ""
    t.peak_tflops = 0.0
    t.async_checkpoints = True
    t.stages = ml_collections.ConfigDict()
    common = dict(batch_size=8, lr_schedule="cosine", warmup_steps=10, log_every=10, checkpoint_every=100,
                  eval_batches=4)
    t.stages.sft = stage("sft", steps=500, lr=1e-5, **common)
    t.stages.pm = stage("preference", steps=500, lr=1e-5, **common)
    t.stages.policy = stage("nash_md_pg", steps=500, lr=5e-6, missing_eos_penalty=0.1, **common)
    c.train = t
    return c
