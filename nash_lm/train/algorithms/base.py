"""The record every training algorithm fills in, and the pieces several algorithm families share.

An `Algorithm` says everything the rest of the code needs to know about an algorithm, so that nothing outside
`nash_lm.train.algorithms` branches on an algorithm's name:

- `role` ('sft' | 'judge' | 'policy'), what its stage `produces` ('lm', 'preference' or 'reward' parameters)
  and the `data` it reads ('sft' demonstrations, labelled 'pairs', or 'prompts');
- `fields`: its own stage fields and their defaults (beside the common ones of `nash_lm.train.config`), and
  `check`, its own validity rules (each raises one ValueError naming the field);
- for policy algorithms:
  - `judges`: which judge stages it accepts, and `oracles`, whether oracles may judge;
  - `sample(hp, graphdef, trees, batch, keys) -> samples`: how y (and y') are drawn inside the compiled step
    from `trees` (a `Trees`: the policy, mu and the state's extra trees, already in the decode layout);
  - `judged`: 'pair' (P(y > y' | x) of the `pairs` of responses), 'reward' (r(x, y)) or 'label' (no judge: the
    labels of the batch's own pairs, which `sample` returns as `label`);
  - `pairs`: the pairs of responses judged, each (first, second) (default one, ('y', 'y2')); the judgment is
    `[B]` for one pair, `[B, M]` for M pairs;
  - `scored`: the responses teacher-forced in the loss (`pairs` and `scored` may be functions of the stage
    config or hyper-parameters, for an algorithm whose number of responses is a field); `against`: the frozen or extra trees whose log-probs of
    those responses the loss reads as constants ('ref' = mu, 'anchor', 'magnet', ...), under `<tree>_<response>`;
  - `loss(hp, logp, data) -> (loss, metrics)`: `logp` {response: [B, N]} under pi_theta (differentiable), `data`
    the per-example arrays (the responses and masks, the judgment `judged`, the `against` log-probs);
  - `keeps`: the extra trees of the train state (`nash_lm.train.state.TrainState`: 'ema', 'anchor', 'magnet',
    'predictor'), each a copy of the policy at step 0, and `advance(hp, before, after) -> after`: their update
    after the optimizer step (`before`/`after` the state before and after it);
  - `lookahead` (extragradient rounds: how many times the step takes a provisional gradient step from theta_t
    and samples again from it before the real update), `batch_coupled` (its loss couples the examples of a
    batch, so gradients cannot be accumulated over microbatches) and `passes` (the prefills and decode passes
    of its sampling, for the analytic FLOPs).

Adding an algorithm is one module of `nash_lm.train.algorithms` (its records, sampler, loss and state rule),
its entry in that package's `FAMILIES`, and its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from nash_lm.train import schedules
from nash_lm.train.state import EXTRA_TREES  # the train state's optional trees (`Algorithm.keeps`)


def fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def no_check(st, where) -> None:
    del st, where


class Trees(NamedTuple):
    """The parameter trees a policy algorithm may sample from, by name (None where the stage has none)."""

    policy: Any  # pi_theta
    ref: Any  # mu (with LoRA: `sampling.ADAPTERS_OFF`, mu run in pi's pass over the base)
    ema: Any = None  # the EMA of the policy (with LoRA: `sampling.Adapters(ema)`)
    anchor: Any = None  # pi_t, the policy at the start of the current round
    magnet: Any = None  # MPO's magnet
    predictor: Any = None  # ONPO's optimistic predictor pi_bar


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
    name: str
    role: str  # 'sft' | 'judge' | 'policy'
    produces: str  # 'lm' | 'preference' | 'reward'
    data: str  # 'sft' | 'pairs' | 'prompts'
    fields: Mapping = dataclasses.field(default_factory=dict)
    check: Callable = no_check  # check(stage_config, where) with where(field) -> 'config.stages.<name>.<field>'
    # policy algorithms
    judges: tuple = ()  # stage kinds accepted as `judge`
    oracles: bool = True  # whether `oracle:` / `host_oracle:` judges are accepted
    sample: Callable | None = None  # (hp, graphdef, trees: Trees, batch, keys) -> samples
    judged: str = "pair"  # 'pair': P(y > y' | x) of the `pairs`; 'reward': r(x, y); 'label': the pairs' labels
    pairs: tuple | Callable = (("y", "y2"),)  # the judged pairs of responses (or cfg -> pairs)
    scored: tuple | Callable = ("y",)  # responses whose log-probs enter the loss (or cfg -> responses)
    against: tuple = ("ref",)  # trees whose log-probs of the scored responses the loss reads (constants)
    loss: Callable | None = None  # (hp, logp {resp: [B, N]}, data) -> (loss, metrics)
    keeps: tuple = ()  # extra trees of the train state (EXTRA_TREES)
    advance: Callable | None = None  # (hp, state before the update, state after it) -> state after, extras updated
    lookahead: int = 0
    batch_coupled: bool = False  # the loss couples the examples of a batch (no gradient microbatches)
    passes: Callable | None = None  # stage config -> (prompt prefills, decode passes), in batches of sequences

    @property
    def sequences(self) -> int:
        """Sequences per example a step processes (for tokens/s): the response, or the pair."""
        return 1 if self.role == "sft" or self.judged == "reward" else 2

    def responses(self, cfg) -> tuple:
        """The scored responses for a stage config or hyper-parameters `cfg`."""
        return self.scored(cfg) if callable(self.scored) else self.scored

    def judged_pairs(self, cfg) -> tuple:
        """The judged pairs of responses for a stage config or hyper-parameters `cfg`."""
        return self.pairs(cfg) if callable(self.pairs) else self.pairs

    @property
    def ema(self) -> bool:
        """Whether the state keeps an EMA of the policy (exported and evaluated beside it)."""
        return "ema" in self.keeps


POLICY_FIELDS = dict(
    ref="", judge="", temperature=1.0, max_new_tokens=8,
    microbatches=1,  # the update's gradients accumulated over this many microbatches
    tau_schedule="",  # tau over the steps ('' constant; nash_lm.train.schedules)
    missing_eos_penalty=0.0,  # subtracted from a completion's preference (or reward) when it has no EOS
)


def reset_to_policy(now, tree, policy):
    """An extra tree's refresh in an `advance` rule: `policy` where the traced condition `now` holds, else `tree`
    (kept inside the compiled step: a select, no host round trip)."""
    return jax.tree.map(lambda t, p: jnp.where(now, p, t), tree, policy)


def beta_of(st) -> float:
    """The stage's beta for counting models: a scheduled beta counts as strictly inside (0, 1)."""
    return 0.5 if st.get("beta_schedule", "") else float(st.beta)


def mixed(beta: float) -> int:
    """Models a token-level mixture decode step runs: two strictly inside (0, 1), one at the ends."""
    return 2 if 0.0 < beta < 1.0 else 1


def positive_tau(st, where, why: str):
    """tau > 0 and a tau schedule that never reaches 0 (`why`: what needs it)."""
    if st.tau == 0:
        fail(where("tau"), f"must be > 0 for {why}")
    sched = schedules.parse(st.tau_schedule, where("tau_schedule"), 0.0, float("inf"), st.steps)
    if sched and 0.0 in ([v for _, v in sched[1]] if sched[0] == "steps" else [sched[1]]):
        fail(where("tau_schedule"), f"reaches 0, but tau must be > 0 for {why}")

