"""The TRL side of the nash-lm vs TRL comparison: Hugging Face TRL's `NashMDTrainer` on the benchmark workload.

    venv-trl/bin/python bench/trl_peer.py [--steps 128] [--trl-defaults] [--workload '{"batch": 8, ...}']

trl 1.13.0 is the last release that ships `trl.experimental.nash_md` (1.14.0 removed it). TRL needs PyTorch,
so it runs in a venv of its own, apart from nash-lm's JAX one (torch first, then trl with torch pinned again so
pip keeps it; trl 1.13.0 imports `requests` without declaring it):

    python3 -m venv venv-trl
    venv-trl/bin/pip install torch==2.13.0
    venv-trl/bin/pip install trl==1.13.0 requests torch==2.13.0

Everything is built here with random weights, offline (no hub, no telemetry): the policy a `LlamaForCausalLM`,
the reward model a `LlamaForSequenceClassification` with one label (same trunk, the next seed), the reference
the trainer's own copy of the initial policy, a word-level tokenizer whose word `t<i>` is id i (0..3: pad, BOS,
EOS, unk), and the prompts BOS + `prompt_len - 1` ids drawn with `random.Random(seed).randrange(4, vocab)`,
prompt after prompt, exactly as `bench/nashmd_bench.make_prompts` draws them. The numbers are WORKLOAD below, the
defaults of `bench.nashmd_bench.Workload` (tests/test_bench_smoke.py checks they agree; `--workload` overrides
any of them, and bench/compare_trl.py passes nash-lm's own). The trainer runs in f32 (`bf16=False`), with
temperature 1, no warmup, AdamW with linear decay, `missing_eos_penalty=None`, and `gradient_checkpointing=False`
(the policy samples with its KV cache; TRL's default `True`, with `--trl-defaults`, samples without any cache).

Timed: `trainer.train()` only (`wall_s`); building the models, data and trainer is `build_s`. Step boundaries
come from a `TrainerCallback`; completion tokens and EOS rows are counted where the trainer turns its two samples
into masked batches, and the time spent generating, judging and computing log-probabilities is measured around
the trainer's methods for those (each calls TRL's own method unchanged). CPU accounting and peak RSS as on the
nash-lm side (`bench/common.py`). Prints one JSON line: the fields that bench/trl_workload.py prints.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CpuMeter, peak_rss_mib  # noqa: E402

# The workload: bench.nashmd_bench.Workload's defaults (the fields TRL has a use for).
WORKLOAD = {"vocab": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_ff": 512,
            "max_pos": 128, "tie_embeddings": False, "prompt_len": 16, "n_prompts": 256, "new_tokens": 32,
            "batch": 8, "steps": 128, "mixture_coef": 0.5, "kl_coef": 0.1, "temperature": 1.0, "lr": 1e-5,
            "grad_clip": 1.0, "seed": 0}
PAD, BOS, EOS, UNK = 0, 1, 2, 3
TORCH_THREADS = 2  # the benchmark host's cores; XLA's CPU client on the nash-lm side uses one thread per core
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def prompt_ids(w: dict) -> list[list[int]]:
    """BOS + prompt_len - 1 ids per prompt, drawn as bench/nashmd_bench.make_prompts draws them."""
    rng = random.Random(w["seed"])
    return [[BOS] + [rng.randrange(4, w["vocab"]) for _ in range(w["prompt_len"] - 1)] for _ in range(w["n_prompts"])]


def tokenizer(w: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": UNK, **{f"t{i}": i for i in range(4, w["vocab"])}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", padding_side="left")


def networks(w: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    shape = dict(vocab_size=w["vocab"], hidden_size=w["d_model"], intermediate_size=w["d_ff"],
                 num_hidden_layers=w["n_layers"], num_attention_heads=w["n_heads"],
                 num_key_value_heads=w["n_kv_heads"], max_position_embeddings=w["max_pos"],
                 tie_word_embeddings=w["tie_embeddings"], pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(w["seed"])
    policy = LlamaForCausalLM(LlamaConfig(**shape)).float()
    torch.manual_seed(w["seed"] + 1)
    judge = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **shape)).float()
    for key, value in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
        setattr(policy.generation_config, key, value)
    return policy, judge


def run(w: dict, trl_defaults: bool) -> dict:
    for key, value in OFFLINE.items():  # before transformers and trl are imported
        os.environ.setdefault(key, value)
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl.experimental.nash_md import NashMDConfig, NashMDTrainer

    torch.set_num_threads(TORCH_THREADS)
    tally = {"generate_s": 0.0, "judge_s": 0.0, "logprobs_s": 0.0, "tokens_y": 0, "tokens_y2": 0, "eos_y": 0,
             "eos_y2": 0, "rows": 0, "prompt_lens": set(), "prompts_seen": set()}

    def timed(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tally[name] += time.perf_counter() - t
        return call

    class Counted(NashMDTrainer):
        """TRL's trainer, its methods wrapped for timing and counting only."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._generate_completions = timed("generate_s", self._generate_completions)
            self._compute_rewards = timed("judge_s", self._compute_rewards)
            self._compute_logprobs = timed("logprobs_s", self._compute_logprobs)

        def _process_completions(self, model_output, mixture_output, prompts):
            ours, mixed = super()._process_completions(model_output, mixture_output, prompts)
            n = prompts["input_ids"].shape[1]
            tally["prompt_lens"].add(int(n))
            tally["prompts_seen"].update(map(tuple, prompts["input_ids"].tolist()))
            for key, data in (("y", ours), ("y2", mixed)):
                tally[f"tokens_{key}"] += int(data["attention_mask"][:, n:].sum())
                tally[f"eos_{key}"] += int((data["input_ids"][:, n:] == EOS).any(dim=1).sum())
            tally["rows"] += int(ours["input_ids"].shape[0])
            return ours, mixed

    marks = []

    class Steps(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    t0 = time.perf_counter()
    tok = tokenizer(w)
    # the trainer tokenizes the text and puts BOS in front: the ids are prompt_ids(w)
    texts = [" ".join(f"t{i}" for i in ids[1:]) for ids in prompt_ids(w)]
    policy, judge = networks(w)
    args = NashMDConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_peer_"), per_device_train_batch_size=w["batch"],
        gradient_accumulation_steps=1, max_steps=w["steps"], learning_rate=w["lr"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=w["grad_clip"], beta=w["kl_coef"],
        mixture_coef=w["mixture_coef"], max_new_tokens=w["new_tokens"],
        max_length=w["prompt_len"] + w["new_tokens"], temperature=w["temperature"], missing_eos_penalty=None,
        bf16=False, fp16=False, gradient_checkpointing=trl_defaults, use_cpu=True, report_to="none",
        logging_steps=w["steps"], save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=w["seed"], data_seed=w["seed"])
    trainer = Counted(model=policy, ref_model=None, reward_funcs=judge, args=args,
                      train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok)
    trainer.add_callback(Steps())
    build_s = time.perf_counter() - t0

    with CpuMeter() as cpu:
        t1 = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - t1
    if not tally["prompts_seen"] <= set(map(tuple, prompt_ids(w))):  # the trainer's token ids are the workload's
        raise RuntimeError(f"the trainer's prompts ({sorted(tally['prompt_lens'])} tokens) are not the workload's "
                           f"ids (BOS + {w['prompt_len'] - 1} drawn ids)")
    steps = trainer.state.global_step
    prompts = steps * w["batch"]
    times = [b - a for a, b in zip(marks, marks[1:])]
    srt = sorted(times)
    steady = times[1:] or times
    gen = tally["tokens_y"] + tally["tokens_y2"]
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    logged = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
    return {
        "impl": "trl.experimental.nash_md.NashMDTrainer",
        "config": ("trl-defaults(gradient_checkpointing=True)" if trl_defaults
                   else "bench(gradient_checkpointing=False)"),
        "steps": steps, "batch": w["batch"], "prompt_len": w["prompt_len"], "new_tokens": w["new_tokens"],
        "wall_s": round(wall, 3), "build_s": round(build_s, 3),
        "prompts_per_s": round(prompts / wall, 3),
        "gen_tokens_per_s_nominal": round(prompts * 2 * w["new_tokens"] / wall, 1),
        "gen_tokens_per_s_actual": round(gen / wall, 1),
        "first_step_s": round(times[0], 4), "median_step_s": round(srt[len(srt) // 2], 5),
        "max_step_s": round(srt[-1], 4),
        "steady_prompts_per_s_excl_first_step": round(len(steady) * w["batch"] / sum(steady), 3),
        "gen_tokens_actual": gen, "gen_tokens_nominal": prompts * 2 * w["new_tokens"],
        "eos_rate_policy": round(tally["eos_y"] / max(1, tally["rows"]), 4),
        "eos_rate_mixture": round(tally["eos_y2"] / max(1, tally["rows"]), 4),
        "time_breakdown_s": {k: round(tally[k], 3) for k in ("generate_s", "judge_s", "logprobs_s")},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "params": {"policy": n_params(policy), "ref": n_params(trainer.ref_model), "reward": n_params(judge)},
        "train_loss": round(float(out.training_loss), 6),
        "last_logged": {k: round(v, 6) if isinstance(v, float) else v for k, v in logged.items()},
        **cpu.record(),
        "step_times_s": [round(x, 4) for x in times],
        "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(),
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {WORKLOAD['steps']})")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="TRL's default gradient_checkpointing=True (then no KV cache in either sample)")
    ap.add_argument("--workload", default="{}", help="JSON object overriding WORKLOAD's fields")
    args = ap.parse_args(argv)
    w = dict(WORKLOAD)
    given = json.loads(args.workload)
    unknown = sorted(set(given) - set(w))
    if unknown:
        ap.error(f"--workload: {unknown} are not workload fields ({sorted(w)})")
    w.update(given)
    if args.steps is not None:
        w["steps"] = args.steps
    rec = run(w, args.trl_defaults)
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
