"""Jobs of the embedded tasks: the training pipeline's stages run on task data, then task-specific evaluation.

Two jobs (registered in `nash_lm.main.JOBS`):

- `docstrings` (`configs/docstrings.py`): corpus -> SentencePiece tokenizer -> SFT (mu) -> pairs sampled from mu
  and labelled by the rater panel -> preference model and Bradley-Terry reward model -> RLHF, self-play,
  Nash-MD-PG (several beta), best response, Nash-EMA-PG -> the tournament on held-out prompts judged by the rater.
- `token_game` (`configs/token_game.py`): a lifted non-transitive game on V^L sequences -> SFT of a small
  transformer on samples of the reference distribution (mu) -> Nash-MD-PG and the other algorithms against the
  exact preference oracle -> exact evaluation by enumerating every sequence: KL(pi*_tau || pi_theta) and the
  duality gap of each policy in the game whose reference is the fitted transformer mu_theta, the KL between the
  token-level and the sequence-level mixture, and the equilibrium each mixture leads to.

Each job's config holds the task fields and a complete training config `config.train` (the schema of
`nash_lm.train.config`); its `data` entry only sets the array shapes (vocab_size, prompt_len, response_len) and a
seed that is a hash of the task fields, so that stage fingerprints change with the task. The stages are run by
the training pipeline (`nash_lm.train.pipeline.Pipeline`: validation first, compiled steps, checkpoints, resume,
SIGTERM, metrics, a progress bar per stage), with the task's arrays handed to it as its data and, for the token
game, the exact preference as its host oracle (`judge = 'host_oracle'`).

This module also holds the pieces the docstring jobs share (`nash_lm.tasks.online_lm` uses them too): batched
sampling of token arrays, text samplers for the tournament, pair labelling, the docstring data.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from nash_lm import distributed, models, sampling, stack
from nash_lm.data import features
from nash_lm.data import tokenizer as tokenizer_lib
from nash_lm.data.synthetic import BOS_ID, EOS_ID, PAD_ID
from nash_lm.evaluation import tournament
from nash_lm.tasks import docstrings, rater as rater_lib, token_game as tg
from nash_lm.train import config as cfg_lib
from nash_lm.train import scoring
from nash_lm.train.pipeline import Pipeline

# ----------------------------------------------------------------------------------------------------------
# The training config of a task job


def train_config(config, task_hash: str) -> ml_collections.ConfigDict:
    """The job's training config with a task-dependent data seed filled in."""
    cfg = ml_collections.ConfigDict(config.train.to_dict())
    cfg.data.seed = int(task_hash[:7], 16)
    return cfg


def task_hash(config, fields) -> str:
    """SHA-256 of the task fields of a job config (seeds the stages' data, keys caches)."""
    payload = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in fields}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def in_batches(fn, arrays: list, batch_size: int) -> list:
    """fn(*chunk) over consecutive chunks of `batch_size` rows of `arrays`, the last chunk padded with copies of
    its first row to the full size (one compilation); each output sliced back to the real rows."""
    out = []
    for i in range(0, len(arrays[0]), batch_size):
        chunk = [a[i:i + batch_size] for a in arrays]
        n = len(chunk[0])
        if n < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[:1], batch_size - n, 0)]) for c in chunk]
        out.append(jax.tree.map(lambda x: np.asarray(x)[:n], fn(*chunk)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling and labelling


class TextSampler:
    """A tournament policy: prompts (strings) -> one sampled completion each, from an lm export; prompts are
    encoded by `fmt` (`nash_lm.data.features.TextFormat`), sampling stops at its tokenizer's EOS."""

    def __init__(self, graphdef, params, fmt, max_new_tokens: int, temperature: float, batch_size: int = 256):
        self.graphdef, self.params, self.fmt = graphdef, params, fmt
        self.batch_size, self.max_new_tokens, self.temperature = batch_size, max_new_tokens, temperature

    def __call__(self, prompts, seed):
        rows = [self.fmt.prompt(p) for p in prompts]
        toks = np.stack([r[0] for r in rows])
        masks = np.stack([r[1] for r in rows]).astype(np.int32)
        tok = self.fmt.tokenizer
        tokens, mask = sample_tokens(self.graphdef, self.params, toks, masks, jax.random.PRNGKey(seed),
                                     self.max_new_tokens, self.temperature, self.batch_size, eos_id=tok.eos_id,
                                     pad_id=tok.pad_id)
        return [features.decode_response(tok, tokens[j], mask[j]) for j in range(len(prompts))]


@functools.lru_cache(maxsize=None)
def _sampler(max_new_tokens, temperature, eos_id, pad_id):
    return sampling.sample_jit(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature)


def sample_tokens(graphdef, params, prompt, prompt_mask, key, max_new_tokens, temperature=1.0, batch_size=256,
                  eos_id=EOS_ID, pad_id=PAD_ID):
    """(tokens [N, T] int, mask [N, T] float32) of one sample per prompt row, in batches of `batch_size` (each
    batch with its own key split from `key`)."""
    fn = _sampler(max_new_tokens, temperature, eos_id, pad_id)

    def one(t, m):
        nonlocal key
        key, sub = jax.random.split(key)
        s = fn(graphdef, params, t, m, sub)
        return s.tokens, s.mask

    chunks = in_batches(one, [np.asarray(prompt), np.asarray(prompt_mask).astype(np.int32)], batch_size)
    return (np.concatenate([c[0] for c in chunks]),
            np.concatenate([c[1] for c in chunks]).astype(np.float32))


def sample_pairs(graphdef, params, prompts: dict, per_prompt: int, k1, k2, response_len: int, batch_size=256,
                 **ids) -> dict:
    """`per_prompt` pairs y ~ pi (key k1), y' ~ pi (key k2) for every prompt row of {prompt, prompt_mask}
    (`ids`: the tokenizer's `eos_id` / `pad_id` when not the synthetic ones)."""
    src = {k: np.repeat(prompts[k], per_prompt, axis=0) for k in ("prompt", "prompt_mask")}
    y, ym = sample_tokens(graphdef, params, src["prompt"], src["prompt_mask"], k1, response_len, 1.0, batch_size,
                          **ids)
    y2, y2m = sample_tokens(graphdef, params, src["prompt"], src["prompt_mask"], k2, response_len, 1.0, batch_size,
                            **ids)
    return {**src, "y": y, "y_mask": ym, "y2": y2, "y2_mask": y2m}


def label_pairs(oracle, pairs: dict, seed_parts, desc: str = "labels", chunk: int = 512) -> dict:
    """Adds the oracle's soft label P(y > y2 | x) ("label", float32, computed in chunks under a progress bar)
    and a 0/1 draw from it ("hard_label", from a generator seeded by `seed_parts`)."""
    from tqdm import tqdm

    p = []
    for i in tqdm(range(0, len(pairs["prompt"]), chunk), desc=desc, unit="chunk", leave=False, dynamic_ncols=True):
        p.append(scoring.call_host_oracle(oracle, {k: pairs[k][i:i + chunk] for k in scoring.ORACLE_ARGS}))
    p = np.concatenate(p)
    draw = np.random.default_rng(list(seed_parts)).uniform(size=p.shape)
    return {**pairs, "label": p, "hard_label": (draw < p).astype(np.float32)}


@dataclasses.dataclass
class DocstringData:
    """What both docstring jobs build first: the corpus and its splits, the text format (tokenizer, lengths,
    chat template, truncation), and the token arrays `arrays[(kind, split)]` for kind in {'sft', 'prompts'} and
    split in {'train' (train), 'eval' (valid)}."""

    corpus: list
    splits: dict
    fmt: features.TextFormat
    arrays: dict

    @property
    def tokenizer(self):
        return self.fmt.tokenizer

    @property
    def prompt_len(self) -> int:
        return self.fmt.prompt_len

    @property
    def response_len(self) -> int:
        return self.fmt.response_len

    @property
    def ids(self) -> dict:
        """The tokenizer's stop and padding ids, for the samplers."""
        return {"eos_id": self.fmt.tokenizer.eos_id, "pad_id": self.fmt.tokenizer.pad_id}


def _task_tokenizer(config, cache: str, train_examples: list):
    """`config.task.tokenizer`: '' (default) trains a SentencePiece model on the training split (cached);
    'checkpoint' takes the tokenizer.json (and chat template) of the SFT stage's `hf:` checkpoint."""
    which = config.task.get("tokenizer", "")
    if which == "":
        return tokenizer_lib.train_sentencepiece([e["prompt"] + "\n" + e["response"] for e in train_examples],
                                                 config.task.tokenizer_vocab_size, cache)
    if which != "checkpoint":
        raise ValueError(f"config.task.tokenizer: expected '' (train SentencePiece) or 'checkpoint', got {which!r}")
    init = config.train.stages.sft.init
    if not init.startswith(cfg_lib.HF_PREFIX):
        raise ValueError(f"config.task.tokenizer: 'checkpoint' needs config.train.stages.sft.init = 'hf:/dir', got "
                         f"{init!r}")
    return tokenizer_lib.HFTokenizer(os.path.join(cfg_lib.hf_path(init, "config.train.stages.sft.init"),
                                                  "tokenizer.json"))


def prepare_docstrings(config, workdir: str, tag: str) -> DocstringData:
    """Corpus (cached in WORKDIR/cache), tokenizer (checked against both model vocabularies) and the SFT / prompt
    arrays of `config.task` and `config.train` (prompts through the tokenizer's chat template when
    `config.task.chat_template` is set and it has one; too-long prompts keep their end then)."""
    cache = os.path.join(workdir, "cache")
    print(f"[{tag}] harvesting the standard library's docstrings", flush=True)
    corpus = docstrings.load(cache, docstrings.CorpusConfig(**config.task.corpus.to_dict()).validate())
    splits = {s: docstrings.split(corpus, s) for s in docstrings.SPLITS}
    print(f"[{tag}] corpus: " + " / ".join(f"{len(v)} {k}" for k, v in splits.items()), flush=True)
    tcfg = config.train
    tok = _task_tokenizer(config, cache, splits["train"])
    tokenizer_lib.check_fits(tok, tcfg.model.vocab_size)
    tokenizer_lib.check_fits(tok, tcfg.judge_model.vocab_size, "config.train.judge_model.vocab_size")
    chat = bool(config.task.get("chat_template", False) and tok.chat_template)
    fmt = features.TextFormat(tok, int(tcfg.data.prompt_len), int(tcfg.data.response_len), chat,
                              "keep_end" if chat else "keep_start")
    arrays = {}
    for split, name in (("train", "train"), ("eval", "valid")):
        sft = fmt.arrays([{"prompt": e["prompt"], "response": e["response"]} for e in splits[name]], "sft")
        arrays[("sft", split)] = sft
        arrays[("prompts", split)] = {k: sft[k] for k in ("prompt", "prompt_mask")}
    return DocstringData(corpus, splits, fmt, arrays)


def run_docstrings(config, workdir: str) -> dict:
    """The `docstrings` job (see the module docstring); returns the summary written to WORKDIR/summary.json."""
    t0 = time.time()
    task = config.task
    docstrings.CorpusConfig(**task.corpus.to_dict()).validate()  # bad values fail before anything is written
    k_pairs = int(task.pairs_per_prompt)
    if k_pairs < 1:
        raise ValueError(f"config.task.pairs_per_prompt: must be >= 1, got {k_pairs}")
    # rows per compiled sampler call (the pairs from mu, the tournament); the draws depend on it
    sample_batch = int(task.get("sample_batch_size", 256))
    if sample_batch < 1:
        raise ValueError(f"config.task.sample_batch_size: must be >= 1, got {sample_batch}")
    arrays = {}  # the stages' data: SFT demonstrations and prompts, then pairs sampled from mu
    with Pipeline(train_config(config, task_hash(config, ("task",))), workdir, data=arrays) as pipe:
        distributed.write_json(os.path.join(pipe.workdir, "config.json"), cfg_lib.to_jsonable(config))
        d = prepare_docstrings(config, pipe.workdir, "docstrings")
        pipe.use_tokenizer(d.fmt.tokenizer)
        arrays.update(d.arrays)
        oracle = rater_lib.token_oracle(rater_lib.Rater(d.corpus, noise=task.rater_noise, seed=task.seed), d.fmt,
                                        d.corpus)
        results = pipe.run(["sft"])
        # pairs from mu, labelled by the rater panel (soft label P and a 0/1 draw)
        gd, mu_params = pipe.params("sft")
        key = jax.random.PRNGKey(task.seed)
        for split in ("train", "eval"):
            k1, k2, key = jax.random.split(key, 3)
            pairs = sample_pairs(gd, mu_params, arrays[("prompts", split)], k_pairs, k1, k2, d.response_len,
                                 batch_size=sample_batch, **d.ids)
            arrays[("pairs", split)] = label_pairs(oracle, pairs, [task.seed, 3, split == "eval"], f"pairs ({split})")
        print(f"[docstrings] {len(arrays[('pairs', 'train')]['y'])} pairs from mu labelled by the rater "
              f"(mean P = {float(arrays[('pairs', 'train')]['label'].mean()):.3f})", flush=True)
        results.update(pipe.run())

        # the tournament on held-out prompts
        tconf, test_ex = task.tournament, d.splits["test"]
        prompts = [e["prompt"] for e in test_ex]
        policies = {}
        base = pipe.spec.stages["sft"].init
        if tconf.get("base_label", "") and base is not None and base.kind == "hf":  # the untouched checkpoint
            from nash_lm.interop import hf as hf_interop

            p = hf_interop.load_pretrained(base.value, config=pipe.spec.stages["sft"].model, tokenizer=False)
            policies[tconf.base_label] = TextSampler(p.graphdef, p.params, d.fmt, d.response_len, tconf.temperature,
                                                     sample_batch)
        for name in pipe.spec.order:
            alg = pipe.spec.stages[name].algorithm
            if alg.produces != "lm":
                continue
            label = task.labels.get(name, name) if "labels" in task else name
            for key_name, suffix in (("policy", ""),) + ((("ema", "*"),) if alg.ema else ()):
                gd, params = pipe.params(name, key_name)
                policies[label + suffix] = TextSampler(gd, params, d.fmt, d.response_len, tconf.temperature,
                                                       sample_batch)
    judge = rater_lib.Rater(d.corpus, noise=task.rater_noise, seed=task.seed + 1)
    result = tournament.run(policies, prompts, judge, samples_per_prompt=tconf.samples_per_prompt,
                            seed=task.seed, method=tconf.ci_method, references=[e["response"] for e in test_ex],
                            progress=True)
    paths = tournament.save(result, os.path.join(pipe.workdir, "tournament"))
    print(tournament.markdown(result), flush=True)
    mu_label = task.labels.get("sft", "sft") if "labels" in task else "sft"
    cycles = mu_cycles(judge, result.samples[mu_label], test_ex) if mu_label in result.samples else None
    if cycles:
        print(f"[docstrings] rater cycles among mu's samples: {cycles['cyclic']} of {cycles['triples']} triples "
              f"({cycles['rate']:.4f})", flush=True)
    summary = {"status": "complete", "wall_time_s": time.time() - t0,
               "corpus": {s: len(v) for s, v in d.splits.items()}, "tokenizer": d.tokenizer.path,
               "tournament": result.to_json(), "files": paths, "mu_cycles": cycles,
               "stages": {k: v.get("eval", {}) for k, v in results.items()}, "stack": stack.versions()}
    distributed.write_json(os.path.join(pipe.workdir, "summary.json"), summary)
    return summary


def mu_cycles(rater: rater_lib.Rater, samples: list, examples: list) -> dict:
    """How non-transitive the rater is on mu's tournament samples: for each prompt, the cyclic triples of the
    noiseless majority among its samples (`Rater.cycles`); `samples` is the tournament's list for mu (samples
    per prompt consecutive blocks of len(examples), prompt-major within a block)."""
    n = len(examples)
    k = len(samples) // n
    cyclic = triples = 0
    for i, ex in enumerate(examples):
        src = ex.get("source", ex["prompt"] + " " + ex["response"])
        c, t = rater.cycles([samples[s * n + i] for s in range(k)], ex["response"], src)
        cyclic, triples = cyclic + c, triples + t
    return {"cyclic": cyclic, "triples": triples, "rate": cyclic / triples if triples else 0.0, "prompts": n,
            "samples_per_prompt": k}


# ----------------------------------------------------------------------------------------------------------
# Token games


def _token_arrays(game: tg.TokenGame, n: int, seed: int, with_response: bool) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, game.X, size=n)
    out = {"prompt": np.stack([np.full(n, BOS_ID), 3 + x], 1).astype(np.int32),
           "prompt_mask": np.ones((n, 2), np.float32)}
    if with_response:
        seqs = tg.all_sequences(game.V, game.L)
        idx = np.array([rng.choice(game.n, p=game.mu[xi]) for xi in x])
        out["response"] = (3 + seqs[idx]).astype(np.int32)
        out["response_mask"] = np.ones((n, game.L), np.float32)
    return out


def _token_pairs(game: tg.TokenGame, oracle, n: int, seed: int) -> dict:
    """n pairs y, y' drawn independently from mu for one prompt each, labelled by the exact oracle (the offline
    stages' data: DPO, offline IPO)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, game.X, size=n)
    seqs = tg.all_sequences(game.V, game.L)
    draw = lambda: (3 + seqs[np.array([rng.choice(game.n, p=game.mu[xi]) for xi in x])]).astype(np.int32)
    ones = np.ones((n, game.L), np.float32)
    pairs = {"prompt": np.stack([np.full(n, BOS_ID), 3 + x], 1).astype(np.int32),
             "prompt_mask": np.ones((n, 2), np.float32), "y": draw(), "y_mask": ones, "y2": draw(), "y2_mask": ones}
    return label_pairs(oracle, pairs, (seed, 1), desc="token-game pairs")


def token_game_oracle(game: tg.TokenGame):
    """Exact P(y > y2 | x) on token arrays; a response that is not L game tokens loses to a valid one."""
    V, L = game.V, game.L
    weights = V ** np.arange(L - 1, -1, -1)

    def index(y, m):
        y = np.asarray(y)[:, :L] - 3
        ok = (np.asarray(m)[:, :L] > 0).all(1) & (y >= 0).all(1) & (y < V).all(1) & (np.asarray(y).shape[1] == L)
        return np.where(ok, (np.clip(y, 0, V - 1) * weights).sum(1), -1)

    def fn(prompt, prompt_mask, y, y_mask, y2, y2_mask):
        x = np.asarray(prompt)[:, -1] - 3
        i, j = index(y, y_mask), index(y2, y2_mask)
        p = game.P[x, np.maximum(i, 0), np.maximum(j, 0)]
        p = np.where((i < 0) & (j < 0), 0.5, np.where(i < 0, 0.0, np.where(j < 0, 1.0, p)))
        return p.astype(np.float32)

    return fn


def policy_tables(graphdef, params, game: tg.TokenGame) -> tuple[np.ndarray, float]:
    """Per-context per-prefix log-probs [X, n_prefixes, V] of an lm over the game tokens, and the largest
    probability mass the model puts on non-game tokens at any prefix."""
    seqs = tg.all_sequences(game.V, game.L)
    tables, leak = [], 0.0
    fn = jax.jit(functools.partial(models.lm_logits, graphdef))
    for x in range(game.X):
        tokens = np.concatenate([np.tile([BOS_ID, 3 + x], (len(seqs), 1)), 3 + seqs], 1).astype(np.int32)
        logits = np.asarray(fn(params, tokens, np.ones_like(tokens)), np.float64)
        full = logits[:, 1:1 + game.L] - np.log(np.exp(logits[:, 1:1 + game.L]).sum(-1, keepdims=True))
        leak = max(leak, float(1 - np.exp(full[..., 3:3 + game.V]).sum(-1).min()))
        tables.append(tg.model_table(logits, game.V, game.L, 2, 3 + np.arange(game.V)))
    return np.stack(tables), leak


def run_token_game(config, workdir: str) -> dict:
    """The `token_game` job (see the module docstring)."""
    t0 = time.time()
    task = config.task
    game = tg.lift(task.instance, task.V, task.L, contexts=task.contexts, mapping=task.mapping,
                   mu_scale=task.mu_scale, seed=task.seed, **task.instance_kwargs.to_dict())
    tau = float(task.tau)
    cfg = train_config(config, task_hash(config, ("task",)))
    if cfg.data.vocab_size != 3 + task.V or cfg.data.prompt_len != 2 or cfg.data.response_len != task.L:
        raise ValueError(f"config.train.data: the token game needs vocab_size {3 + task.V}, prompt_len 2, "
                         f"response_len {task.L}")
    if task.contexts > task.V:
        raise ValueError(f"config.task.contexts: at most V = {task.V} prompts (one token each)")
    arrays = {("sft", "train"): _token_arrays(game, task.n_examples, task.seed, True),
              ("sft", "eval"): _token_arrays(game, task.n_examples, task.seed + 1, True)}
    oracle = token_game_oracle(game)
    for i, split in enumerate(("train", "eval")):
        arrays[("prompts", split)] = {k: arrays[("sft", split)][k] for k in ("prompt", "prompt_mask")}
        arrays[("pairs", split)] = _token_pairs(game, oracle, task.n_examples, task.seed + 2 + i)
    with Pipeline(cfg, workdir, data=arrays, host_oracle=oracle) as pipe:
        results = pipe.run()
        stages = pipe.spec.order
        tables = {}  # (stage, key) -> per-prefix log-prob tables of the trained policies
        for name in stages:
            for key in ("policy",) + (("ema",) if pipe.spec.stages[name].algorithm.ema else ()):
                tables[(name, key)] = policy_tables(*pipe.params(name, key), game)
    workdir = pipe.workdir

    # exact evaluation in the game whose reference is the fitted transformer mu_theta
    mu_table, mu_leak = tables[("sft", "policy")]
    mu_theta = np.exp(tg.sequence_logprobs(mu_table, game.V, game.L))
    fitted = dataclasses.replace(game, mu=mu_theta, mu_table=mu_table)
    pi_star = tg.equilibrium(fitted, tau)
    report = {"game": {"instance": task.instance, "V": task.V, "L": task.L, "contexts": task.contexts,
                       "tau": tau, "n_sequences": game.n},
              "sft_fit": {"kl_target_vs_mu_theta": tg.kl(np.log(game.mu), np.log(mu_theta), game.rho),
                          "non_game_token_mass": mu_leak},
              "policies": {}}
    for (name, key), (table, leak) in tables.items():
        st = cfg.stages[name]
        pi = np.exp(tg.sequence_logprobs(table, game.V, game.L))
        entry = {"duality_gap": tg.duality_gap(fitted, tau, pi),
                 "kl_pi_star_vs_pi": tg.kl(np.log(pi_star), np.log(pi), game.rho),
                 "non_game_token_mass": leak}
        if "beta" in st and 0 < st.beta < 1:
            entry["mixture_gap"] = tg.mixture_gap(table, mu_table, st.beta, game.V, game.L, game.rho)
        report["policies"][name + ("*" if key == "ema" else "")] = entry
    dg_mu = report["policies"]["sft"]["duality_gap"]
    for name, entry in report["policies"].items():
        entry["gap_reduction_vs_mu"] = dg_mu / max(entry["duality_gap"], 1e-300)
    # the equilibrium each mixture leads to (exact stationary points of Nash-MD-PG on the full class)
    fixed = {}
    for beta in task.mixture_betas:
        row, pis = {}, {}
        for mix in ("token", "sequence"):
            fp = tg.mixture_fixed_point(fitted, tau, float(beta), mix, damping=task.fixed_point_damping)
            pis[mix] = fp["pi"]
            row[mix] = {"duality_gap": tg.duality_gap(fitted, tau, fp["pi"]), "residual": fp["residual"]}
        row["kl_token_fp_vs_sequence_fp"] = tg.kl(np.log(pis["token"]), np.log(pis["sequence"]), game.rho)
        fixed[str(beta)] = row
    report["mixture_fixed_points"] = fixed
    report["wall_time_s"] = time.time() - t0
    report["stages"] = {k: v.get("eval", {}) for k, v in results.items()}
    report["stack"] = stack.versions()
    distributed.write_json(os.path.join(workdir, "token_game.json"), report)
    lines = ["| policy | duality gap | reduction vs mu | KL(pi*||pi) | token vs sequence mixture KL |",
             "|---|---|---|---|---|"]
    for name, e in report["policies"].items():
        mg = e.get("mixture_gap", {}).get("kl_token_vs_sequence")
        lines.append(f"| {name} | {e['duality_gap']:.3e} | {e['gap_reduction_vs_mu']:.1f}x | "
                     f"{e['kl_pi_star_vs_pi']:.3e} | {'' if mg is None else f'{mg:.2e}'} |")
    distributed.write_text(os.path.join(workdir, "token_game.md"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    logging.info("token game report: %s", os.path.join(workdir, "token_game.json"))
    return report
