#!/usr/bin/env python3
"""Local multi-process launcher: N processes of one command on this machine, joined by `jax.distributed`.

    python launch/local.py --num_processes=2 --devices_per_process=1 --timeout=600 --logdir=runs/logs -- \
        python -m nash_lm.main --config=configs/tiny.py --workdir=runs/tiny2

Each process gets NASH_LM_COORDINATOR=127.0.0.1:<free port> (picked with portpicker), NASH_LM_NUM_PROCESSES,
NASH_LM_PROCESS_ID, JAX_PLATFORMS=cpu (unless --platform is given) and
XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>, and runs under coreutils `timeout`
(a CPU peer that never connects would otherwise abort with SIGABRT only after the coordinator's timeout).
Output goes to LOGDIR/process_<i>.log (and process 0's is echoed). Exit code: 0 when every process exits 0,
otherwise the first non-zero exit code (124 = timed out); the others are then killed.
This is what `tests/test_distributed.py` runs, and it mirrors what the pod and SLURM scripts do per host.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time


def free_port() -> int:
    import portpicker

    return portpicker.pick_unused_port()


def _kill(proc) -> None:
    """SIGKILL to the process group of one launched `timeout` (its own session): timeout and its child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def launch(command: list[str], *, num_processes: int, devices_per_process: int = 1, timeout: int = 600,
           logdir: str | None = None, platform: str = "cpu", env: dict | None = None, echo: bool = True) -> int:
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: must be at least 1")
    if not command:
        raise ValueError("no command given (put it after --)")
    if shutil.which("timeout") is None:
        raise RuntimeError("coreutils `timeout` is required")
    logdir = os.path.abspath(logdir or "launch_logs")
    os.makedirs(logdir, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for i in range(num_processes):
        penv = dict(os.environ if env is None else env)
        penv.update(NASH_LM_COORDINATOR=f"127.0.0.1:{port}", NASH_LM_NUM_PROCESSES=str(num_processes),
                    NASH_LM_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
        if platform == "cpu":
            penv["JAX_PLATFORMS"] = "cpu"
            flags = [f for f in penv.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            penv["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        log = open(os.path.join(logdir, f"process_{i}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(["timeout", "--kill-after=10", str(timeout), *command], env=penv,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    code = 0
    try:
        pending = set(range(num_processes))
        while pending:
            for i in sorted(pending):
                rc = procs[i].poll()
                if rc is None:
                    continue
                pending.discard(i)
                if rc != 0 and code == 0:
                    code = rc
                    print(f"launch/local.py: process {i} exited with {rc}; stopping the others "
                          f"(log: {logdir}/process_{i}.log)", file=sys.stderr)
                    for j in pending:  # SIGKILL: a SIGTERM'd peer would try a collective checkpoint and hang
                        _kill(procs[j])
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for log in logs:
            log.close()
    if echo:
        with open(os.path.join(logdir, "process_0.log")) as f:
            sys.stdout.write(f.read()[-4000:])
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per process")
    ap.add_argument("--logdir", default="launch_logs")
    ap.add_argument("--platform", default="cpu", help="cpu (fake devices) or gpu/tpu (real local devices)")
    args = ap.parse_args(own)
    try:
        return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                      timeout=args.timeout, logdir=args.logdir, platform=args.platform)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
