"""The algorithm registry: one record per training algorithm, read by the config, the step and the loop.

An `Algorithm` says everything the rest of the code needs to know about an algorithm, so that nothing outside
this file branches on an algorithm's name:

- `role` ('sft' | 'judge' | 'policy'), what its stage `produces` ('lm', 'preference' or 'reward' parameters)
  and the `data` it reads ('sft' demonstrations, labelled 'pairs', or 'prompts');
- `fields`: its own stage fields and their defaults (beside the common ones of `nash_lm.train.config`), and
  `check`, its own validity rules (each raises one ValueError naming the field);
- for policy algorithms: `judges` (which judge stages it accepts and whether oracles may judge), `sample`
  (how y and y' are drawn inside the compiled step), `judged` (P(y > y' | x) of the pair, or the reward r(x, y)),
  `scored` (the responses teacher-forced under mu and pi_theta), `loss` (a function of those log-probs),
  `ema` (whether the state keeps an EMA of the policy), `lookahead` (extragradient rounds: how many times the
  step takes a provisional gradient step from theta_t and samples again from it before the real update),
  `batch_coupled` (its loss couples the examples of a batch, so gradients cannot be accumulated over
  microbatches) and `passes` (the prefills and decode passes of its sampling, for the analytic FLOPs).

Adding an algorithm is one record here, its loss in `nash_lm.train.losses` and its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from nash_lm.train import losses, schedules
from nash_lm.train import scoring


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _no_check(st, where) -> None:
    del st, where


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    role: str  # 'sft' | 'judge' | 'policy'
    produces: str  # 'lm' | 'preference' | 'reward'
    data: str  # 'sft' | 'pairs' | 'prompts'
    fields: Mapping = dataclasses.field(default_factory=dict)
    check: Callable = _no_check  # check(stage_config, where) with where(field) -> 'config.stages.<name>.<field>'
    # policy algorithms
    judges: tuple = ()  # stage kinds accepted as `judge`
    oracles: bool = True  # whether `oracle:` / `host_oracle:` judges are accepted
    sample: Callable | None = None  # (hp, graphdef, policy, ref, ema, batch, keys) -> samples
    judged: str = "pair"  # 'pair': P(y > y' | x) of the samples; 'reward': r(x, y)
    scored: tuple = ("y",)  # responses whose log-probs under mu and pi_theta enter the loss
    loss: Callable | None = None  # (hp, logp {resp: [B, N]}, ref_logp, samples, judged) -> (loss, metrics)
    ema: bool = False
    lookahead: int = 0
    batch_coupled: bool = False  # the loss couples the examples of a batch (no gradient microbatches)
    passes: Callable | None = None  # stage config -> (prompt prefills, decode passes), in batches of sequences

    @property
    def sequences(self) -> int:
        """Sequences per example a step processes (for tokens/s): the response, or the pair."""
        return 1 if self.role == "sft" or self.judged == "reward" else 2


_POLICY_FIELDS = dict(
    ref="", judge="", temperature=1.0, max_new_tokens=8,
    microbatches=1,  # the update's gradients accumulated over this many microbatches
    tau_schedule="",  # tau over the steps ('' constant; nash_lm.train.schedules)
    missing_eos_penalty=0.0,  # subtracted from a completion's preference (or reward) when it has no EOS
)


def _beta(st) -> float:
    """The stage's beta for counting models: a scheduled beta counts as strictly inside (0, 1)."""
    return 0.5 if st.get("beta_schedule", "") else float(st.beta)


def _mixed(beta: float) -> int:
    """Models a token-level mixture decode step runs: two strictly inside (0, 1), one at the ends."""
    return 2 if 0.0 < beta < 1.0 else 1


def _ipo_tau(st, where):
    if st.tau == 0:
        _fail(where("tau"), "must be > 0 for IPO (the target is 1/(2 tau))")
    sched = schedules.parse(st.tau_schedule, where("tau_schedule"), 0.0, float("inf"), st.steps)
    if sched and 0.0 in ([v for _, v in sched[1]] if sched[0] == "steps" else [sched[1]]):
        _fail(where("tau_schedule"), "reaches 0, but tau must be > 0 for IPO (the target is 1/(2 tau))")


def _rlhf_batch(st, where):
    if st.batch_size < 2:
        _fail(where("batch_size"), "rlhf needs >= 2 sequences per batch (leave-one-out baseline)")
    if st.microbatches != 1:
        _fail(where("microbatches"), "rlhf's leave-one-out baseline spans the whole batch: must be 1")


def _pg_loss(fn):
    """A single-sample policy-gradient loss (Nash-MD-PG, RLHF) as a registry loss."""
    return lambda hp, lp, ref, s, judged: fn(lp["y"], ref["y"], s["y_mask"], judged, hp.tau)


def _ipo(hp, lp, ref, s, judged):
    return losses.ipo_loss(lp["y"], ref["y"], s["y_mask"], lp["y2"], ref["y2"], s["y2_mask"], judged, hp.tau)


def _two_policy_samples(hp, gd, policy, ref, ema, batch, keys):
    return scoring.sample_pair(gd, policy, batch, keys, hp)


_IPO = dict(role="policy", produces="lm", data="prompts", judges=("preference", "reward"), check=_ipo_tau,
            scored=("y", "y2"), loss=_ipo)

REGISTRY: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sft", role="sft", produces="lm", data="sft",
              fields=dict(prompt_loss_weight=0.0)),  # > 0: also teacher-force the prompt tokens, with this weight
    Algorithm("preference", role="judge", produces="preference", data="pairs", fields=dict(labels="soft")),
    Algorithm("reward", role="judge", produces="reward", data="pairs", fields=dict(labels="soft")),
    # Nash-MD-PG(beta): y ~ pi_theta, y' ~ pi_theta^(1-beta) mu^beta (beta = 0 self-play, 1 best response)
    Algorithm("nash_md_pg", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(_POLICY_FIELDS, tau=0.1, beta=0.125, beta_schedule=""),
              sample=lambda hp, gd, policy, ref, ema, batch, keys: scoring.sample_pair(
                  gd, policy, batch, keys, hp, mix_params=ref, beta=hp.beta),
              loss=_pg_loss(losses.nash_md_pg_loss),
              passes=lambda st: (1 + (_beta(st) > 0.0), 1 + _mixed(_beta(st)))),
    # Nash-EMA-PG: y ~ pi_theta, y' ~ the EMA of past parameters
    Algorithm("nash_ema_pg", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(_POLICY_FIELDS, tau=0.1, ema_decay=0.999), ema=True,
              sample=lambda hp, gd, policy, ref, ema, batch, keys: scoring.sample_pair(
                  gd, policy, batch, keys, hp, mix_params=ema, beta=1.0),
              loss=_pg_loss(losses.nash_md_pg_loss), passes=lambda st: (2, 2)),
    # KL-regularised policy gradient against a Bradley-Terry reward model (one sample per prompt)
    Algorithm("rlhf", role="policy", produces="lm", data="prompts", judges=("reward",), oracles=False,
              fields=dict(_POLICY_FIELDS, tau=0.05), check=_rlhf_batch, judged="reward", batch_coupled=True,
              sample=lambda hp, gd, policy, ref, ema, batch, keys: scoring.sample(gd, policy, batch, keys[0], hp),
              loss=_pg_loss(losses.rlhf_pg_loss), passes=lambda st: (1, 1)),
    # online IPO: y, y' ~ pi_theta; IPO-MD: both from the token-level mixture
    Algorithm("online_ipo", fields=dict(_POLICY_FIELDS, tau=1.0), sample=_two_policy_samples,
              passes=lambda st: (1, 2), **_IPO),
    Algorithm("ipo_md", fields=dict(_POLICY_FIELDS, tau=1.0, beta=0.125, beta_schedule=""),
              sample=lambda hp, gd, policy, ref, ema, batch, keys: scoring.sample_pair(
                  gd, policy, batch, keys, hp, mix_params=ref, beta_y=hp.beta),
              passes=lambda st: (2 * _mixed(_beta(st)), 2 * _mixed(_beta(st))), **_IPO),
    # EGPO (Zhou, Fazel, Du 2025): extragradient online IPO. A provisional step theta' from theta_t on pairs
    # y, y' ~ pi_t, new pairs y, y' ~ pi_theta', then the step from theta_t with the gradient on those (mirror
    # prox; the exact-game counterpart is nash_lm.games' `extragradient`)
    Algorithm("egpo", fields=dict(_POLICY_FIELDS, tau=1.0), sample=_two_policy_samples, lookahead=1,
              passes=lambda st: (1, 2), **_IPO),
)}

NAMES = tuple(REGISTRY)


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
    else:
        judge = {"preference": 2 * full(p + 2 * n, 0), "reward": 2 * full(p + n, 0)}.get(judge_kind, 0.0)
    # each round: sample, judge, mu forward + pi_theta forward and backward over the scored responses
    return (1 + alg.lookahead) * (sampling + judge + len(alg.scored) * 4 * full(p + n, n))
