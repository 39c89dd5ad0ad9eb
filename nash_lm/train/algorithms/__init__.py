"""The training algorithms: one module per algorithm family, and the registry built from them.

Each family module holds everything its algorithms own (how y and y' are drawn, what is judged and scored, the
loss, the extra state kept and its update rule, the decode passes for the FLOPs) as `Algorithm` records
(`base.Algorithm`) in its `ALGORITHMS`, with the update rule and its source in its docstring:

    supervised   sft, preference, reward (the stages on fixed data)
    nash_md_pg   nash_md_pg (self-play at beta 0, best response at beta 1), nash_ema_pg
    rlhf         rlhf
    ipo          online_ipo, ipo_md, egpo
    inpo         inpo (online mirror descent learnt by a squared loss; rounds with an anchor pi_t)
    offline      dpo, offline_ipo (fixed labelled pairs, no judge)
    sppo         sppo (multiplicative weights learnt by regression on K-sample win rates; rounds with an anchor)
    mpo          mpo (magnetic mirror descent learnt by INPO's loss; an anchor and a periodically reset magnet)
    onpo         onpo (optimistic mirror descent: a predictor half-step and a policy half-step, each INPO's loss)

Nothing outside this package branches on an algorithm's name. `REGISTRY` maps names to records; `get(name)`;
`step_flops` is the analytic FLOPs of one step of a stage, from its record.
"""
from __future__ import annotations

from nash_lm.train.algorithms import inpo, ipo, mpo, nash_md_pg, offline, onpo, rlhf, sppo, supervised
from nash_lm.train.algorithms.base import EXTRA_TREES, POLICY_FIELDS, Algorithm, Trees

FAMILIES = (supervised, nash_md_pg, rlhf, ipo, inpo, offline, sppo, mpo, onpo)

REGISTRY: dict[str, Algorithm] = {a.name: a for family in FAMILIES for a in family.ALGORITHMS}

NAMES = tuple(REGISTRY)

__all__ = ["Algorithm", "EXTRA_TREES", "FAMILIES", "NAMES", "POLICY_FIELDS", "REGISTRY", "Trees", "get",
           "step_flops"]


def get(name: str) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; known: {list(NAMES)}")
    return REGISTRY[name]


def step_flops(alg: Algorithm, st, model_cfg, prompt_len: int, response_len: int, judge_kind: str = "") -> float:
    """Analytic matmul FLOPs of one step of stage `st` (forward 1x, forward + backward 3x); `judge_kind`: the
    policy stage's judge ('preference', 'reward'; oracles cost nothing here)."""
    from nash_lm.train import metrics

    m = model_cfg
    shape = dict(n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                 head_dim=m.head_dim, d_ff=m.d_ff, vocab_size=m.vocab_size)
    b, p = st.batch_size, prompt_len
    n = int(st.get("max_new_tokens", response_len))
    full = lambda length, head: metrics.causal_pass_flops(length, head, seqs=b, **shape)

    if alg.role == "sft":  # teacher-forced logits at the response (and, with the prompt loss, the prompt)
        return 3 * full(p + n, None if float(st.get("prompt_loss_weight", 0.0)) else n)
    if alg.role == "judge":  # reward: y and y' in one pass; preference: both orders of (x, y, y') in one pass
        return 3 * 2 * (full(p + n, 0) if alg.produces == "reward" else full(p + 2 * n, 0))
    # Sampling (one decode loop for y and y'): prompt prefills and per-row decode passes, counted in sequences
    # of the batch; the policy's prefill is shared by its y and y' rows.
    prefills, decodes = alg.passes(st)
    sampling = prefills * full(p, 1) + decodes * metrics.lm_forward_flops(**shape, tokens=b * n, context=p + n / 2)
    if alg.judged == "reward":
        judge = full(p + n, 0)
    elif alg.judged == "label":
        judge = 0.0
    else:  # per judged pair
        per_pair = {"preference": 2 * full(p + 2 * n, 0), "reward": 2 * full(p + n, 0)}.get(judge_kind, 0.0)
        judge = len(alg.judged_pairs(st)) * per_pair
    # each round: sample, judge, the `against` trees' forwards + pi_theta's forward and backward over the
    # scored responses
    per_response = (len(alg.against) + 3) * full(p + n, n)
    return (1 + alg.lookahead) * (sampling + judge + len(alg.responses(st)) * per_response)
