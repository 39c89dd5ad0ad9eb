"""The method grid of Munos et al. (2024) Table 1 and Calandriello et al. (2024) on the synthetic task, at a size
that trains in minutes on a CPU host and scales up by overriding `model`, `data` and `steps`.

    sft -> pm (preference model) + rm (Bradley-Terry reward model)
        -> rlhf (tau 0.05), self_play (beta 0), md1 (beta 0.125), md2 (beta 0.25), md4 (beta 0.5),
           best_response (beta 1), ema1 (Nash-EMA-PG, decay 0.999, last iterate and averaged policy),
           ipo (online IPO, tau 1), ipo_md (IPO-MD, tau 1, beta 0.125)

KL coefficients follow the papers' selected values (Nash-MD-PG tau = 0.008, RLHF tau = 0.05, IPO tau = 1.0);
learning rate, batch and lengths were not reported for TL;DR and are set for this model size. Every policy stage
starts from and is regularised towards the SFT policy mu.

    python -m nash_lm.main --config=configs/nlhf_paper.py --workdir=runs/paper
    python -m nash_lm.main --config=configs/nlhf_paper.py --workdir=runs/paper --config.pipeline=sft,pm,md1
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "train"
    c.seed = 0
    c.peak_tflops = 0.0
    c.async_checkpoints = True
    c.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=64, prompt_len=12, response_len=12,
                                            n_examples=4096, seed=0))
    model = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_len=48)
    c.model = ml_collections.ConfigDict(model)
    c.judge_model = ml_collections.ConfigDict(model)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = ""

    common = dict(batch_size=32, log_every=20, checkpoint_every=200, keep_checkpoints=2, eval_batches=4)
    policy = dict(ref="sft", steps=400, lr=1e-4, lr_schedule="linear", warmup_steps=20, max_new_tokens=12,
                  eval_every=200, **common)
    nash = dict(judge="pm", tau=0.008, **policy)
    c.stages = ml_collections.ConfigDict()
    c.stages.sft = stage("sft", steps=1000, lr=1e-3, lr_schedule="cosine", warmup_steps=50, **common)
    c.stages.pm = stage("preference", init="", steps=600, lr=5e-4, labels="soft", **common)
    c.stages.rm = stage("reward", init="", steps=600, lr=5e-4, labels="soft", **common)
    c.stages.rlhf = stage("rlhf", judge="rm", tau=0.05, **policy)
    c.stages.self_play = stage("nash_md_pg", beta=0.0, **nash)
    c.stages.md1 = stage("nash_md_pg", beta=0.125, **nash)
    c.stages.md2 = stage("nash_md_pg", beta=0.25, **nash)
    c.stages.md4 = stage("nash_md_pg", beta=0.5, **nash)
    c.stages.best_response = stage("nash_md_pg", beta=1.0, **nash)
    c.stages.ema1 = stage("nash_ema_pg", ema_decay=0.999, **nash)
    c.stages.ipo = stage("online_ipo", judge="pm", tau=1.0, **policy)
    c.stages.ipo_md = stage("ipo_md", judge="pm", tau=1.0, beta=0.125, **policy)
    c.pipeline = "sft,pm,rm,rlhf,self_play,md1,md2,md4,best_response,ema1,ipo,ipo_md"
    return c
