"""Tiny end-to-end NLHF pipeline on synthetic data (runs on a CPU in about a minute; used by the tests).

    sft -> pm (preference model) + rm (Bradley-Terry reward model)
        -> nash_md (Nash-MD-PG, beta 0.125), self_play (beta 0), best_response (beta 1), nash_ema (Nash-EMA-PG),
           rlhf (KL-regularised PG on rm), ipo (online IPO), ipo_md (IPO-MD), nash_md_oracle (model-free: the
           synthetic preference oracle, called on the host between two compiled halves)

Run:  python -m nash_lm.main --config=configs/tiny.py --workdir=runs/tiny
      python -m nash_lm.main --config=configs/tiny.py --workdir=runs/tiny --config.pipeline=sft,pm,nash_md
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "train"
    c.seed = 0
    c.peak_tflops = 0.0  # 0: measure a matmul peak in the same run for MFU
    c.async_checkpoints = True
    c.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=32, prompt_len=6, response_len=6,
                                            n_examples=64, seed=0))
    model = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_len=24)
    c.model = ml_collections.ConfigDict(model)
    c.judge_model = ml_collections.ConfigDict(model)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.decode_rules = ""  # the sampler's layout ('' default, 'tensor', 'training', or rules; train/config.py)
    c.frozen_dtype = ""  # '' or 'bfloat16': storage of the policy stages' reference and judge
    c.rules = ""  # logical-axis rules, e.g. "batch=data+fsdp,embed=fsdp,mlp=tensor"; "" = nash_lm.parallel's

    policy = dict(ref="sft", steps=4, batch_size=8, lr=1e-3, max_new_tokens=6, log_every=2, checkpoint_every=2,
                  eval_batches=1)
    c.stages = ml_collections.ConfigDict()
    c.stages.sft = stage("sft", steps=6, batch_size=8, lr=3e-3, log_every=2, checkpoint_every=3, eval_batches=1)
    c.stages.pm = stage("preference", steps=4, batch_size=8, lr=3e-3, log_every=2, checkpoint_every=2,
                        eval_batches=1)
    c.stages.rm = stage("reward", steps=4, batch_size=8, lr=3e-3, log_every=2, checkpoint_every=2, eval_batches=1)
    c.stages.nash_md = stage("nash_md_pg", judge="pm", tau=0.1, beta=0.125, **policy)
    c.stages.self_play = stage("nash_md_pg", judge="pm", tau=0.1, beta=0.0, **policy)
    c.stages.best_response = stage("nash_md_pg", judge="pm", tau=0.1, beta=1.0, **policy)
    c.stages.nash_ema = stage("nash_ema_pg", judge="pm", tau=0.1, ema_decay=0.9, **policy)
    c.stages.rlhf = stage("rlhf", judge="rm", tau=0.05, **policy)
    c.stages.ipo = stage("online_ipo", judge="pm", tau=1.0, **policy)
    c.stages.ipo_md = stage("ipo_md", judge="pm", tau=1.0, beta=0.125, **policy)
    c.stages.nash_md_oracle = stage("nash_md_pg", judge="host_oracle:nash_lm.data.synthetic:synthetic_preference_numpy",
                                    tau=0.1, beta=0.125, **policy)
    # LoRA (rank 4 adapters on the frozen SFT model; not in the default pipeline):
    #   --config.pipeline=sft,pm,pm_lora,rm_lora,sft_lora,nash_md_lora,nash_ema_lora
    lora = dict(lora_rank=4, lora_alpha=8.0)
    c.stages.sft_lora = stage("sft", init="sft", steps=4, batch_size=8, lr=3e-3, log_every=2, checkpoint_every=2,
                              eval_batches=1, **lora)
    c.stages.nash_md_lora = stage("nash_md_pg", judge="pm", tau=0.1, beta=0.125, **policy, **lora)
    # judges with adapters on the SFT decoder (their backbone, frozen) and a fresh head trained with them
    judge_lora = dict(init="sft", steps=4, batch_size=8, lr=3e-3, log_every=2, checkpoint_every=2, eval_batches=1)
    c.stages.pm_lora = stage("preference", **judge_lora, **lora)
    c.stages.rm_lora = stage("reward", **judge_lora, **lora)
    c.stages.nash_ema_lora = stage("nash_ema_pg", judge="pm_lora", tau=0.1, ema_decay=0.9, **policy, **lora)
    # The algorithms of nash_lm/train/algorithms/ beyond the default pipeline (tests/test_train_algorithms.py):
    #   --config.pipeline=sft,pm,nash_md,inpo,inpo_lora,dpo,offline_ipo,dpo_lora,sppo,mpo,onpo,exploiter
    c.stages.inpo = stage("inpo", judge="pm", tau=0.1, eta_inv=1.0, anchor_every=3, **policy)
    c.stages.inpo_lora = stage("inpo", judge="pm", tau=0.1, eta_inv=1.0, anchor_every=3, **policy, **lora)
    # offline DPO / IPO on the synthetic labelled pairs (the judges' data), reference = the SFT model
    offline = dict(ref="sft", steps=4, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=2, eval_batches=1)
    c.stages.dpo = stage("dpo", tau=0.1, **offline)
    c.stages.offline_ipo = stage("offline_ipo", tau=1.0, **offline)
    c.stages.dpo_lora = stage("dpo", tau=0.1, labels="hard", **offline, **lora)
    # SPPO (3 samples per prompt, win rates from the pm judge) and MPO (anchor and magnet in the state)
    c.stages.sppo = stage("sppo", ref="sft", judge="pm", eta=1.0, samples=3, anchor_every=3, steps=4, batch_size=8,
                          lr=1e-3, max_new_tokens=6, log_every=2, checkpoint_every=2, eval_batches=1)
    c.stages.mpo = stage("mpo", judge="pm", eta=1.0, alpha=0.1, anchor_every=3, reset_every=3, **policy)
    # ONPO (an anchor and a predictor in the state; 4 steps = one round of two 2-step halves)
    c.stages.onpo = stage("onpo", judge="pm", tau=0.1, eta_inv=1.0, half_every=2, **policy)
    # an exploiter of nash_md: starts from it and trains against it (frozen), KL-regularised to sft
    c.stages.exploiter = stage("exploiter", init="nash_md", judge="pm", tau=0.1, **policy)
    c.pipeline = "sft,pm,rm,nash_md,self_play,best_response,nash_ema,rlhf,ipo,ipo_md,nash_md_oracle"
    return c
