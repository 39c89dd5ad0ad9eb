"""Exact token-level games: every response is a sequence of length L over a vocabulary of V tokens.

The response space Y = V^L (|Y| up to a few thousand) is enumerated in lexicographic order: sequence index
i = sum_n y_n V^(L-1-n). An autoregressive policy is a table of next-token log-probabilities per prefix,
`[X, n_prefixes, V]` with n_prefixes = 1 + V + ... + V^(L-1) (prefix p of length n has row
`prefix_offset(n) + index(p)`); its sequence-level distribution is the product along the sequence. Every
distribution over Y is representable this way (`conditionals` inverts `sequence_logprobs`).

What this module owns (numerical reference for the token game of `configs/token_game.py`, benchmark B8 of
nlhf_math.md):

- `lift(instance, V, L, ...)`: a preference oracle on whole sequences from a `nash_lm.games.instances` game: each
  sequence is mapped to an action of the game (by the sum of its tokens, shifted per prompt, modulo the number of
  actions; or one action per sequence), and P(y > y' | x) = P_game(a_x(y), a_x(y')). Non-transitive games (rps,
  dice, cyclic) give non-transitive sequence preferences.
- `token_mixture` (the one-step-at-a-time regularised policy of Munos et al. App. F.1, what the sampler draws
  from) and `sequence_mixture` (the sequence-level geometric mixture pi^(1-beta) mu^beta / Z), and the KL between
  them.
- `duality_gap`, `equilibrium`: the sequence-level game handed to `nash_lm.games`.
- `mixture_fixed_point`: the stationary point of exact Nash-MD-PG (best response to the stop-gradient mixture
  opponent) with either mixture, i.e. the equilibrium each mixture leads to (the paper's first open question).
- `reference_table`: a random autoregressive reference mu, and `model_table`: the per-prefix table of a causal
  model read off one teacher-forced forward pass over all sequences.

All computations are float64 NumPy.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.special import logsumexp

from nash_lm import games


# ----------------------------------------------------------------------------------------------------------
# Enumeration


def all_sequences(V: int, L: int) -> np.ndarray:
    """Every sequence of length L over range(V), lexicographic order, [V**L, L] int64."""
    if V < 2 or L < 1:
        raise ValueError(f"token game: need V >= 2 and L >= 1, got V={V}, L={L}")
    return np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64).reshape(V ** L, L)


def prefix_offset(V: int, n: int) -> int:
    """Row of the first prefix of length n in a per-prefix table."""
    return (V ** n - 1) // (V - 1)


def n_prefixes(V: int, L: int) -> int:
    return prefix_offset(V, L)


def prefix_rows(V: int, L: int) -> np.ndarray:
    """[V**L, L]: row of the prefix y[:n] for every sequence y and position n."""
    seqs = all_sequences(V, L)
    rows = np.zeros_like(seqs)
    for n in range(L):
        idx = np.zeros(len(seqs), np.int64)
        for k in range(n):
            idx = idx * V + seqs[:, k]
        rows[:, n] = prefix_offset(V, n) + idx
    return rows


def _log_softmax(z, axis=-1):
    return z - logsumexp(z, axis=axis, keepdims=True)


def sequence_logprobs(table: np.ndarray, V: int, L: int) -> np.ndarray:
    """Per-prefix next-token logits or log-probs [..., n_prefixes, V] -> log pi(y) [..., V**L].

    Rows are normalised with log_softmax first, so unnormalised logits are accepted.
    """
    table = _log_softmax(np.asarray(table, np.float64))
    if table.shape[-2:] != (n_prefixes(V, L), V):
        raise ValueError(f"table: expected [..., {n_prefixes(V, L)}, {V}], got {list(table.shape)}")
    seqs, rows = all_sequences(V, L), prefix_rows(V, L)
    return table[..., rows, seqs].sum(-1)


def conditionals(logp_seq: np.ndarray, V: int, L: int) -> np.ndarray:
    """Inverse of `sequence_logprobs`: log pi(y_n | y_<n) per prefix [..., n_prefixes, V] from log pi(y) [..., V**L].

    Prefixes of probability 0 get the uniform conditional.
    """
    logp_seq = np.asarray(logp_seq, np.float64)
    lead = logp_seq.shape[:-1]
    out = np.zeros(lead + (n_prefixes(V, L), V))
    for n in range(L):
        # marginal of the first n + 1 tokens: [..., V**n, V]
        joint = logsumexp(logp_seq.reshape(lead + (V ** n, V, V ** (L - n - 1))), axis=-1)
        norm = logsumexp(joint, axis=-1, keepdims=True)
        cond = np.where(np.isfinite(norm), joint - np.where(np.isfinite(norm), norm, 0.0), -np.log(V))
        out[..., prefix_offset(V, n):prefix_offset(V, n + 1), :] = cond
    return out


# ----------------------------------------------------------------------------------------------------------
# Mixtures


def token_mixture(policy_table, ref_table, beta: float, V: int, L: int) -> np.ndarray:
    """log of the one-step-at-a-time mixture: per prefix log_softmax((1-beta) log pi + beta log mu), then the
    sequence product. [..., V**L]."""
    lp, lm = _log_softmax(np.asarray(policy_table, np.float64)), _log_softmax(np.asarray(ref_table, np.float64))
    return sequence_logprobs((1.0 - beta) * lp + beta * lm, V, L)


def sequence_mixture(logp_policy, logp_ref, beta: float) -> np.ndarray:
    """log of the sequence-level geometric mixture pi^(1-beta) mu^beta / Z. [..., V**L]."""
    return _log_softmax((1.0 - beta) * np.asarray(logp_policy, np.float64) + beta * np.asarray(logp_ref, np.float64))


def kl(logp, logq, rho=None) -> float:
    """rho-weighted KL(p || q) from log-probabilities [..., N] (a [N] input is one context)."""
    logp, logq = np.atleast_2d(logp), np.atleast_2d(logq)
    p = np.exp(logp)
    per = np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    rho = np.full(per.shape[0], 1.0 / per.shape[0]) if rho is None else np.asarray(rho, np.float64)
    return float(np.dot(rho, per))


def mixture_gap(policy_table, ref_table, beta: float, V: int, L: int, rho=None) -> dict:
    """How far the token-level mixture is from the sequence-level one: both KLs and the total variation."""
    tok = token_mixture(policy_table, ref_table, beta, V, L)
    seq = sequence_mixture(sequence_logprobs(policy_table, V, L), sequence_logprobs(ref_table, V, L), beta)
    tv = 0.5 * np.abs(np.exp(tok) - np.exp(seq)).sum(-1)
    tv = float(np.mean(tv)) if rho is None else float(np.dot(rho, np.atleast_1d(tv)))
    return {"kl_token_vs_sequence": kl(tok, seq, rho), "kl_sequence_vs_token": kl(seq, tok, rho), "tv": tv}


# ----------------------------------------------------------------------------------------------------------
# Games on sequences


@dataclasses.dataclass
class TokenGame:
    """A sequence-level preference game: P [X, N, N], mu [X, N] (N = V**L), rho [X], and the action map."""

    P: np.ndarray
    mu: np.ndarray
    rho: np.ndarray
    V: int
    L: int
    actions: np.ndarray  # [X, N]: the game action of each sequence under each prompt
    mu_table: np.ndarray  # [X, n_prefixes, V]: the autoregressive reference

    @property
    def n(self) -> int:
        return self.V ** self.L

    @property
    def X(self) -> int:
        return self.P.shape[0]


def reference_table(V: int, L: int, contexts: int = 1, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """A random autoregressive reference: per-prefix log-probs log_softmax(scale * N(0, 1)), [X, n_prefixes, V]."""
    rng = np.random.default_rng([seed, 7])
    return _log_softmax(scale * rng.normal(size=(contexts, n_prefixes(V, L), V)))


def action_map(V: int, L: int, n_actions: int, contexts: int, mapping: str) -> np.ndarray:
    """[X, N] action of each sequence: 'sum' = (sum of tokens + x) mod n_actions; 'identity' = sequence index."""
    seqs = all_sequences(V, L)
    if mapping == "sum":
        return (seqs.sum(-1)[None, :] + np.arange(contexts)[:, None]) % n_actions
    if mapping == "identity":
        if n_actions != V ** L:
            raise ValueError(f"mapping 'identity' needs a game with V**L = {V ** L} actions, got {n_actions}")
        return np.broadcast_to(np.arange(V ** L), (contexts, V ** L)).copy()
    raise ValueError(f"mapping: unknown {mapping!r}; known: ['sum', 'identity']")


def lift(instance: str, V: int, L: int, *, contexts: int = 1, mapping: str = "sum", mu_scale: float = 1.0,
         seed: int = 0, **instance_kwargs) -> TokenGame:
    """The token game whose preference is the `games.instances` game `instance` on the sequences' actions.

    mu is a random autoregressive reference (`reference_table(V, L, contexts, mu_scale, seed)`), not the game's mu.
    """
    if mapping == "identity" and instance in ("random", "cyclic"):
        instance_kwargs.setdefault("n", V ** L)
    base = games.instances.make(instance, **instance_kwargs)
    Pg = np.asarray(base.P, np.float64)
    if Pg.ndim != 2:
        raise ValueError(f"lift: instance {instance!r} must be a single-context game")
    actions = action_map(V, L, Pg.shape[0], contexts, mapping)
    P = np.stack([Pg[np.ix_(a, a)] for a in actions])
    table = reference_table(V, L, contexts, mu_scale, seed)
    mu = np.exp(sequence_logprobs(table, V, L))
    return TokenGame(P=P, mu=mu, rho=np.full(contexts, 1.0 / contexts), V=V, L=L, actions=actions,
                     mu_table=table)


def equilibrium(game: TokenGame, tau: float) -> np.ndarray:
    """The sequence-level regularised equilibrium pi*_tau [X, N] (games.nash_equilibrium)."""
    return np.atleast_2d(games.nash_equilibrium(game.P, game.mu, tau, game.rho))


def duality_gap(game: TokenGame, tau: float, pi_seq) -> float:
    """Exact duality gap of a sequence-level policy pi [X, N] (games.duality_gap)."""
    return games.duality_gap(game.P, game.mu, tau, np.atleast_2d(pi_seq), game.rho)


def best_response_log(game: TokenGame, tau: float, pi_opponent) -> np.ndarray:
    """log of the regularised best response, proportional to mu exp(P pi' / tau), [X, N]."""
    z = np.log(game.mu) + np.einsum("xij,xj->xi", game.P, np.atleast_2d(pi_opponent)) / tau
    return _log_softmax(z)


def mixture_fixed_point(game: TokenGame, tau: float, beta: float, mixture: str = "sequence", *,
                        damping: float = 0.5, tol: float = 1e-12, max_iter: int = 200_000) -> dict:
    """The stationary point of exact Nash-MD-PG on the full autoregressive class with the given opponent mixture.

    Nash-MD-PG ascends P(pi > sg(pi')) - tau KL(pi || mu) with pi' the mixture of pi and mu; with a full policy
    class its stationary points satisfy pi = BR_tau(pi') (pi proportional to mu exp(P pi' / tau)). Found by damped
    iteration in log space, log pi <- (1 - d) log pi + d log BR(mix(pi)). For mixture='sequence' the answer is
    known in closed form (Calandriello et al. Prop. 5.2): pi^(1-beta) mu^beta / Z = pi*_{tau/(1-beta)}.

    Returns {'pi': [X, N], 'opponent': [X, N], 'residual': max |log pi - log BR(mix(pi))| (gauge-free),
    'iterations': int}.
    """
    if mixture not in ("sequence", "token"):
        raise ValueError(f"mixture: must be 'sequence' or 'token', got {mixture!r}")
    V, L = game.V, game.L
    logmu = np.log(game.mu)

    def opponent(logp):
        if mixture == "sequence":
            return sequence_mixture(logp, logmu, beta)
        return token_mixture(conditionals(logp, V, L), game.mu_table, beta, V, L)

    logp = logmu.copy()
    residual = np.inf
    for it in range(1, max_iter + 1):
        target = best_response_log(game, tau, np.exp(opponent(logp)))
        diff = target - logp
        residual = float(np.max(np.abs(diff - diff.mean(-1, keepdims=True))))
        if residual < tol:
            break
        logp = _log_softmax(logp + damping * diff)
    return {"pi": np.exp(logp), "opponent": np.exp(opponent(logp)), "residual": residual, "iterations": it}


def model_table(logits: np.ndarray, V: int, L: int, prompt_len: int, token_ids) -> np.ndarray:
    """Per-prefix log-probs [n_prefixes, V] from one teacher-forced pass of a causal model over all sequences.

    `logits` [V**L, prompt_len + L, vocab] are the model's next-token logits for the inputs
    [prompt; y] of every sequence y (in `all_sequences` order); `token_ids[v]` is the model id of game token v.
    The row of prefix y[:n] is read at position prompt_len - 1 + n of any sequence with that prefix (the model is
    causal, so all of them agree), restricted to the game's tokens and renormalised over them.
    """
    logits = np.asarray(logits, np.float64)
    token_ids = np.asarray(token_ids)
    seqs, rows = all_sequences(V, L), prefix_rows(V, L)
    table = np.zeros((n_prefixes(V, L), V))
    for n in range(L):
        first = {}
        for i in range(len(seqs)):
            first.setdefault(rows[i, n], i)
        for row, i in first.items():
            table[row] = logits[i, prompt_len - 1 + n, token_ids]
    return _log_softmax(table)
