"""The exact benchmark: Nash learning vs RLHF on enumerated token games (issue 25; nash_lm.tasks.exact_benchmark).

    python -m nash_lm.main --config=configs/exact_benchmark.py --workdir=runs/exact_benchmark

`small` (V = 4, L = 3: 64 sequences, 2 prompts): every preference structure, every algorithm of the tabular
registry plus the language-model Nash-MD-PG with the token-level mixture, the beta curve, RLHF's sweep of c, the
stationary points of both mixtures; tau in {0.1, 0.3}; 3 seeds. `large` (V = 4, L = 5: 1,024 sequences, 1 prompt):
the persona and Bradley-Terry contrasts, tau = 0.1, 3 seeds. V = 8, L = 4 (4,096 sequences:
`--config.sizes.large.V=8 --config.sizes.large.L=4`) also runs, at ~8 minutes of a loaded 2-core CPU per cell.
Seeds vary the game instance (mu, persona orders, scores, random P) and RLHF's sampled pairs; the exact algorithms
are deterministic given the instance.
Writes DIR/cells/*.json as it goes (rerun to resume), DIR/exact_benchmark.json, report.md, summary.json, figures,
and copies under `results_dir` (JSON gzipped, report, summary) and `figures_dir` (figures).
"""
import ml_collections

BETAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "exact_benchmark"
    c.results_dir = "bench/results"  # the JSON (gzipped), report and summary are copied here; '' = no copy
    c.figures_dir = "docs/figures"  # the figures are copied here as exact_*.png; '' = no copy
    c.personas = 5
    c.persona_scale = 2.0  # persona_bt: P_k = sigmoid(scale (s_k(y) - s_k(y'))), s_k ~ N(0, 1)
    c.bt_scale = 1.0  # bradley_terry: scores ~ N(0, bt_scale^2)
    c.mu_scale = 1.0  # the reference's per-prefix logits ~ mu_scale N(0, 1)
    c.store_P_max = 27  # P stored beside its definition when there are at most this many sequences
    c.cycle_sample = 40  # responses per prompt over whose triples the cycle rate is counted
    c.exclude = ()  # registry algorithms left out of the grid
    c.beta_curve = ml_collections.ConfigDict(dict(algorithms=("nash_md_pg", "nash_md_pg_token"), betas=BETAS))
    c.rlhf = ml_collections.ConfigDict(dict(c_over_tau=(1.0, 2.0, 4.0, 8.0), n_pairs=4000, l2=1.0))
    c.fixed_point = ml_collections.ConfigDict(dict(damping=0.2, max_iter=50_000))
    # Hyper-parameters of the registry algorithms (others keep their registry defaults) and of nash_md_pg_token.
    c.hyper = ml_collections.ConfigDict(dict(
        omd=dict(eta=0.5),
        inpo=dict(eta_inv=2.0),
        extragradient=dict(eta=1.0),
        optimistic=dict(eta=1.0),
        nash_md_const=dict(eta=1.0),
        nash_md_pg=dict(lr=2.0),
        online_ipo=dict(lr=0.2),
        ipo_md=dict(lr=0.2),
        nash_md_pg_token=dict(lr=1.0),
    ))
    c.sizes = ml_collections.ConfigDict()
    c.sizes.small = ml_collections.ConfigDict(dict(
        V=4, L=3, contexts=2, steps=3000, taus=(0.1, 0.3), seeds=(0, 1, 2),
        structures=("persona_orders", "persona_bt", "bradley_terry", "rps", "dice", "random"),
        algorithms=(), betas=(), mixture_fixed_points=True))
    c.sizes.large = ml_collections.ConfigDict(dict(
        V=4, L=5, contexts=1, steps=500, taus=(0.1,), seeds=(0, 1, 2),
        structures=("persona_orders", "bradley_terry"),
        algorithms=("nash_md", "extragradient", "nash_md_pg_token"), betas=(0.0, 0.125, 0.5),
        mixture_fixed_points=False))
    return c
