"""nash-lm vs TRL's NashMDTrainer (trl 1.13.0) on the identical workload, back to back in one session.

    .venv/bin/python bench/compare_trl.py [--runs 5] [--trl-python TRL_VENV/bin/python]
        [--peer-dir PEER_DIR] [--trl-defaults] [--steps 128]
        [--out bench/results/compare_trl.jsonl]

Alternates one peer run and one nash-lm run, `--runs` times, so both sides see the same machine. Each peer run
goes through the peer's own `bench.sh 1` (it waits until the machine is >= 90% idle over 3 s, runs
`run_trl_nashmd.py`, and keeps the run only when the CPU time used by other processes during training is < 10%
of the run's own; it retries otherwise). bench.sh writes next to itself and the peer directory is read-only, so
the directory is copied to a scratch directory first (the files are not changed). Each nash-lm run
(`bench/trl_workload.py`, a fresh process: imports, build and compilation excluded from wall_s as the peer
excludes its build) passes the same gate: the same idle wait before it and the same 10% foreign-CPU rule after
it, with retries. Both processes get the same environment.

Prints every run's headline and a summary: medians of the clean runs of each side and the ratio of nash-lm's
median prompts/s to the peer's. Appends every run and the summary to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "compare_trl.jsonl")
PEER_DIR = os.path.join(os.path.dirname(ROOT), "shared", "peers", "trl_nashmd")
if not os.path.isdir(PEER_DIR):  # a checkout outside /work (e.g. a snapshot): the shared location
    PEER_DIR = "/work/shared/peers/trl_nashmd"


def idle_pct(window: float = 3.0) -> float:
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]

    t1, i1 = read()
    time.sleep(window)
    t2, i2 = read()
    return 100.0 * (i2 - i1) / max(1, t2 - t1)


def wait_idle(wait_max: float) -> float:
    waited, idle = 0.0, idle_pct()
    while idle < 90 and waited < wait_max:
        waited += 3
        idle = idle_pct()
    return idle


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output:\n" + text[-2000:])


def clean(rec: dict) -> bool:
    return rec["foreign_cpu_s_during_run"] < 0.10 * rec["own_cpu_s"]


def run_peer(peer_dir: str, trl_python: str, args_extra: list[str], env: dict) -> dict:
    """One clean peer run through bench.sh (it retries contended runs itself)."""
    p = subprocess.run(["bash", "bench.sh", "1", *args_extra], cwd=peer_dir, env={**env, "TRL_PYTHON": trl_python},
                       capture_output=True, text=True)
    sys.stderr.write(p.stderr[-1000:])
    try:
        rec = last_json(p.stdout)
        rec["clean"] = True
    except ValueError:  # bench.sh printed no clean line: take its last attempt, marked unclean
        with open(os.path.join(peer_dir, "results_all.jsonl")) as f:
            rec = json.loads(f.read().strip().splitlines()[-1])
        rec["clean"] = False
    return rec


def run_ours(steps: int, env: dict, wait_max: float, max_attempts: int, extra: list[str]) -> dict:
    for attempt in range(1, max_attempts + 1):
        idle = wait_idle(wait_max)
        p = subprocess.run([sys.executable, os.path.join(HERE, "trl_workload.py"), "--steps", str(steps),
                            "--out", "", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        rec = last_json(p.stdout)
        rec["clean"] = clean(rec)
        print(f"[compare] nash-lm attempt {attempt} (idle before {idle:.0f}%) clean={int(rec['clean'])}",
              file=sys.stderr)
        if rec["clean"]:
            break
    return rec


def headline(rec: dict) -> dict:
    keys = ("prompts_per_s", "wall_s", "median_step_s", "first_step_s", "gen_tokens_per_s_actual",
            "gen_tokens_per_s_nominal", "peak_rss_mib", "own_cpu_s", "foreign_cpu_s_during_run", "compile_s",
            "build_s", "train_loss", "gen_tokens_actual", "clean")
    return {k: rec.get(k) for k in keys}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--trl-python", default="/work/venv-trl/bin/python")
    ap.add_argument("--peer-dir", default=PEER_DIR)
    ap.add_argument("--trl-defaults", action="store_true", help="peer with TRL's default gradient checkpointing")
    ap.add_argument("--wait-max", type=float, default=180.0)
    ap.add_argument("--max-attempts", type=int, default=6)
    ap.add_argument("--ours-args", default="", help="extra arguments for bench/trl_workload.py")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="trl_peer_")
    peer_dir = os.path.join(scratch, "trl_nashmd")
    shutil.copytree(args.peer_dir, peer_dir)
    for root, dirs, files in os.walk(peer_dir):  # the source is read-only; bench.sh appends beside itself
        os.chmod(root, 0o755)
        for fn in files:
            os.chmod(os.path.join(root, fn), 0o644)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" or "device_count" not in v}
    env.update(WAIT_MAX=str(int(args.wait_max)), MAX_ATTEMPTS=str(args.max_attempts))
    peer_args = (["--trl-defaults"] if args.trl_defaults else []) + (
        ["--steps", str(args.steps)] if args.steps != 128 else [])
    session = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runs = {"peer": [], "nash_lm": []}

    def log(side, rec):
        runs[side].append(rec)
        h = headline(rec)
        print(json.dumps({"side": side, **h}))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({"session": session, "side": side, "record": rec}) + "\n")

    for i in range(args.runs):
        log("peer", run_peer(peer_dir, args.trl_python, peer_args, env))
        log("nash_lm", run_ours(args.steps, env, args.wait_max, args.max_attempts, args.ours_args.split()))

    def med(side, key):
        vals = [r[key] for r in runs[side] if r["clean"]] or [r[key] for r in runs[side]]
        return statistics.median(vals)

    summary = {"session": session, "summary": True, "runs_each": args.runs,
               "clean": {s: sum(r["clean"] for r in v) for s, v in runs.items()},
               "peer_config": runs["peer"][0].get("config"),
               "peer_prompts_per_s_median": med("peer", "prompts_per_s"),
               "nash_lm_prompts_per_s_median": med("nash_lm", "prompts_per_s"),
               "peer_prompts_per_s_runs": [r["prompts_per_s"] for r in runs["peer"]],
               "nash_lm_prompts_per_s_runs": [r["prompts_per_s"] for r in runs["nash_lm"]],
               "peer_median_step_s": med("peer", "median_step_s"),
               "nash_lm_median_step_s": med("nash_lm", "median_step_s"),
               "peer_gen_tokens_per_s_actual": med("peer", "gen_tokens_per_s_actual"),
               "nash_lm_gen_tokens_per_s_actual": med("nash_lm", "gen_tokens_per_s_actual"),
               "peer_peak_rss_mib": med("peer", "peak_rss_mib"),
               "nash_lm_peak_rss_mib": med("nash_lm", "peak_rss_mib"),
               "nash_lm_compile_s": med("nash_lm", "compile_s"),
               "machine": runs["nash_lm"][0].get("machine"), "peer_versions": runs["peer"][0].get("versions"),
               "nash_lm_versions": runs["nash_lm"][0].get("versions")}
    summary["ratio_prompts_per_s"] = summary["nash_lm_prompts_per_s_median"] / summary["peer_prompts_per_s_median"]
    summary["target_ratio_min"] = 10.0
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
