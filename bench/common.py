"""Shared benchmark helpers: a machine description and JSON-lines output (one record per measurement)."""
from __future__ import annotations

import json
import os
import platform
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
