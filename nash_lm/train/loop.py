"""The `train` job: validate, then run the config's stages in order, each resumable and skipped once complete.

`run(config, workdir)` (registered in `nash_lm.main.JOBS`):

1. Validation, with nothing written yet: the config (`train.config.validate`), the mesh, batch divisibility by
   the data-parallel size, stage inputs, and every existing stage directory's fingerprint (a workdir holding a
   checkpoint of an incompatible config is refused, naming the differing fields). Any problem is a ValueError,
   which `main` prints as one line with exit code 2.
2. The resolved config goes to `WORKDIR/config.json`.
3. Each stage (`WORKDIR/stages/<name>/`): skipped when `done.json` matches its fingerprint; otherwise it restores
   the latest checkpoint if there is one (exact resume: parameters, optimizer state, RNG and data position),
   compiles its step once (AOT, memory analysis logged), and runs with metrics every `log_every` steps,
   checkpoints every `checkpoint_every` steps (async, keep-N), SIGTERM -> save and return, NaN/Inf -> stop with
   the step named and the last good checkpoint intact. At the end: final checkpoint, params export, evaluation
   (held-out metrics; for Nash-EMA-PG also the averaged policy), `done.json`.
4. `WORKDIR/summary.json`: final metrics per stage, wall time, the resolved config hash and
   `policy_params_sha256` of the last policy stage.

Pretrained starts: `init="hf:/abs/dir"` (an SFT or policy stage) or `ref="hf:/abs/dir"` (a policy stage) reads a
local Llama/Gemma/Qwen2 safetensors checkpoint with `nash_lm.interop.load_pretrained`, straight into the stage's
parameter shardings; everything about it (files, architecture vs `config.model.architecture`, shapes vs
`config.model`, tensor headers, tokenizer) is checked in step 1, and its path and content hash are part of the
stage fingerprint. Gemma and Qwen2 stages run the decoder variants of `nash_lm.interop.variants`.

Several processes (`nash_lm.distributed`, e.g. `launch/local.py`): every process runs this same code on one
global mesh. Each feeds only its own rows of every batch (`distributed.global_batch_from_full`); orbax saves,
restores and exports are collective; reading arrays back (hashes, the host oracle) goes through
`distributed.fetch`; JSON files, metrics and TensorBoard events are written by process 0 only, and moving
directories around is process 0's job, followed by a barrier. A SIGTERM on any process stops all of them after
the same step.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time
import zlib

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from nash_lm import distributed, models, parallel
from nash_lm.data import synthetic
from nash_lm.interop import hf as hf_interop
from nash_lm.interop import variants
from nash_lm.train import checkpoint as ckpt_lib
from nash_lm.train import config as cfg_lib
from nash_lm.train import metrics as metrics_lib
from nash_lm.train import state as state_lib
from nash_lm.train import step as step_lib


class Preempted(Exception):
    """Raised inside a stage after SIGTERM once the current step is checkpointed."""


def _stage_dir(workdir, name):
    return os.path.join(workdir, "stages", name)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    """Process 0 writes (atomically); every process waits until the file is there."""
    distributed.write_json(path, obj)


def _stage_seed(config, name: str) -> int:
    return (int(config.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------------------
# Validation against the workdir (reads only)


def _completed(config, workdir) -> set:
    done = set()
    for name in config.stages.keys():
        path = os.path.join(_stage_dir(workdir, name), "done.json")
        if os.path.exists(path):
            done.add(name)
    return done


def _check_workdir(config, workdir, order) -> None:
    """Every stage directory that exists must have been written by a config with the same fingerprint."""
    needed = []  # inputs before the stages that read them, so the first mismatch reported is the root cause
    for name in order:
        st = config.stages[name]
        for ref in (st.get(f, "") for f in ("init", "ref", "judge")):
            if ref in config.stages and ref not in needed:
                needed.append(ref)
        if name not in needed:
            needed.append(name)
    for name in needed:
        path = os.path.join(_stage_dir(workdir, name), "fingerprint.json")
        if not os.path.exists(path):
            continue
        old = _read_json(path)
        new = cfg_lib.stage_fingerprint(config, name)
        if old != new:
            diff = cfg_lib.fingerprint_diff(old, new)
            raise ValueError(
                f"workdir {workdir}: stage {name!r} holds a checkpoint of an incompatible config "
                f"(differs in {', '.join(diff[:6])}); use a fresh --workdir")


def data_parallel_size(mesh, rules) -> int:
    """Number of shards of the batch dimension under the rules."""
    spec = parallel.batch_sharding(mesh, rules, ndim=1).spec
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def prepare(config, workdir):
    """All checks that need no compilation and write nothing. Returns (mesh, rules, order)."""
    order = cfg_lib.pipeline(config)
    if "mesh" not in config or "rules" not in config:
        raise ValueError("config: missing top-level field 'mesh' or 'rules'")
    try:
        mesh = parallel.make_mesh(config.mesh)
        rules = parallel.validate_rules(cfg_lib.parse_rules(config.rules), mesh)
    except (TypeError, KeyError) as e:
        raise ValueError(f"config.mesh: {e}") from None
    completed = _completed(config, workdir) if os.path.isdir(workdir) else set()
    cfg_lib.validate(config, completed=completed, data_parallel=data_parallel_size(mesh, rules))
    if os.path.isdir(workdir):
        _check_workdir(config, workdir, order)
    return mesh, rules, order


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def abstract_params(model_cfg, kind: str, seed: int, mesh, rules, architecture: str = "llama"):
    """(graphdef, abstract params with shardings, a jitted initialiser creating params already sharded).
    `architecture` 'gemma' / 'qwen2' builds that variant of the 'lm' decoder (`nash_lm.interop.variants`)."""
    if architecture == "llama":
        graphdef, shapes = models.abstract_init(model_cfg, kind)
        shardings = parallel.param_shardings(shapes, mesh, rules)
        initialise = jax.jit(lambda: models.init(model_cfg, kind, seed)[1], out_shardings=shardings)
        return graphdef, ckpt_lib.abstract(shapes, shardings), initialise
    if kind != "lm":
        raise ValueError(f"architecture {architecture!r}: only 'lm' models (not {kind!r}) have this variant")
    graphdef, shapes = variants.build_abstract(model_cfg, architecture)
    shardings = parallel.param_shardings(shapes, mesh, rules)
    return (graphdef, ckpt_lib.abstract(shapes, shardings),
            lambda: variants.init(model_cfg, architecture, seed, shardings=shardings)[1])


def load_pretrained_input(spec: str, model_cfg, shardings):
    """Parameters of a `hf:/dir` stage input (checked by `config.check_hf_input` during validation), placed with
    `shardings`; the same tree as `abstract_params` gives for the configured architecture."""
    path = cfg_lib.hf_path(spec, spec)
    p = hf_interop.load_pretrained(path, config=model_cfg, shardings=shardings)
    logging.info("imported %s from %s", hf_interop.describe(p), path)
    return p.params


def load_export(workdir, name, abstract_tree, key="policy"):
    path = os.path.join(_stage_dir(workdir, name), "export")
    if not os.path.isdir(path):
        raise ValueError(f"missing stage input {name!r}: {path} does not exist")
    return ckpt_lib.load_params(path, {key: abstract_tree})[key]


# ---------------------------------------------------------------------------------------------------------------
# One stage


class Stage:
    """Builds the compiled step, data and state of one stage; `run()` trains it to completion."""

    def __init__(self, config, name, workdir, mesh, rules, peak_flops, writer):
        self.config, self.name, self.workdir, self.mesh, self.rules = config, name, workdir, mesh, rules
        self.st = config.stages[name]
        self.algorithm = self.st.algorithm
        self.dir = _stage_dir(workdir, name)
        self.peak_flops = peak_flops
        self.writer = writer
        self.seed = _stage_seed(config, name)
        self.kind = cfg_lib.produces(self.algorithm)  # 'lm', 'preference' or 'reward'
        self.is_policy = self.algorithm in cfg_lib.POLICY_ALGORITHMS
        self.is_judge = self.algorithm in cfg_lib.JUDGE_ALGORITHMS
        self.model_cfg = cfg_lib.model_config(config, "judge_model" if self.is_judge else "model")
        self.architecture = cfg_lib.model_architecture(config, "judge_model" if self.is_judge else "model")
        self.data_cfg = cfg_lib.data_config(config)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.fingerprint = cfg_lib.stage_fingerprint(config, name)
        self.fingerprint_hash = cfg_lib.fingerprint_hash(self.fingerprint)
        self._eval_fn = None

    # -- inputs -------------------------------------------------------------------------------------------------
    def _build(self):
        st, mesh = self.st, self.mesh
        self.graphdef, self.abstract_policy, initialise = abstract_params(self.model_cfg, self.kind, self.seed,
                                                                           mesh, self.rules, self.architecture)
        self.param_sh = jax.tree.map(lambda a: a.sharding, self.abstract_policy)
        self.tx = state_lib.make_optimizer(st)
        ref = None
        judge_params = None
        self.judge = None
        if self.is_policy:
            ref = self._load_input(st.ref)
            self.judge, judge_params = self._load_judge()
        init_from = st.init or (st.ref if self.is_policy else "")
        if self.is_judge and init_from and cfg_lib.produces(self.config.stages[init_from].algorithm) == "lm":
            self._init_policy = lambda: self._judge_from_lm(init_from, initialise)
        else:
            self._init_policy = (lambda: self._load_input(init_from)) if init_from else initialise
        self.ref, self.judge_params = ref, judge_params
        use_ema = self.algorithm == "nash_ema_pg"
        self.abstract_mut = jax.eval_shape(
            lambda p: state_lib.init_state(p, self.tx, self.seed, ema=use_ema), self.abstract_policy)
        self.mut_sh = state_lib.state_shardings(self.abstract_mut, self.param_sh, self.tx, mesh)
        self.abstract_mut = ckpt_lib.abstract(self.abstract_mut, self.mut_sh)
        self.frozen = (ref, judge_params)
        self.frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        data_kind = "sft" if self.algorithm == "sft" else ("pairs" if self.is_judge else "prompts")
        self.train_data = synthetic.dataset_for(data_kind, self.data_cfg, "train")
        self.eval_data = synthetic.dataset_for(data_kind, self.data_cfg, "eval")
        self.batch_sh = {k: self._batch_sharding(v.ndim) for k, v in self.train_data.items()}

    def _load_input(self, spec):
        """Parameters of a stage input: an earlier stage's export, or a `hf:/dir` checkpoint."""
        if spec.startswith(cfg_lib.HF_PREFIX):
            return load_pretrained_input(spec, self.model_cfg, self.param_sh)
        return load_export(self.workdir, spec, self.abstract_policy)

    def _judge_from_lm(self, name, initialise):
        """Judge parameters whose backbone is the decoder of the 'lm' stage `name` (score head from `initialise`)."""
        _, abstract_lm, _ = abstract_params(self.model_cfg, "lm", 0, self.mesh, self.rules)
        params = initialise()
        params["backbone"] = load_export(self.workdir, name, abstract_lm)
        return params

    def _batch_sharding(self, ndim):
        return parallel.batch_sharding(self.mesh, self.rules, ndim=ndim, batch_size=self.st.batch_size)

    def _load_judge(self):
        spec = self.st.judge
        if spec.startswith("oracle:"):
            return step_lib.Judge("oracle", fn=cfg_lib.resolve_oracle(spec)), None
        if spec.startswith("host_oracle:"):
            return step_lib.Judge("host_oracle", fn=cfg_lib.resolve_oracle(spec)), None
        judge_algo = self.config.stages[spec].algorithm
        judge_cfg = cfg_lib.model_config(self.config, "judge_model")
        graphdef, abstract, _ = abstract_params(judge_cfg, judge_algo, 0, self.mesh, self.rules)
        return step_lib.Judge(judge_algo, graphdef=graphdef), load_export(self.workdir, spec, abstract)

    def _hparams(self):
        st = self.st
        return step_lib.PolicyHParams(
            algorithm=self.algorithm, tau=float(st.tau), beta=float(st.get("beta", 0.0)),
            ema_decay=float(st.get("ema_decay", 0.0)), temperature=float(st.temperature),
            max_new_tokens=int(st.max_new_tokens))

    # -- compilation ----------------------------------------------------------------------------------------------
    def _abstract_batch(self):
        b = self.st.batch_size
        return {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype, sharding=self.batch_sh[k])
                for k, v in self.train_data.items()}

    def _compile(self):
        """AOT-compiles the step(s) with explicit shardings and donation of the mutable state."""
        in_sh = (self.mut_sh, self.frozen_sh, self.batch_sh)
        out_sh = (self.mut_sh, self.replicated)
        args = (self.abstract_mut, ckpt_lib.abstract(self.frozen), self._abstract_batch())
        if self.algorithm == "sft":
            fn = functools.partial(step_lib.sft_step, self.graphdef, self.tx, float(self.st.prompt_loss_weight))
        elif self.is_judge:
            fn = functools.partial(step_lib.judge_step, self.algorithm, self.st.labels, self.graphdef, self.tx)
        elif self.judge.in_jit:
            fn = functools.partial(step_lib.policy_step, self._hparams(), self.graphdef, self.judge, self.tx)
        else:
            return self._compile_halves(args)
        compiled = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=0).lower(*args).compile()
        self._log_memory(compiled)
        return lambda mut, batch: compiled(mut, self.frozen, batch)

    def _compile_halves(self, args):
        """Host-oracle variant: compiled rollout -> oracle on the host -> compiled update (donating the state)."""
        hp = self._hparams()
        rollout = jax.jit(functools.partial(step_lib.rollout, hp, self.graphdef),
                          in_shardings=(self.mut_sh, self.frozen_sh, self.batch_sh)).lower(*args).compile()
        _, abstract_samples = jax.eval_shape(functools.partial(step_lib.rollout, hp, self.graphdef), *args)
        b = self.st.batch_size
        vec_sh = self._batch_sharding(1)
        samples_sh = {k: self._batch_sharding(v.ndim) for k, v in abstract_samples.items()}
        update = jax.jit(
            functools.partial(step_lib.update, hp, self.graphdef, self.tx),
            in_shardings=(self.mut_sh, self.frozen_sh, self.batch_sh, samples_sh, vec_sh, self.replicated),
            out_shardings=(self.mut_sh, self.replicated), donate_argnums=0,
        ).lower(*args, ckpt_lib.abstract(abstract_samples, samples_sh),
                jax.ShapeDtypeStruct((b,), np.float32, sharding=vec_sh),
                jax.ShapeDtypeStruct((2,), np.uint32, sharding=self.replicated)).compile()
        self._log_memory(update)
        oracle = self.judge.fn

        def step(mut, batch):
            rng, samples = rollout(mut, self.frozen, batch)
            host = distributed.fetch({**batch, **samples})  # every process judges the whole global batch
            pref = np.asarray(oracle(host["prompt"], host["prompt_mask"], host["y"], host["y_mask"], host["y2"],
                                     host["y2_mask"]), np.float32)
            return update(mut, self.frozen, batch, samples, distributed.global_batch_from_full(pref, vec_sh), rng)

        return step

    def _log_memory(self, compiled):
        try:
            logging.info("stage %s: compiled step memory analysis: %s", self.name, compiled.memory_analysis())
        except Exception as e:  # some backends do not implement it
            logging.info("stage %s: no memory analysis (%s)", self.name, e)

    # -- FLOPs ----------------------------------------------------------------------------------------------------
    def step_flops(self) -> float:
        """Analytic matmul FLOPs of one step (forward 1x, forward + backward 3x)."""
        m = self.model_cfg
        shape = dict(n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                     head_dim=m.head_dim, d_ff=m.d_ff, vocab_size=m.vocab_size)
        b, p = self.st.batch_size, self.data_cfg.prompt_len
        n = int(self.st.get("max_new_tokens", self.data_cfg.response_len))

        full = functools.partial(metrics_lib.causal_pass_flops, seqs=b, **shape)  # (length, head positions)

        if self.algorithm == "sft":  # teacher-forced logits at the response (and, with the prompt loss, the prompt)
            return 3 * full(p + n, None if float(self.st.get("prompt_loss_weight", 0.0)) else n)
        if self.algorithm == "reward":
            return 3 * 2 * full(p + n, 0)
        if self.algorithm == "preference":  # both orders of (x, y, y') in one pass
            return 3 * 2 * full(p + 2 * n, 0)
        # Sampling (`step.rollout`, one decode loop for y and y'): prompt prefills and per-row decode passes,
        # counted in sequences of the batch; the policy's prefill is shared by its y and y' rows.
        beta = float(self.st.get("beta", 0.0))
        mixed = 2 if 0.0 < beta < 1.0 else 1  # models run per mixture decode step
        prefills, decodes = {"nash_md_pg": (1 + (beta > 0.0), 1 + mixed), "nash_ema_pg": (2, 2), "rlhf": (1, 1),
                             "online_ipo": (1, 2), "ipo_md": (2 * mixed, 2 * mixed)}[self.algorithm]
        sampling = prefills * full(p, 1) + decodes * metrics_lib.lm_forward_flops(**shape, tokens=b * n,
                                                                              context=p + n / 2)
        judge = {"preference": 2 * full(p + 2 * n, 0), "reward": 2 * full(p + n, 0)}.get(
            self.judge.kind, 0.0)
        if self.algorithm == "rlhf":
            judge = full(p + n, 0)
        scored = 2 if self.algorithm in ("online_ipo", "ipo_md") else 1  # sequences through ref fwd + policy fwd/bwd
        return sampling + judge + scored * 4 * full(p + n, n)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, stop_flag) -> dict:
        if distributed.is_primary():
            os.makedirs(self.dir, exist_ok=True)
        _write_json(os.path.join(self.dir, "fingerprint.json"), self.fingerprint)
        self._build()
        st = self.st
        ckpt = ckpt_lib.Checkpointer(os.path.join(self.dir, "checkpoints"), keep=st.keep_checkpoints,
                                     async_save=bool(self.config.async_checkpoints))
        iterator = synthetic.BatchIterator(self.train_data, st.batch_size, self.seed, "train")
        latest = ckpt.latest_step()
        if latest is not None:
            mut, data_state, meta = ckpt.restore(latest, self.abstract_mut)
            if meta.get("fingerprint") != self.fingerprint_hash:
                raise ValueError(f"stage {self.name}: checkpoint {latest} has fingerprint {meta.get('fingerprint')}, "
                                 f"expected {self.fingerprint_hash}")
            iterator.set_state(data_state)
            logging.info("stage %s: resumed from step %d", self.name, latest)
        else:
            policy = self._init_policy()
            mut = jax.jit(lambda p: state_lib.init_state(p, self.tx, self.seed, ema=self.algorithm == "nash_ema_pg"),
                          out_shardings=self.mut_sh)(policy)
        step = latest or 0
        self.writer.truncate(self.name, step)
        meta = {"fingerprint": self.fingerprint_hash, "stage": self.name}
        if step < st.steps:
            train_step = self._compile()
            mut = self._train(train_step, mut, iterator, ckpt, step, meta, stop_flag)
        ckpt.close()
        return self._finish(mut)

    def _train(self, train_step, mut, iterator, ckpt, step, meta, stop_flag):
        from tqdm import tqdm

        st = self.st
        flops = self.step_flops()
        n_dev = self.mesh.size
        seqs = 2 if self.is_judge or self.algorithm not in ("sft", "rlhf") else 1
        tokens_per_step = st.batch_size * seqs * (self.data_cfg.prompt_len
                                                  + int(st.get("max_new_tokens", self.data_cfg.response_len)))
        bar = tqdm(total=st.steps, initial=step, desc=self.name, unit="step", dynamic_ncols=True, leave=False,
                   disable=not distributed.is_primary())
        t_last, steps_since = time.perf_counter(), 0
        while step < st.steps:
            batch = distributed.global_batch_from_full(next(iterator), self.batch_sh)
            mut, metrics = train_step(mut, batch)
            step += 1
            steps_since += 1
            if not bool(metrics["finite"]):
                ckpt.wait()
                last = ckpt.latest_step()
                bar.close()
                raise FloatingPointError(
                    f"stage {self.name}: non-finite loss or gradients at step {step} (loss={float(metrics['loss'])},"
                    f" grad_norm={float(metrics['grad_norm'])}); stopped. Last good checkpoint: "
                    f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}")
            bar.update(1)
            if step % st.log_every == 0 or step == st.steps:
                dt = time.perf_counter() - t_last
                rate = steps_since / dt
                flops_per_s_dev = flops * rate / n_dev
                record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                record.update(tokens_per_s=tokens_per_step * rate, steps_per_s=rate,
                              tflops_per_s_per_device=flops_per_s_dev / 1e12,
                              mfu=flops_per_s_dev / self.peak_flops)
                self.writer.write(self.name, step, record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                logging.info("stage %s step %d: %s", self.name, step,
                             {k: round(v, 5) for k, v in record.items()})
                t_last, steps_since = time.perf_counter(), 0
            if st.eval_every and step % st.eval_every == 0 and step < st.steps:
                self.writer.write(self.name, step, {f"eval/{k}": v for k, v in self.evaluate(mut).items()})
            if step % st.checkpoint_every == 0 or step == st.steps:
                ckpt.save(step, mut, iterator.get_state(), {**meta, "step": step})
            if _agreed(stop_flag()):
                if step % st.checkpoint_every and step != st.steps:
                    ckpt.save(step, mut, iterator.get_state(), {**meta, "step": step}, force=True)
                ckpt.close()
                bar.close()
                logging.warning("stage %s: SIGTERM, saved step %d, exiting", self.name, step)
                raise Preempted(f"stage {self.name} preempted at step {step}")
        bar.close()
        return mut

    # -- evaluation and export ------------------------------------------------------------------------------------
    def evaluate(self, mut) -> dict:
        """Held-out metrics: SFT NLL/accuracy; judge accuracy; policy (and averaged policy) win rate vs mu, KL."""
        st = self.st
        it = synthetic.BatchIterator(self.eval_data, st.batch_size, self.seed, "eval")
        batches = [distributed.global_batch_from_full(next(it), self.batch_sh) for _ in range(st.eval_batches)]
        if self._eval_fn is None:
            self._eval_fn = self._build_eval()
        if not self.is_policy:
            return _mean([self._eval_fn(mut.policy, x) for x in batches])
        out = {}
        for label, params in [("", mut.policy)] + ([("ema_", mut.ema)] if mut.ema is not None else []):
            res = _mean([self._eval_fn(params, x, self._eval_key(i)) for i, x in enumerate(batches)])
            out.update({f"{label}{k}": v for k, v in res.items()})
        return out

    def _eval_key(self, i):
        """The fixed evaluation key of batch i, replicated on the mesh (the same on every process)."""
        key = np.asarray(jax.random.PRNGKey(self.seed + i))
        return distributed.global_batch_from_full(key, self.replicated)

    def _build_eval(self):
        """Evaluation functions, jitted once per stage (fixed keys: evaluation never touches training RNG)."""
        if self.algorithm == "sft":
            return jax.jit(functools.partial(step_lib.eval_sft, self.graphdef))
        if self.is_judge:
            return jax.jit(functools.partial(step_lib.eval_judge, self.algorithm, self.graphdef))
        hp = self._hparams()
        if self.judge.in_jit:
            fn = jax.jit(functools.partial(step_lib.eval_policy, hp, self.graphdef, self.judge))
            return lambda params, batch, key: fn(params, self.ref, self.judge_params, batch, key)
        rollout = jax.jit(functools.partial(step_lib.eval_policy_rollout, hp, self.graphdef))
        metrics = jax.jit(functools.partial(step_lib.eval_policy_metrics, self.graphdef))

        def host_judged(params, batch, key):
            samples = rollout(params, self.ref, batch, key)
            host = distributed.fetch({**batch, **samples})
            win = np.asarray(self.judge.fn(host["prompt"], host["prompt_mask"], host["y"], host["y_mask"],
                                           host["y2"], host["y2_mask"]), np.float32)
            win = distributed.global_batch_from_full(win, self._batch_sharding(1))
            return metrics(params, self.ref, batch, samples, win)

        return host_judged

    def _finish(self, mut) -> dict:
        export = os.path.join(self.dir, "export")
        if distributed.is_primary():  # leftovers of an export cut short by a kill; the final checkpoint is complete
            for path in (export, export + ".partial"):
                if os.path.exists(path):
                    shutil.rmtree(path)
        distributed.barrier(f"{self.name}:export_clean")
        tree = {"policy": mut.policy}
        if mut.ema is not None:
            tree["ema"] = mut.ema
        ckpt_lib.export_params(export + ".partial", tree)  # collective: every process writes its shards
        distributed.barrier(f"{self.name}:exported")
        if distributed.is_primary():
            os.replace(export + ".partial", export)
        distributed.barrier(f"{self.name}:export_renamed")
        evaluation = self.evaluate(mut)
        self.writer.write(self.name, self.st.steps, {"final": True, **{f"eval/{k}": v for k, v in evaluation.items()}})
        distributed.barrier(f"{self.name}:final_metrics")  # every process reads the file process 0 just appended to
        last = {}
        if os.path.exists(self.writer.path):
            with open(self.writer.path) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec.get("stage") == self.name and "loss" in rec:
                        last = rec
        done = {
            "stage": self.name,
            "algorithm": self.algorithm,
            "produces": self.kind,
            "steps": int(mut.step),
            "fingerprint": self.fingerprint_hash,
            "final_metrics": {k: v for k, v in last.items() if k not in ("stage",)},
            "eval": {k: float(v) for k, v in evaluation.items()},
            "policy_params_sha256": ckpt_lib.params_sha256(mut.policy),
        }
        if mut.ema is not None:
            done["ema_params_sha256"] = ckpt_lib.params_sha256(mut.ema)
        _write_json(os.path.join(self.dir, "done.json"), done)
        return done


def _agreed(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a SIGTERM that reached only some processes must stop
    all of them after the same step: the checkpoint saves are collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def _mean(results: list[dict]) -> dict:
    return {k: float(np.mean([float(r[k]) for r in results])) for k in results[0]}


# ---------------------------------------------------------------------------------------------------------------
# The job


def run(config, workdir: str) -> dict:
    """`train` job: runs `config.pipeline`; returns the summary (also written to WORKDIR/summary.json)."""
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    stop = {"flag": False}

    def on_sigterm(signum, frame):
        stop["flag"] = True
        logging.warning("SIGTERM received: the current step will be checkpointed, then the run stops")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    writer = None
    results = {}
    try:
        mesh, rules, order = prepare(config, workdir)  # raises ValueError before anything is written
        if distributed.is_primary():
            os.makedirs(workdir, exist_ok=True)
        _write_json(os.path.join(workdir, "config.json"), cfg_lib.to_jsonable(config))
        peak = float(config.peak_tflops) * 1e12 if config.peak_tflops > 0 else metrics_lib.measure_peak_flops()
        logging.info("peak FLOP/s per device for MFU: %.3g (%s)", peak,
                     "configured" if config.peak_tflops > 0 else "measured")
        writer = metrics_lib.MetricsWriter(workdir)
        with parallel.activate(mesh, rules):
            for name in order:
                done_path = os.path.join(_stage_dir(workdir, name), "done.json")
                if os.path.exists(done_path):
                    logging.info("stage %s: complete, skipped", name)
                    results[name] = _read_json(done_path)
                    continue
                stage = Stage(config, name, workdir, mesh, rules, peak, writer)
                results[name] = stage.run(lambda: stop["flag"])
    except Preempted as e:
        print(f"preempted: {e}; rerun the same command to resume", file=sys.stderr)
        return {"status": "preempted", "message": str(e)}
    finally:
        signal.signal(signal.SIGTERM, previous)
        if writer is not None:
            writer.close()
    policy_stages = [n for n in order if results[n]["produces"] == "lm"]
    summary = {
        "status": "complete",
        "wall_time_s": time.time() - t0,
        "config_hash": cfg_lib.config_hash(config),
        "pipeline": order,
        "stages": results,
        "final_stage": order[-1],
        "final_metrics": results[order[-1]]["final_metrics"],
        "final_eval": results[order[-1]]["eval"],
        "policy_params_sha256": results[policy_stages[-1]]["policy_params_sha256"] if policy_stages else None,
        "peak_flops_per_device": peak,
    }
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
