"""Docstring summarization, the embedded default task: the whole NLHF pipeline on a CPU, no downloads.

    corpus (docstrings of the installed Python standard library: body -> first line)
    -> SentencePiece tokenizer (trained in-process, cached in WORKDIR/cache)
    -> sft (mu) -> pairs sampled from mu, labelled by the rater panel (ROUGE-L, length, faithfulness; majority
       vote; label noise; pairs_per_prompt pairs per training prompt) -> pm (preference model) + rm
       (Bradley-Terry reward model), both starting from the SFT decoder (init="sft")
    -> rlhf (on rm), sp (self-play, beta 0), md1..md4 (Nash-MD-PG, beta 0.125/0.25/0.375/0.5), br (beta 1),
       ema (Nash-EMA-PG; "ema*" is its averaged policy), all on pm
    -> tournament on the held-out test prompts judged by the rater: WORKDIR/tournament/{tournament.json,
       tournament.md, heatmap.png, samples.md}

Run:  make run   (or: python -m nash_lm.main --config=configs/docstrings.py --workdir=runs/default)
About 12 minutes on a 2-core CPU (measured: 11 min 49 s); every stage shows a progress bar.
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "docstrings"
    c.task = ml_collections.ConfigDict(dict(
        seed=0,
        corpus=ml_collections.ConfigDict(dict(min_summary_words=3, max_summary_words=12, min_body_words=8,
                                              max_body_chars=400, valid_fraction=0.05, test_fraction=0.05,
                                              max_examples=0)),
        tokenizer_vocab_size=2048,
        rater_noise=0.1,
        pairs_per_prompt=8,  # pairs sampled from mu per training prompt for the judges
        tournament=ml_collections.ConfigDict(dict(samples_per_prompt=8, temperature=1.0,
                                                  ci_method="clopper_pearson")),
    ))
    vocab, plen, rlen = 2048, 32, 16
    t = ml_collections.ConfigDict()
    t.job = "train"
    t.seed = 0
    t.peak_tflops = 0.0
    t.async_checkpoints = True
    t.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=vocab, prompt_len=plen, response_len=rlen,
                                            n_examples=1000, seed=0))
    model = dict(vocab_size=vocab, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=384,
                 max_len=plen + 2 * rlen)
    t.model = ml_collections.ConfigDict(model)
    t.judge_model = ml_collections.ConfigDict(model)  # == model: the judges start from the SFT decoder
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.rules = ""
    policy = dict(ref="sft", judge="pm", tau=0.01, steps=150, batch_size=32, lr=2e-4, max_new_tokens=rlen,
                  log_every=25, checkpoint_every=150, eval_batches=4)
    t.stages = ml_collections.ConfigDict()
    # ~4.5 epochs of the ~1,750 training examples: the held-out NLL is lowest here (the corpus is small and a
    # longer run memorises it); the prompt tokens are teacher-forced too (weight 1) for more language signal
    t.stages.sft = stage("sft", steps=250, batch_size=32, lr=3e-3, lr_schedule="cosine", warmup_steps=30,
                         weight_decay=0.01, prompt_loss_weight=1.0, log_every=50, checkpoint_every=250,
                         eval_batches=3)
    judge = dict(steps=400, batch_size=32, lr=1e-3, lr_schedule="cosine", warmup_steps=30, init="sft",
                 log_every=100, checkpoint_every=400, eval_batches=10)
    t.stages.pm = stage("preference", **{**judge, "steps": 600, "checkpoint_every": 600})
    t.stages.rm = stage("reward", **judge)
    t.stages.rlhf = stage("rlhf", **{**policy, "judge": "rm", "tau": 0.05})
    t.stages.sp = stage("nash_md_pg", beta=0.0, **policy)
    t.stages.md1 = stage("nash_md_pg", beta=0.125, **policy)
    t.stages.md2 = stage("nash_md_pg", beta=0.25, **policy)
    t.stages.md3 = stage("nash_md_pg", beta=0.375, **policy)
    t.stages.md4 = stage("nash_md_pg", beta=0.5, **policy)
    t.stages.br = stage("nash_md_pg", beta=1.0, **policy)
    t.stages.ema = stage("nash_ema_pg", ema_decay=0.99, **policy)
    # Nash-MD-PG with rank-16 adapters on the frozen SFT model (10x the learning rate); not in the default
    # pipeline: --config.train.pipeline=sft,pm,md1,md1_lora
    t.stages.md1_lora = stage("nash_md_pg", beta=0.125, **{**policy, "lr": 2e-3}, lora_rank=16, lora_alpha=32.0)
    t.pipeline = "sft,pm,rm,rlhf,sp,md1,md2,md3,md4,br,ema"
    c.train = t
    return c
