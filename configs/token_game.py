"""Exact token-level game: a small transformer trained with each algorithm, evaluated by enumerating all V^L
sequences (KL to the sequence-level equilibrium, exact duality gap, token- vs sequence-level mixture).

    sft (fit mu to the reference distribution) -> nash_md (beta 0.125), self_play (beta 0), best_response
    (beta 1), nash_ema, ipo (online IPO), egpo (extragradient online IPO), inpo, sppo, mpo -- all against the
    exact preference oracle on whole sequences (the job's host oracle) -- and the offline dpo and offline_ipo on
    pairs from mu labelled by that oracle

Run:  python -m nash_lm.main --config=configs/token_game.py --workdir=runs/token_game
Writes WORKDIR/token_game.json and token_game.md (duality gap per policy, reduction vs mu, mixture gaps).
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "token_game"
    V, L = 4, 3
    c.task = ml_collections.ConfigDict(dict(
        instance="rps",             # a nash_lm.games.instances name; rps / dice / cyclic are non-transitive
        instance_kwargs=ml_collections.ConfigDict({}),
        mapping="sum",              # sequence -> game action: (sum of tokens + prompt) mod n_actions
        V=V, L=L, contexts=2,
        mu_scale=2.0,               # reference logits ~ mu_scale * N(0, 1) per prefix
        tau=0.2,
        seed=0,
        n_examples=4096,            # SFT samples of the reference distribution
        mixture_betas=(0.125, 0.5),
        fixed_point_damping=0.3,
    ))
    t = ml_collections.ConfigDict()
    t.job = "train"
    t.seed = 0
    t.peak_tflops = 0.0
    t.async_checkpoints = True
    t.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=3 + V, prompt_len=2, response_len=L,
                                            n_examples=4096, seed=0))
    model = dict(vocab_size=3 + V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_len=8)
    t.model = ml_collections.ConfigDict(model)
    t.judge_model = ml_collections.ConfigDict(model)
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.rules = ""
    policy = dict(ref="sft", judge="host_oracle", tau=0.2, steps=2000, batch_size=256, lr=2e-4, lr_schedule="cosine",
                  max_new_tokens=L, log_every=250, checkpoint_every=1000, eval_batches=1)
    t.stages = ml_collections.ConfigDict()
    t.stages.sft = stage("sft", steps=600, batch_size=64, lr=3e-3, log_every=100, checkpoint_every=600,
                         eval_batches=4)
    t.stages.nash_md = stage("nash_md_pg", beta=0.125, **policy)
    t.stages.self_play = stage("nash_md_pg", beta=0.0, **policy)
    t.stages.best_response = stage("nash_md_pg", beta=1.0, **policy)
    t.stages.nash_ema = stage("nash_ema_pg", ema_decay=0.99, **policy)
    t.stages.ipo = stage("online_ipo", **policy)
    t.stages.egpo = stage("egpo", **policy)
    t.stages.inpo = stage("inpo", eta_inv=1.0, anchor_every=10, **policy)
    no_tau = {k: v for k, v in policy.items() if k != "tau"}
    t.stages.sppo = stage("sppo", eta=1.0, samples=4, anchor_every=10, **no_tau)
    t.stages.mpo = stage("mpo", eta=1.0, alpha=0.2, anchor_every=10, reset_every=500, **no_tau)
    offline = {k: v for k, v in policy.items() if k not in ("tau", "judge", "max_new_tokens")}
    t.stages.dpo = stage("dpo", tau=0.2, **offline)
    t.stages.offline_ipo = stage("offline_ipo", tau=0.2, **offline)
    t.pipeline = "sft,nash_md,self_play,best_response,nash_ema,ipo,egpo,inpo,sppo,mpo,dpo,offline_ipo"
    c.train = t
    return c
