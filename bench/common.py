"""Shared benchmark helpers: a machine description, JSON-lines output (one record per measurement), and the CPU
accounting of a timed region (own CPU seconds against everybody else's) with the peak RSS, which both sides of
the TRL comparison report. Nothing here imports jax at module level: bench/trl_peer.py runs in the TRL venv."""
from __future__ import annotations

import json
import os
import platform
import resource
import time


def machine() -> dict:
    """What the numbers were measured on: CPU model, core count, memory, load at the start, library versions."""
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_gib": round(mem_gib, 1) if mem_gib else None, "load_avg_1m": os.getloadavg()[0],
            "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
            "n_devices": len(jax.devices()), "jax": jax.__version__, "python": platform.python_version()}


def median_time(fn, repeats: int = 5) -> tuple[float, list[float]]:
    """Median wall seconds of `repeats` calls of fn() (fn must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], times


def write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def proc_stat_s():
    """Machine-wide CPU seconds (user + nice + system) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Own CPU seconds (os.times) vs everybody else's (machine-wide /proc/stat minus own) over a region."""

    def __enter__(self):
        self.load_before = os.getloadavg()[0]
        self.stat0, self.own0 = proc_stat_s(), os.times()
        return self

    def __exit__(self, *exc):
        stat1, own1 = proc_stat_s(), os.times()
        self.own_cpu_s = (own1.user - self.own0.user) + (own1.system - self.own0.system)
        self.foreign_cpu_s = max(0.0, (stat1 - self.stat0) - self.own_cpu_s)
        self.load_after = os.getloadavg()[0]
        return False

    def record(self) -> dict:
        return {"own_cpu_s": round(self.own_cpu_s, 2), "foreign_cpu_s_during_run": round(self.foreign_cpu_s, 2),
                "loadavg_1m_before_after": [round(self.load_before, 2), round(self.load_after, 2)]}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
