"""Online NLHF on the docstring task: the language-model analogue of Ye et al.'s main agent + enhancer.

    round 0 (shared): corpus -> SentencePiece -> sft (mu) -> n0 = pairs0_per_prompt x (training prompts) pairs
                      from mu labelled by the rater -> pm0 (preference model, init = the SFT decoder)
    round r = 1..R, per arm (enhancer, symmetric), same label budget:
      main agent pi_r: a policy stage (`online.algorithm`, default self-play Nash-MD-PG, beta 0) against
                       pm_{r-1}, ref = sft, init = pi_{r-1}   (round 1 is shared: pm0 and sft are shared)
      new pairs on `pairs_per_round` training prompts: enhancer y ~ pi_r, y' = best of k samples of pi_r under
                       pm_{r-1} (argmax_j P_pm(c_j > y | x)); symmetric y, y' ~ pi_r independently
      labelled by the rater, appended to the arm's pairs -> pm_r (init = pm_{r-1}) on the arm's union
    after every round: win rate of pi_r against SFT under the rater on the held-out test prompts
    (Clopper-Pearson 95%), pm_r's accuracy against the noiseless rater on held-out pairs, labels used.
    Report: WORKDIR/online_lm.{json,md,png}, summary.json.

Run:  python -m nash_lm.main --config=configs/docstrings_online.py --workdir=runs/docstrings_online
(measured: 17 min on the shared 2-core machine while another job ran; results in README.md)
"""
import ml_collections

from nash_lm.train.config import stage


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "docstrings_online"
    c.task = ml_collections.ConfigDict(dict(
        seed=0,
        corpus=ml_collections.ConfigDict(dict(min_summary_words=3, max_summary_words=12, min_body_words=8,
                                              max_body_chars=400, valid_fraction=0.05, test_fraction=0.05,
                                              max_examples=0)),
        tokenizer_vocab_size=2048,
        rater_noise=0.1,
        eval_pairs_per_prompt=4,  # held-out pairs from mu per validation prompt (judge accuracy)
        tournament=ml_collections.ConfigDict(dict(samples_per_prompt=8, temperature=1.0,
                                                  ci_method="clopper_pearson")),
    ))
    vocab, plen, rlen = 2048, 32, 16
    c.online = ml_collections.ConfigDict(dict(
        rounds=3,
        arms="enhancer,symmetric",
        pairs0_per_prompt=2,  # round-0 labels: pairs from mu per training prompt
        pairs_per_round=1024,  # new labels per arm and round (training prompts drawn without replacement)
        best_of_k=4,  # enhancer candidates per prompt
        algorithm="nash_md_pg",  # main agent: nash_md_pg (self-play at beta 0) or online_ipo
        beta=0.0,  # Nash-MD-PG mixture coefficient (ignored by online_ipo)
        # templates of the per-round stages: every field of nash_lm.train.config.stage() except the algorithm
        # and the inputs (init, ref, judge), which the job fills in
        policy=ml_collections.ConfigDict(dict(tau=0.01, steps=100, batch_size=32, lr=2e-4, max_new_tokens=rlen,
                                              log_every=25, checkpoint_every=100, eval_batches=4)),
        judge=ml_collections.ConfigDict(dict(steps=150, batch_size=32, lr=5e-4, lr_schedule="cosine",
                                             warmup_steps=15, log_every=50, checkpoint_every=150,
                                             eval_batches=10)),
    ))
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
    t.judge_model = ml_collections.ConfigDict(model)  # == model: pm0 starts from the SFT decoder
    t.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    t.rules = ""
    t.stages = ml_collections.ConfigDict()
    t.stages.sft = stage("sft", steps=250, batch_size=32, lr=3e-3, lr_schedule="cosine", warmup_steps=30,
                         weight_decay=0.01, prompt_loss_weight=1.0, log_every=50, checkpoint_every=250,
                         eval_batches=3)
    t.stages.pm0 = stage("preference", steps=300, batch_size=32, lr=1e-3, lr_schedule="cosine", warmup_steps=30,
                         init="sft", log_every=100, checkpoint_every=300, eval_batches=10)
    t.pipeline = "sft,pm0"  # the per-round stages are added by the job from c.online's templates
    c.train = t
    return c
