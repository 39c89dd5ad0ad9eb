"""Shared machinery of the Nash-MD-PG benchmarks (bench/trl_workload.py, bench/mfu.py, bench/length_scaling.py).

Nothing here re-implements the step: the whole step is `nash_lm.train.step.policy_step` (its three parts
`rollout`, `score`, `update`, composed exactly as `policy_step` composes them) inside one `jax.jit`, plus a few
on-device counters (kept tokens and EOS rows of y and y') that the peer's JSON also reports. The phases
(policy sample, mixture sample, judge, update) can also be compiled one by one, for the time breakdown, from the
same library functions (`step._sample`, `step._mixture`, `step.score`, `step.update`).

The optimizer is `nash_lm.train.state.make_optimizer` on a `nash_lm.train.config.stage('nash_md_pg', ...)`
config, and the analytic FLOPs are `nash_lm.train.algorithms.step_flops` (one forward = 1x, forward + backward =
3x; `nash_lm.train.metrics.lm_forward_flops` per pass), split here into the same phases.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nash_lm import models, sampling
from nash_lm.data.synthetic import BOS_ID, EOS_ID, PAD_ID
from nash_lm.models import ModelConfig
from nash_lm.train import algorithms
from nash_lm.train import config as cfg_lib
from nash_lm.train import metrics as metrics_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib

from common import CpuMeter, peak_rss_mib, proc_stat_s  # noqa: F401  (the benchmarks use nb.CpuMeter etc.)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes and hyper-parameters of one Nash-MD-PG benchmark workload (defaults: the TRL peer's workload)."""

    vocab: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 512
    max_pos: int = 128
    tie_embeddings: bool = False
    prompt_len: int = 16  # BOS + 15 random ids in [4, vocab)
    n_prompts: int = 256
    new_tokens: int = 32
    batch: int = 8
    steps: int = 128
    mixture_coef: float = 0.5  # paper's beta (weight of the reference in the geometric mixture)
    kl_coef: float = 0.1  # paper's tau (TRL's `beta`)
    temperature: float = 1.0
    lr: float = 1e-5
    grad_clip: float = 1.0  # transformers.TrainingArguments.max_grad_norm default, which the TRL peer runs with
    judge: str = "reward"  # 'reward': sigmoid(r(y) - r(y')) as TRL's reward-model path; or 'preference'
    seed: int = 0
    dtype: str = "float32"
    decode_rules: str = "default"  # the sampler's layout: 'default' (parallel.DEFAULT_DECODE_RULES) or 'training'

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, max_len=self.max_pos,
                           tie_embeddings=self.tie_embeddings, dtype=self.dtype).validate()

    def stage(self):
        return cfg_lib.stage("nash_md_pg", steps=self.steps, batch_size=self.batch, lr=self.lr,
                             lr_schedule="linear", warmup_steps=0, weight_decay=0.0, grad_clip=self.grad_clip,
                             tau=self.kl_coef, beta=self.mixture_coef, temperature=self.temperature,
                             max_new_tokens=self.new_tokens)

    def hparams(self) -> step_lib.PolicyHParams:
        return step_lib.PolicyHParams(algorithm="nash_md_pg", tau=self.kl_coef, beta=self.mixture_coef,
                                      temperature=self.temperature, max_new_tokens=self.new_tokens,
                                      decode_rules=None if self.decode_rules == "training" else
                                      step_lib.PolicyHParams.decode_rules)


# A tiny workload for smoke runs (CI): one layer, a few tokens, so that compilation stays short.
SMOKE = Workload(vocab=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_pos=32, prompt_len=4,
                 n_prompts=16, new_tokens=4, batch=2, steps=3)


def make_prompts(w: Workload) -> np.ndarray:
    """[n_prompts, prompt_len] int32: BOS + random ids in [4, vocab), drawn exactly as the peer draws them
    (`random.Random(seed)`, `randrange(4, VOCAB)` per token, prompt by prompt)."""
    rng = random.Random(w.seed)
    rows = [[BOS_ID] + [rng.randrange(4, w.vocab) for _ in range(w.prompt_len - 1)] for _ in range(w.n_prompts)]
    return np.asarray(rows, np.int32)


def batch_order(w: Workload, steps: int) -> list[np.ndarray]:
    """Prompt indices of each step: epochs over the prompts, reshuffled each epoch (drop the last partial batch)."""
    rs = np.random.RandomState(w.seed)
    out, per_epoch = [], w.n_prompts // w.batch
    while len(out) < steps:
        perm = rs.permutation(w.n_prompts)
        out.extend(perm[i * w.batch:(i + 1) * w.batch] for i in range(per_epoch))
    return out[:steps]


@dataclasses.dataclass
class Built:
    w: Workload
    graphdef: Any
    judge: step_lib.Judge
    tx: Any
    mut: state_lib.TrainState
    frozen: step_lib.Frozen
    prompts: np.ndarray
    n_params: dict


def build(w: Workload) -> Built:
    """Policy (seed), reference = copy of the initial policy, judge model (seed + 1), AdamW, the train state."""
    cfg = w.model_config()
    g, policy = models.init(cfg, "lm", seed=w.seed)
    ref = jax.tree.map(jnp.copy, policy)
    jg, jparams = models.init(cfg, w.judge, seed=w.seed + 1)
    tx = state_lib.make_optimizer(w.stage())
    mut = jax.jit(lambda p: state_lib.init_state(p, tx, w.seed))(policy)
    jax.block_until_ready((mut, ref, jparams))
    return Built(w, g, step_lib.Judge(w.judge, graphdef=jg), tx, mut, step_lib.Frozen(ref=ref, judge=jparams),
                 make_prompts(w),
                 {"policy": models.num_params(policy), "ref": models.num_params(ref),
                  w.judge: models.num_params(jparams)})


def make_batch(b: Built, idx) -> dict:
    x = b.prompts[np.asarray(idx)]
    return {"prompt": jnp.asarray(x), "prompt_mask": jnp.ones(x.shape, jnp.int32)}


# ---------------------------------------------------------------------------------------------------------------
# The whole step (one jit) and its phases (separate jits, for the breakdown)


def counted_step(hp, graphdef, judge, tx, mut, frozen, batch):
    """`step_lib.policy_step` (rollout -> score -> update, the same three calls) + kept-token/EOS counters."""
    rng, samples = step_lib.rollout(hp, graphdef, mut, frozen, batch)
    judged = step_lib.score(hp, judge, frozen, batch, samples)
    new, metrics = step_lib.update(hp, graphdef, tx, mut, frozen, batch, samples, judged, rng)
    for name in ("y", "y2"):
        mask = samples[f"{name}_mask"]
        metrics[f"{name}_tokens"] = jnp.sum(mask).astype(jnp.int32)
        metrics[f"{name}_eos_rows"] = jnp.sum(
            jnp.any((samples[name] == EOS_ID) & (mask > 0), axis=-1)).astype(jnp.int32)
    return new, metrics


def compile_step(b: Built):
    """AOT-compiled whole step with the mutable state donated; returns (fn(mut, batch), compile seconds)."""
    fn = functools.partial(counted_step, b.w.hparams(), b.graphdef, b.judge, b.tx)
    batch = make_batch(b, np.arange(b.w.batch))
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(b.mut, b.frozen, batch).compile()
    dt = time.perf_counter() - t0
    return (lambda mut, batch: compiled(mut, b.frozen, batch)), dt


def compile_phases(b: Built) -> dict:
    """Each phase of the step as its own compiled function of (mut, batch) (no donation, so it can be re-run):
    'sample_pair' (y ~ pi and y' ~ the token-level mixture from one decode loop: the step's sampling,
    `step_lib.rollout`), 'judge', 'update' (reference log-probs, policy forward + backward, AdamW), and for the
    mixture / plain ratio each sample on its own: 'sample_policy' (y ~ pi), 'sample_mixture' (y' ~ mixture),
    'sample_plain_ref' (a plain sample from the reference). Returns {name: (fn, compile_s)}; 'update' and 'judge'
    take the samples produced by 'sample_pair'."""
    hp, g, w = b.w.hparams(), b.graphdef, b.w
    ref = b.frozen.ref
    key = jax.random.PRNGKey(1)
    kw = dict(max_new_tokens=hp.max_new_tokens, eos_id=EOS_ID, pad_id=PAD_ID, temperature=hp.temperature)

    def sample_pair(mut, batch):
        return step_lib.rollout(hp, g, mut, b.frozen, batch)[1]

    def sample_policy(mut, batch):
        return sampling.sample(g, mut.policy, batch["prompt"], batch["prompt_mask"], key, **kw).tokens

    def sample_plain_ref(mut, batch):  # plain sampling from one model, for the mixture / plain ratio
        return sampling.sample(g, ref, batch["prompt"], batch["prompt_mask"], key, **kw).tokens

    def sample_mixture(mut, batch):
        return sampling.sample(g, mut.policy, batch["prompt"], batch["prompt_mask"], key, mix_params=ref,
                               beta=hp.beta, **kw).tokens

    def judge(batch, samples):
        return step_lib.score(hp, b.judge, b.frozen, batch, samples)

    def update(mut, batch, samples, judged):
        return step_lib.update(hp, g, b.tx, mut, b.frozen, batch, samples, judged, mut.rng)

    batch = make_batch(b, np.arange(w.batch))
    out = {}
    for name, f in (("sample_pair", sample_pair), ("sample_policy", sample_policy),
                    ("sample_plain_ref", sample_plain_ref), ("sample_mixture", sample_mixture)):
        t0 = time.perf_counter()
        c = jax.jit(f).lower(b.mut, batch).compile()
        out[name] = (c, time.perf_counter() - t0)
    samples = out["sample_pair"][0](b.mut, batch)
    t0 = time.perf_counter()
    cj = jax.jit(judge).lower(batch, samples).compile()
    out["judge"] = (cj, time.perf_counter() - t0)
    judged = cj(batch, samples)
    t0 = time.perf_counter()
    cu = jax.jit(update).lower(b.mut, batch, samples, judged).compile()
    out["update"] = (cu, time.perf_counter() - t0)
    out["_inputs"] = (batch, samples, judged)
    return out


def time_phases(b: Built, phases: dict, repeats: int) -> dict:
    """Median seconds of each phase over `repeats` interleaved rounds (after one warm-up round)."""
    batch, samples, judged = phases["_inputs"]
    calls = {
        "sample_pair": lambda: phases["sample_pair"][0](b.mut, batch),
        "sample_policy": lambda: phases["sample_policy"][0](b.mut, batch),
        "sample_plain_ref": lambda: phases["sample_plain_ref"][0](b.mut, batch),
        "sample_mixture": lambda: phases["sample_mixture"][0](b.mut, batch),
        "judge": lambda: phases["judge"][0](batch, samples),
        "update": lambda: phases["update"][0](b.mut, batch, samples, judged),
    }
    runs = {k: [] for k in calls}
    for r in range(repeats + 1):
        for k, f in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            if r:
                runs[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "runs_s": [round(x, 5) for x in v]} for k, v in runs.items()}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def phase_flops(w: Workload) -> dict:
    """Analytic matmul FLOPs per step, by phase; 'step' equals `nash_lm.train.algorithms.step_flops`."""
    m = w.model_config()
    shape = dict(n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                 head_dim=m.head_dim, d_ff=m.d_ff, vocab_size=m.vocab_size)
    bsz, p, n = w.batch, w.prompt_len, w.new_tokens

    full = functools.partial(metrics_lib.causal_pass_flops, seqs=bsz, **shape)  # (length, head positions)

    decode = metrics_lib.lm_forward_flops(**shape, tokens=bsz * n, context=p + n / 2)
    judge = {"preference": 2 * full(p + 2 * n, 0), "reward": 2 * full(p + n, 0)}[w.judge]
    beta = w.mixture_coef
    mixed = 2 if 0.0 < beta < 1.0 else 1
    out = {"sample_policy": full(p, 1) + decode, "sample_mixture": mixed * (full(p, 1) + decode),
           # one loop: the policy's prefill shared by y and y', the policy on y and y' rows, mu on the y' rows
           "sample_pair": (1 + (beta > 0.0)) * full(p, 1) + (1 + mixed) * decode,
           "judge": judge, "update": 4 * full(p + n, n),
           "update_policy_fwd_bwd": 3 * full(p + n, n), "update_ref_fwd": full(p + n, n)}
    out["sampling"] = out["sample_pair"]
    out["step"] = out["sampling"] + judge + out["update"]
    # Cross-check against the training loop's own count (the number reported as MFU during training).
    loop_count = algorithms.step_flops(algorithms.get("nash_md_pg"), w.stage(), m, p, n, w.judge)
    assert abs(loop_count - out["step"]) <= 1e-9 * out["step"], (loop_count, out["step"])
    return out


def matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5, dtype=jnp.float32) -> dict:
    """f32 matmul rate measured now, in this process (`nash_lm.train.metrics.measure_peak_flops`, best of
    `repeats` per size); the peak is the best size."""
    rates = {n: metrics_lib.measure_peak_flops(dtype, n=n, repeats=repeats) for n in sizes}
    return {"peak_flops": max(rates.values()), "by_size": {str(n): r for n, r in rates.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Machine and process accounting (the same quantities as the peer's JSON)


def commit() -> str:
    """The nash-lm commit measured: COMMIT file of a `git archive` snapshot, else `git rev-parse` of the tree."""
    import subprocess

    import nash_lm

    root = os.path.dirname(os.path.dirname(os.path.abspath(nash_lm.__file__)))
    try:
        with open(os.path.join(root, "COMMIT")) as f:
            return f.read().strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def versions() -> dict:
    import platform

    import flax
    import jaxlib

    return {"commit": commit(), "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "python": platform.python_version(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "n_devices": len(jax.devices()),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}


def train(b: Built, step_fn, steps: int):
    """Runs `steps` steps of the compiled step from b.mut (donated); returns (mut, per-step seconds, metrics
    list). Each step is synchronised (block on its metrics) so that step boundaries are real, like the peer's
    step callback; the batch is put on the device inside the timed loop, like the peer's data loader."""
    order = batch_order(b.w, steps)
    mut, times, mets = b.mut, [], []
    t_prev = time.perf_counter()
    for s in range(steps):
        mut, metrics = step_fn(mut, make_batch(b, order[s]))
        jax.block_until_ready(metrics)
        t = time.perf_counter()
        times.append(t - t_prev)
        t_prev = t
        mets.append(metrics)
    b.mut = None  # donated
    return mut, times, jax.device_get(mets)
