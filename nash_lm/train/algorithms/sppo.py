"""SPPO, Self-Play Preference Optimization (Wu et al. 2024, arXiv 2405.00675): multiplicative weights on the
unregularised preference game, each round's step learnt by regression on estimated win rates.

Update rule (tabular, per prompt x; no KL to mu):

    pi_{t+1}(y) ∝ pi_t(y) exp( eta P(y > pi_t) )                       (`nash_lm.games`' `mwu`)

learnt with the paper's square loss, log Z_{pi_t} replaced by eta/2 (exact when E_{pi_t} P(y > pi_t) = 1/2 makes
the normaliser 1 to first order in eta):

    L_t(theta) = E_{y ~ pi_t} [ ( log(pi_theta(y)/pi_t(y)) - eta (P_hat(y > pi_t) - 1/2) )^2 ]

For each prompt the step draws K >= 2 responses y_1..y_K from pi_t, judges every pair (K (K - 1)/2 judge calls;
P(y_j > y_i) = 1 - P(y_i > y_j)) and estimates P_hat(y_i > pi_t) as the mean of P(y_i > y_j) over the K - 1
others: unbiased given y_i, so the minimiser of the expected loss is the one with the exact win rates (the
noise adds a theta-independent variance). That minimiser is the multiplicative-weights step up to the log Z
approximation: both are log pi_t + eta (P(y > pi_t) - 1/2) plus a shift of order eta^2 that normalisation makes
agree at leading order, so they differ by O(eta^3). tests/test_algorithms_exact.py checks by enumeration on a
softmax table the exact optimality condition of the constrained fit and the O(eta^3) gap to `games`' `mwu`.

Choices:
- Rounds with a refreshed anchor (as INPO, `nash_lm.train.algorithms.inpo`): pi_t is the state's tree `anchor`,
  refreshed to the policy after every `anchor_every` optimizer steps; the K responses are drawn from it (the
  paper's round t generates from pi_t). anchor_every = 1 is the online form.
- Leave-one-out win rates (the official code averages PairRM probabilities over all K samples including the
  response itself, which shrinks the estimate towards 1/2 by a factor (K - 1)/K).
- Every response enters the loss (the official `sppo_loss` uses the winner and loser of each pair, two of K).

Config fields: `eta` (> 0; the paper's 1/beta), `samples` (K >= 2), `anchor_every` (>= 1), `ref` (the policy's
start and, with LoRA, the frozen base; SPPO has no KL term to it), `judge`, and `temperature`,
`max_new_tokens`, `microbatches`.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from nash_lm import sampling
from nash_lm.train.algorithms.base import Algorithm, fail
from nash_lm.train.algorithms.inpo import refresh_every
from nash_lm.train.losses.common import masked_sum


def responses(cfg) -> tuple:
    """The names of the K responses per prompt: 'y', 'y2', ..., 'yK' (`cfg` a stage config or hyper-parameters)."""
    return ("y",) + tuple(f"y{i}" for i in range(2, int(cfg.get("samples")) + 1))


def pairs(cfg) -> tuple:
    """Every unordered pair of responses, each judged once."""
    return tuple(itertools.combinations(responses(cfg), 2))


def win_rates(judged, k: int):
    """`[B, K]` leave-one-out win rates from the `[B, K (K - 1)/2]` judgments of `pairs` (in their order)."""
    judged = judged.reshape(judged.shape[0], -1)
    wins = [[] for _ in range(k)]
    for m, (i, j) in enumerate(itertools.combinations(range(k), 2)):
        wins[i].append(judged[:, m])
        wins[j].append(1.0 - judged[:, m])
    return jnp.stack([sum(w) / (k - 1) for w in wins], axis=-1)


def sppo_loss(logp, d, names, eta):
    """SPPO loss (mean over prompts and responses) and metrics: `logp` {name: [B, N]} under pi_theta, `d` the
    anchor's log-probs (`anchor_<name>`), masks and the pairs' judgments."""
    rates = jax.lax.stop_gradient(win_rates(d["judged"], len(names)))
    u = jnp.stack([masked_sum(logp[r] - jax.lax.stop_gradient(d[f"anchor_{r}"]), d[f"{r}_mask"]) for r in names],
                  axis=-1)
    per = (u - eta * (rates - 0.5)) ** 2
    metrics = {"win_rate_spread": jnp.mean(jnp.max(rates, -1) - jnp.min(rates, -1)),
               "log_ratio_to_anchor": jnp.mean(jax.lax.stop_gradient(u))}
    return jnp.mean(per), metrics


def _sample(hp, graphdef, trees, batch, keys):
    """K responses per prompt from pi_t (the anchor), one decode loop over the prompts K times (a key each)."""
    names = responses(hp)
    k, (prompt, pmask) = len(names), (batch["prompt"], batch["prompt_mask"])
    b = prompt.shape[0]
    kw = dict(max_new_tokens=hp.max_new_tokens, eos_id=hp.eos_id, pad_id=hp.pad_id, temperature=hp.temperature)
    tile = lambda x: jnp.concatenate([x] * k)
    keys_k = tuple(jax.random.split(keys[0], k))
    if sampling.same_base(trees.anchor):  # LoRA: the anchor's adapters, on the policy's base
        out = sampling.sample(graphdef, trees.policy, tile(prompt), tile(pmask), keys_k, mix_params=trees.anchor,
                              beta=1.0, **kw)
    else:
        out = sampling.sample(graphdef, trees.anchor, tile(prompt), tile(pmask), keys_k, **kw)
    samples = {}
    for i, name in enumerate(names):
        samples[name] = out.tokens[i * b:(i + 1) * b]
        samples[f"{name}_mask"] = out.mask[i * b:(i + 1) * b].astype(jnp.float32)
    return samples


def _check(st, where):
    if st.samples < 2:
        fail(where("samples"), f"SPPO estimates win rates from K >= 2 samples per prompt, got {st.samples}")
    if st.eta <= 0:
        fail(where("eta"), f"must be > 0, got {st.eta}")
    if st.anchor_every < 1:
        fail(where("anchor_every"), f"must be >= 1 (the round length in optimizer steps), got {st.anchor_every}")


ALGORITHMS = (
    Algorithm("sppo", role="policy", produces="lm", data="prompts", judges=("preference", "reward"),
              fields=dict(ref="", judge="", temperature=1.0, max_new_tokens=8, microbatches=1, eta=1.0, samples=4,
                          anchor_every=10),
              check=_check, sample=_sample, scored=responses, pairs=pairs, against=("anchor",),
              loss=lambda hp, logp, d: sppo_loss(logp, d, responses(hp), hp.get("eta")),
              keeps=("anchor",), advance=refresh_every("anchor_every"),
              passes=lambda st: (int(st.samples), int(st.samples))),
)
