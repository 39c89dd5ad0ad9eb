"""Smoke passes of the Nash-MD-PG benchmarks (bench/trl_workload.py, bench/mfu.py, bench/length_scaling.py,
bench/compare_trl.py) on a tiny model: they run end to end, print the peer's JSON fields, and their FLOP count is
the training loop's. No timing is asserted (CI machines are shared); the real runs are in BENCHMARKS.md."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import compare_trl  # noqa: E402
import length_scaling  # noqa: E402
import mfu  # noqa: E402
import nashmd_bench as nb  # noqa: E402
import trl_peer  # noqa: E402
import trl_workload  # noqa: E402

PEER_FIELDS = ("prompts_per_s", "gen_tokens_per_s_actual", "gen_tokens_per_s_nominal", "wall_s", "build_s",
               "first_step_s", "median_step_s", "peak_rss_mib", "own_cpu_s", "foreign_cpu_s_during_run",
               "eos_rate_policy", "eos_rate_mixture", "gen_tokens_actual", "gen_tokens_nominal", "step_times_s")


def test_trl_workload_smoke(capsys):
    rec = trl_workload.main(["--smoke", "--out", ""])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompts_per_s"] == rec["prompts_per_s"] > 0
    for k in PEER_FIELDS + ("compile_s",):
        assert k in rec, k
    w = nb.SMOKE
    assert rec["steps"] == len(rec["step_times_s"]) == w.steps
    assert rec["gen_tokens_nominal"] == w.steps * w.batch * 2 * w.new_tokens
    assert 0 < rec["gen_tokens_actual"] <= rec["gen_tokens_nominal"]


def test_peer_workload_shapes():
    """The default workload is the peer's: 656,000 policy parameters, prompts drawn as the peer draws them."""
    import random

    from nash_lm.models import ModelConfig

    w = nb.Workload()
    cfg = w.model_config()
    assert isinstance(cfg, ModelConfig) and cfg.num_params("lm") == 656_000
    assert (w.vocab, w.d_model, w.n_layers, w.n_heads, w.d_ff, w.max_pos, w.tie_embeddings) == (
        512, 128, 2, 4, 512, 128, False)
    assert (w.prompt_len, w.n_prompts, w.new_tokens, w.batch, w.steps) == (16, 256, 32, 8, 128)
    assert (w.mixture_coef, w.kl_coef, w.temperature, w.lr, w.dtype) == (0.5, 0.1, 1.0, 1e-5, "float32")
    prompts = nb.make_prompts(w)
    rng = random.Random(0)
    first = [rng.randrange(4, 512) for _ in range(15)]
    assert prompts.shape == (256, 16) and prompts[0, 0] == 1 and list(prompts[0, 1:]) == first
    order = nb.batch_order(w, 64)
    assert sorted(int(i) for b in order[:32] for i in b) == list(range(256))  # one epoch = every prompt once


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr (sub-jaxprs included, a scan's body times its length)."""
    import math

    import jax

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            total += 2 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    total += times * _dot_flops(sub)
    return total


def test_phase_flops_match_training_loop():
    """The analytic count against the matmuls the model actually runs, enumerated from its jaxpr: a forward over
    [B, L] with the LM head at h positions (full L x L attention in the program: context = L), and its backward
    (twice the forward's matmuls, so a policy update is 3 forwards and the reference's log-probs a 4th)."""
    import jax
    import jax.numpy as jnp

    from nash_lm import models
    from nash_lm.train import metrics as metrics_lib

    nb.phase_flops(mfu.BIG)  # asserts equality with nash_lm.train.algorithms.step_flops inside
    w = nb.Workload(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_pos=32, prompt_len=4,
                    new_tokens=5, batch=2)  # grouped-query attention, two layers
    cfg = w.model_config()
    shape = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                 head_dim=cfg.head_dim, d_ff=cfg.d_ff, vocab_size=cfg.vocab_size)
    gd, params = models.init(cfg, "lm", 0)
    B, L, h = 3, 10, 4
    tokens, mask = jnp.ones((B, L), jnp.int32), jnp.ones((B, L), bool)
    fwd = lambda p: models.lm_logits(gd, p, tokens, mask, outputs=slice(L - h, L))
    counted_fwd = _dot_flops(jax.make_jaxpr(fwd)(params).jaxpr)
    counted_bwd = _dot_flops(jax.make_jaxpr(jax.grad(lambda p: fwd(p).sum()))(params).jaxpr)
    assert counted_fwd == metrics_lib.lm_forward_flops(**shape, tokens=B * L, context=L, head_tokens=B * h)
    assert counted_bwd == 3 * counted_fwd
    # the update phase: 4 causal forwards over prompt + response (a position attends to its prefix: mean
    # (1 + ... + L) / L), the LM head at the response positions
    f = nb.phase_flops(w)
    L, n = w.prompt_len + w.new_tokens, w.new_tokens
    one = metrics_lib.lm_forward_flops(**shape, tokens=w.batch * L, context=sum(range(1, L + 1)) / L,
                                       head_tokens=w.batch * n)
    assert f["update"] == pytest.approx(4 * one, rel=1e-12)


def test_mfu_smoke():
    rec = mfu.main(["--smoke", "--repeats", "1", "--out", ""])
    for part in ("update", "sampling", "step"):
        assert rec[part]["mfu"] > 0, part
    assert rec["sampling"]["tokens_per_s"] > 0 and rec["sampling"]["mixture_over_plain"] > 0
    assert rec["peak_flops"] > 0


def test_length_scaling_smoke():
    summary = length_scaling.main(["--smoke", "--out", ""])
    assert summary["lengths"] == [2, 4]
    assert summary["nash_lm"]["loglog_slope_fit"] == summary["nash_lm"]["loglog_slope_fit"]  # not NaN
    assert "peer" not in summary


def test_trl_peer_runs_the_workload_of_the_nash_lm_side():
    """bench/trl_peer.py (TRL's side; it runs in the TRL venv) holds the same numbers as nashmd_bench.Workload and
    draws the same prompt ids as nashmd_bench.make_prompts, by its own code."""
    import dataclasses

    w = nb.Workload()
    ours = dataclasses.asdict(w)
    assert {k: ours[k] for k in trl_peer.WORKLOAD} == trl_peer.WORKLOAD
    assert trl_peer.prompt_ids(trl_peer.WORKLOAD) == nb.make_prompts(w).tolist()
    small = {**trl_peer.WORKLOAD, "seed": 3, "prompt_len": 5, "n_prompts": 7, "vocab": 40}
    assert trl_peer.prompt_ids(small) == nb.make_prompts(
        dataclasses.replace(w, seed=3, prompt_len=5, n_prompts=7, vocab=40)).tolist()


def test_compare_helpers():
    assert compare_trl.last_json('noise\n{"a": 1}\n') == {"a": 1}
    assert compare_trl.clean({"foreign_cpu_s_during_run": 0.5, "own_cpu_s": 10.0})
    assert not compare_trl.clean({"foreign_cpu_s_during_run": 2.0, "own_cpu_s": 10.0})
    g = length_scaling.growth([{"new_tokens": n, "median_step_s": 0.01 * n * n} for n in (32, 64, 128)])
    assert g["loglog_slope_fit"] == pytest.approx(2.0)


def test_decode_rules_flag_and_roofline():
    """`--decode-rules training` reaches the step (PolicyHParams.decode_rules None); bench/roofline.py estimates a
    step from an aot_step record (the recorded 1B v5e:4x4 compile) with positive, summing parts."""
    import json
    import roofline

    rec = trl_workload.main(["--smoke", "--decode-rules", "training", "--out", ""])
    assert rec["decode_rules"] == "training" and rec["wall_s"] > 0
    assert nb.Workload(decode_rules="training").hparams().decode_rules is None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                        "aot_table.jsonl")
    first = json.loads(open(path).readline())
    e = roofline.estimate(first)
    assert e["fits"] and min(e["t_decode_s"], e["t_rest_s"], e["t_ici_s"]) > 0
    assert abs(e["step_s"] - (e["t_decode_s"] + e["t_rest_s"] + e["t_ici_s"])) < 0.01
