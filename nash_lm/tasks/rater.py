"""The automatic rater of the docstring task: a panel of three criteria, majority vote per pair, label noise.

For a prompt x with reference summary r (its docstring's first line) and source docstring s, each criterion
votes on a pair of candidate summaries (y, y'): +1 for y, -1 for y', 0 on an exact tie.

    rouge         ROUGE-L F1 against r (the `rouge-score` package, no stemming)       higher wins
    length        | #words(y) - #words(r) |                                           lower wins
    faithfulness  share of y's words found in s (0 for an empty summary)              higher wins

The panel's verdict is the majority: v = 1 if the votes sum to > 0, 0 if < 0, 1/2 if 0. Each criterion is a
total order, but three orders combined by majority need not be one (Condorcet), so the rater is a general,
non-transitive preference. Label noise flips the verdict with probability `noise`:

    P(y > y' | x) = noise + (1 - 2 noise) v       (antisymmetric: P(y > y') + P(y' > y) = 1 exactly)

`Rater(examples, noise, seed)` is called on batches of texts: `rater(prompts, ys, y2s)` returns P (float64 [B]);
`rater.labels(...)` returns 0/1 draws from it (its own seeded generator); `rater.votes(...)` the per-criterion
votes. Prompts are looked up in the examples given at construction (or pass `references=` and `sources=`).
`token_oracle(rater, fmt, examples)` adapts it to the training loop's host-oracle signature on token arrays.

How non-transitive the panel is on a set of responses (e.g. samples from mu for one prompt):
`Rater.cycles(responses, reference, source)` takes the noiseless verdicts between every two of m responses and
returns (cyclic triples, all triples), a triple {a, b, c} being cyclic when its three strict verdicts form a cycle
(a > b > c > a, or the reverse; counted by `nash_lm.games.population.cyclic_triples`). A verdict of 1/2 (a tie,
or two identical responses) breaks a cycle.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nash_lm.games import population
from nash_lm.tasks.docstrings import words

CRITERIA = ("rouge", "length", "faithfulness")


def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def faithfulness(summary: str, source: str) -> float:
    w = words(summary)
    if not w:
        return 0.0
    vocab = set(words(source))
    return sum(x in vocab for x in w) / len(w)


def length_distance(summary: str, reference: str) -> int:
    return abs(len(words(summary)) - len(words(reference)))


class Rater:
    """The three-criterion majority-vote rater with label noise (see the module docstring)."""

    def __init__(self, examples: Sequence[dict] = (), noise: float = 0.1, seed: int = 0):
        if not 0.0 <= noise <= 0.5:
            raise ValueError(f"rater noise: must be in [0, 0.5], got {noise}")
        self.noise = float(noise)
        self._lookup = {}
        for ex in examples:
            self._lookup.setdefault(ex["prompt"], (ex["response"], ex.get("source", ex["prompt"] + " "
                                                                           + ex["response"])))
        self._rouge = _scorer()
        self._rng = np.random.default_rng(seed)

    def _refs(self, prompts, references, sources):
        if references is None:
            try:
                pairs = [self._lookup[p] for p in prompts]
            except KeyError as e:
                raise KeyError(f"rater: no reference for prompt {str(e)[:60]}...; pass references=") from None
            references = [r for r, _ in pairs]
            if sources is None:
                sources = [s for _, s in pairs]
        if sources is None:
            sources = [f"{r}\n\n{p}" for p, r in zip(prompts, references)]
        return list(references), list(sources)

    def scores(self, summary: str, reference: str, source: str) -> dict:
        """The three criteria of one summary (rouge and faithfulness: higher is better; length: lower)."""
        return {"rouge": self._rouge.score(reference, summary)["rougeL"].fmeasure,
                "length": length_distance(summary, reference),
                "faithfulness": faithfulness(summary, source)}

    def votes(self, prompts, ys, y2s, *, references=None, sources=None) -> np.ndarray:
        """[B, 3] votes in {-1, 0, +1} (columns in CRITERIA order): +1 when the criterion prefers y."""
        n = len(prompts)
        if not len(ys) == len(y2s) == n:
            raise ValueError(f"rater: batch sizes differ (prompts {n}, ys {len(ys)}, y2s {len(y2s)})")
        references, sources = self._refs(prompts, references, sources)
        out = np.zeros((n, 3), np.int64)
        for i in range(n):
            a = self.scores(ys[i], references[i], sources[i])
            b = self.scores(y2s[i], references[i], sources[i])
            out[i, 0] = np.sign(a["rouge"] - b["rouge"])
            out[i, 1] = np.sign(b["length"] - a["length"])
            out[i, 2] = np.sign(a["faithfulness"] - b["faithfulness"])
        return out

    def verdict(self, prompts, ys, y2s, **kw) -> np.ndarray:
        """The noiseless majority verdict v in {0, 1/2, 1}, [B]."""
        s = self.votes(prompts, ys, y2s, **kw).sum(-1)
        return np.where(s > 0, 1.0, np.where(s < 0, 0.0, 0.5))

    def cycles(self, responses: Sequence[str], reference: str, source: str) -> tuple[int, int]:
        """(cyclic triples, triples) among `responses` to one prompt under the noiseless majority verdict."""
        m = len(responses)
        i, j = np.triu_indices(m, 1)
        v = np.full((m, m), 0.5)
        if len(i):
            got = self.verdict([""] * len(i), [responses[a] for a in i], [responses[b] for b in j],
                               references=[reference] * len(i), sources=[source] * len(i))
            v[i, j], v[j, i] = got, 1.0 - got
        return population.cyclic_triples(v), m * (m - 1) * (m - 2) // 6

    def __call__(self, prompts, ys, y2s, **kw) -> np.ndarray:
        """P(y > y' | x) = noise + (1 - 2 noise) v, float64 [B]."""
        return self.noise + (1.0 - 2.0 * self.noise) * self.verdict(prompts, ys, y2s, **kw)

    def labels(self, prompts, ys, y2s, **kw) -> np.ndarray:
        """0/1 labels drawn from P (1: y preferred), float32 [B]."""
        p = self(prompts, ys, y2s, **kw)
        return (self._rng.uniform(size=p.shape) < p).astype(np.float32)


def token_oracle(rater: Rater, fmt, examples: Sequence[dict]):
    """The rater as a host oracle on token arrays: (prompt, prompt_mask, y, y_mask, y2, y2_mask) -> P [B].

    Prompts are matched to their examples by their token rows under `fmt` (a `nash_lm.data.features.TextFormat`:
    tokenizer, prompt length, chat template, truncation), so the reference and source of every prompt the
    pipeline can produce from `examples` are known exactly.
    """
    from nash_lm.data.features import decode_response

    tokenizer = fmt.tokenizer
    table = {}
    for ex in examples:
        row = tuple(int(t) for t in fmt.prompt(ex["prompt"])[0])
        table.setdefault(row, (ex["response"], ex.get("source", ex["prompt"] + " " + ex["response"])))

    def oracle(prompt, prompt_mask, y, y_mask, y2, y2_mask):
        rows = [tuple(int(t) for t in r) for r in np.asarray(prompt)]
        missing = [r for r in rows if r not in table]
        if missing:
            raise KeyError(f"rater oracle: a prompt row that no example encodes to: {missing[0][:8]}...")
        refs = [table[r][0] for r in rows]
        srcs = [table[r][1] for r in rows]
        ys = [decode_response(tokenizer, a, m) for a, m in zip(np.asarray(y), np.asarray(y_mask))]
        y2s = [decode_response(tokenizer, a, m) for a, m in zip(np.asarray(y2), np.asarray(y2_mask))]
        return rater([""] * len(rows), ys, y2s, references=refs, sources=srcs).astype(np.float32)

    return oracle
