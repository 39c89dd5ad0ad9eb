"""ONPO, Optimistic Nash Policy Optimization (Zhang et al. 2025, arXiv 2502.16852): optimistic online mirror
descent on the KL-regularised preference game, each half-step learnt by INPO's squared loss.

Update rule (tabular, per prompt x; `eta_inv` the inverse step as in INPO, a = tau/eta_inv; `nash_lm.games`'
`optimistic` with eta = 1/eta_inv):

    pi_bar_{t+1}(y) ∝ mu(y)^a pi_t(y)^(1 - a) exp( P(y > pi_bar_t) / eta_inv )       (the predictor)
    pi_{t+1}(y)     ∝ mu(y)^a pi_t(y)^(1 - a) exp( P(y > pi_bar_{t+1}) / eta_inv )   (the policy)

with pi_bar_0 = pi_0. Both half-steps are OMD steps from pi_t; they differ only in the opponent the advantage is
taken against. INPO's loss (`nash_lm.train.algorithms.inpo.inpo_loss`) anchored at pi_t on pairs y, y' ~ q
with the soft label P(y > y'|x) is a least-squares fit of h_theta(y, y') to (P(y > y') - 1/2)/eta_inv +
a h_mu + (1 - a) h_t over the product q x q, whose minimiser over all policies is the OMD step from pi_t
against q (f(y) = P(y > q)/eta_inv + ...). So each half-step is that loss with pairs from its opponent:
q = pi_bar_t for the predictor, q = pi_bar_{t+1} for the policy. tests/test_algorithms_exact.py checks, by
enumeration on a softmax table, that the two minimisers are `games`' `optimistic` predictor and policy of one
step from a state with pi_bar_t != pi_t.

Source: the rule above is the optimistic (predictor-corrector) mirror descent that `games`' `optimistic` runs
and docs/math.md attributes to ONPO; the paper's text could not be consulted when this was written, so its own
loss, its sampling (its experiments, like INPO's, may pick best-versus-worst of K samples) and its round schedule
are not checked: this module is verified against the tabular counterpart only.

Choices:
- The state keeps pi_t as `anchor` and the predictor pi_bar as `predictor` (`keeps=('anchor', 'predictor')`,
  both a copy of the policy at step 0, so pi_bar_0 = pi_0 and the first half-step is INPO's first round). A
  round is 2 `half_every` optimizer steps: the first `half_every` fit the predictor (pairs from `predictor` =
  pi_bar_t), after which `predictor` becomes the trained policy (pi_bar_{t+1}); the next `half_every` fit the
  policy (pairs from `predictor`, now pi_bar_{t+1}), after which `anchor` becomes the trained policy (pi_{t+1}).
  So the sampler (from `predictor`), the loss (INPO's, anchored at `anchor`) and the compiled step are the same
  in both halves; only `advance` alternates which tree is refreshed.
- The trained parameters are not reset to pi_t between the halves: the policy half starts from the fitted
  predictor (its target differs from the predictor's only through the opponent, so it is a warm start) with
  the optimizer's moments carried on. The minimiser of each half does not depend on where it starts.
- Pairs: both y and y' from the opponent with the soft label, as INPO (the product distribution is what makes
  the minimiser exactly the mirror-descent step).

Config fields: `tau` (> 0, constant), `eta_inv` (>= tau), `half_every` (optimizer steps per half-step, >= 1),
and the common policy fields. Judges: a preference or reward model, or an oracle.
"""
from __future__ import annotations

from nash_lm.train import scoring
from nash_lm.train.algorithms.base import POLICY_FIELDS, Algorithm, fail, reset_to_policy
from nash_lm.train.algorithms.inpo import check_step, inpo_loss


def sample_from_predictor(hp, graphdef, trees, batch, keys):
    """y, y' ~ pi_bar (the predictor: pi_bar_t in the predictor half, pi_bar_{t+1} in the policy half)."""
    return scoring.sample_pair(graphdef, trees.policy, batch, keys, hp, mix_params=trees.predictor, beta_y=1.0)


def _advance(hp, before, after):
    """After the predictor half (step = n mod 2n) pi_bar <- policy; after the policy half (step = 0 mod 2n)
    pi_t <- policy (n = half_every)."""
    n = hp.get("half_every")
    phase = after.step % (2 * n)
    return after.replace(predictor=reset_to_policy(phase == n, before.predictor, after.policy),
                         anchor=reset_to_policy(phase == 0, before.anchor, after.policy))


def _check(st, where):
    check_step(st, where, "ONPO")
    if st.half_every < 1:
        fail(where("half_every"), f"must be >= 1 (optimizer steps per half-step), got {st.half_every}")


ALGORITHMS = (
    Algorithm("onpo", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(POLICY_FIELDS, tau=0.1, eta_inv=1.0, half_every=5), check=_check,
              sample=sample_from_predictor, scored=("y", "y2"), against=("ref", "anchor"),
              loss=lambda hp, logp, d: inpo_loss(logp, d, hp.tau, hp.get("eta_inv")),
              keeps=("anchor", "predictor"), advance=_advance, passes=lambda st: (1, 2)),
)
