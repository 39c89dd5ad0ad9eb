#!/usr/bin/env python
"""Check whether TRL 1.13.0's GeometricMixtureWrapper computes correct mixture logits when
transformers 5.23.0's `generate` runs with the KV cache on (as NashMDTrainer does when
gradient_checkpointing=False).

Tiny random Llama models are built in-process (no hub access). The wrapper is constructed and
called the way `NashMDTrainer._generate_completions` does it, with a GenerationConfig built from the
same keys `OnlineDPOTrainer.__init__` uses. For each generated step we compare the log-probs the
wrapper returned (generate's `output_logits`) with an independent no-cache computation on the full
prefix: log_softmax(c * ref_logits + (1 - c) * policy_logits) at the last position.

Run: venv-trl/bin/python bench/trl_mixture_cache_check.py (the TRL venv of bench/trl_peer.py)
Prints one JSON line.
"""

import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.experimental.nash_md.nash_md_trainer import GeometricMixtureWrapper  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
VOCAB, HIDDEN, LAYERS, HEADS = 64, 32, 2, 4
BATCH, PROMPT_LEN, NEW_TOKENS = 2, 8, 8
MIXTURE_COEF = 0.5


def make_model(seed, big_init=True, vocab=VOCAB, hidden=HIDDEN, ff=64, max_pos=64):
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=max_pos,
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).float().eval()
    # optionally larger random weights than the default init (std 0.02) so the models are far from uniform
    with torch.no_grad():
        for p in (m.parameters() if big_init else []):
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    m.generation_config.pad_token_id = PAD
    m.generation_config.bos_token_id = BOS
    m.generation_config.eos_token_id = EOS
    return m


def trainer_generation_config(use_cache):
    # same keys/values as OnlineDPOTrainer.__init__ (transformers-generate branch) with the peer
    # benchmark's settings: temperature 1.0, top_k 0, top_p 1.0, repetition_penalty 1.0
    return GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, use_cache=use_cache,
        # added for the check only (the trainer leaves these off); they do not change the logits
        return_dict_in_generate=True, output_logits=True, output_scores=True,
    )


def record_cache_use(model, tag, log):
    def hook(module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids")
        log.append({
            "model": tag,
            "cache_id": None if pkv is None else id(pkv),
            "cache_len_before": None if pkv is None else int(pkv.get_seq_length()),
            "input_len": None if ids is None else int(ids.shape[1]),
            "use_cache": kwargs.get("use_cache"),
        })
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def mixture_truth(policy, ref, seqs, prompt_len, n_steps, c):
    out = []
    with torch.no_grad():
        for t in range(n_steps):
            prefix = seqs[:, : prompt_len + t]
            am = torch.ones_like(prefix)
            pl = policy(input_ids=prefix, attention_mask=am, use_cache=False).logits[:, -1].float()
            rl = ref(input_ids=prefix, attention_mask=am, use_cache=False).logits[:, -1].float()
            out.append(torch.log_softmax(c * rl + (1 - c) * pl, dim=-1))
    return out


def run_case(policy, ref, prompts, use_cache, seed, new_tokens=NEW_TOKENS):
    gc = trainer_generation_config(use_cache)
    gc.max_new_tokens = new_tokens
    log = []
    hooks = [record_cache_use(policy, "policy", log), record_cache_use(ref, "ref", log)]
    torch.manual_seed(seed)
    with torch.no_grad():  # as in NashMDTrainer._generate_completions
        wrapper = GeometricMixtureWrapper(
            model=policy, ref_model=ref, generation_config=gc, mixture_coef=MIXTURE_COEF, device=torch.device("cpu")
        )
        out = wrapper.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gc,
        )
    for h in hooks:
        h.remove()
    seqs = out.sequences
    n = len(out.logits)
    truth = mixture_truth(policy, ref, seqs, prompts.shape[1], n, MIXTURE_COEF)
    diffs = [float((out.logits[t].float() - truth[t]).abs().max()) for t in range(n)]
    score_diffs = [float((out.scores[t].float() - truth[t]).abs().max()) for t in range(n)]
    # first three forward calls show how the cache object is shared between the two models
    same_obj = None
    if use_cache:
        ids = {e["cache_id"] for e in log}
        same_obj = (None not in ids) and len(ids) == 1
    return {
        "steps": n,
        "max_abs_diff_per_step": [round(d, 6) for d in diffs],
        "max_abs_diff_scores_per_step": [round(d, 6) for d in score_diffs],
        "same_cache_object_for_policy_and_ref": same_obj,
        "first_forward_calls": log[:6],
    }


def main():
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    policy = make_model(0)
    ref_diff = make_model(1)          # different random weights
    ref_copy = copy.deepcopy(policy)  # like the benchmark: ref = copy of the initial policy
    policy_small = make_model(0, big_init=False)  # transformers' default init (std 0.02), as in the benchmark
    ref_small = copy.deepcopy(policy_small)
    g = torch.Generator().manual_seed(123)
    prompts = torch.randint(4, VOCAB, (BATCH, PROMPT_LEN), generator=g)
    prompts[:, 0] = BOS

    res = {
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "mixture_coef": MIXTURE_COEF, "batch": BATCH, "prompt_len": PROMPT_LEN, "max_new_tokens": NEW_TOKENS,
    }
    cases = (
        ("ref_different_weights", policy, ref_diff),
        ("ref_deepcopy_of_policy", policy, ref_copy),
        ("default_init_ref_deepcopy_of_policy", policy_small, ref_small),
    )
    for name, pol, ref in cases:
        for use_cache in (True, False):
            res[f"{name}__use_cache_{use_cache}"] = run_case(pol, ref, prompts, use_cache, seed=7)
    # the peer benchmark's own shapes (vocab 512, d 128, d_ff 512, prompt 16, 32 new tokens, default init,
    # ref = deep copy of the policy), batch 2
    pol_b = make_model(0, big_init=False, vocab=512, hidden=128, ff=512, max_pos=128)
    ref_b = copy.deepcopy(pol_b)
    prompts_b = torch.randint(4, 512, (BATCH, 16), generator=g)
    prompts_b[:, 0] = BOS
    for use_cache in (True, False):
        res[f"bench_shapes_ref_deepcopy__use_cache_{use_cache}"] = run_case(
            pol_b, ref_b, prompts_b, use_cache, seed=7, new_tokens=32)
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
