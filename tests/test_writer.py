"""The one writer of a job's files (`nash_lm.distributed.write_*`): whole files, atomically, from process 0 only.

A real write failure (the kernel refusing to grow a file past RLIMIT_FSIZE: EFBIG, as ENOSPC would on a full
disk) leaves the previous file byte for byte and no temporary file; a process other than 0 writes nothing; the
forms round-trip through their readers (json, numpy, PNG); the jobs' reports, caches, figures and metrics go
through it (the games job's files, with `open`, `savefig`, `np.save*` and `json.dump` to a file nowhere in the
package outside the writer). Multi-process behaviour (process 0 writes, every process takes the same cache
branch) is in tests/test_distributed.py.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nash_lm import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_temporaries(d):
    return not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    distributed.write_text(str(path), "old report\n")
    # A child process whose file-size limit is 1000 bytes: the kernel refuses the write (EFBIG).
    code = f"""
import resource, signal, sys
sys.path.insert(0, {ROOT!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from nash_lm import distributed
try:
    distributed.write_text({str(path)!r}, "x" * 100_000)
except OSError as e:
    print("OSError", e.errno)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    import errno

    assert r.stdout.split() == ["OSError", str(errno.EFBIG)], r.stderr[-2000:]
    assert path.read_text() == "old report\n" and _no_temporaries(tmp_path)


def test_an_error_inside_the_content_keeps_the_old_file(tmp_path):
    path = tmp_path / "cache.bin"
    distributed.write_bytes(str(path), b"v1")

    def fill(f):
        f.write(b"half of v2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        distributed.write_file(str(path), fill)
    assert path.read_bytes() == b"v1" and _no_temporaries(tmp_path)


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    distributed.write_text(str(tmp_path / "a.txt"), "x")
    distributed.write_npz(str(tmp_path / "b.npz"), {"x": np.arange(2)})
    distributed.append_line(str(tmp_path / "metrics.jsonl"), "{}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    distributed.write_figure(str(tmp_path / "c.png"), fig)
    assert os.listdir(tmp_path) == [] and not plt.fignum_exists(fig.number)  # closed on every process


def test_forms_round_trip(tmp_path):
    distributed.write_json(str(tmp_path / "s.json"), {"b": 1, "a": [1.5, "é"]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1.5, "é"], "b": 1}
    rows = [{"k": i, "t": "ü"} for i in range(3)]
    distributed.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()] == rows
    arrays = {"x": np.arange(6, dtype=np.int32).reshape(2, 3), "key": np.asarray("abc")}
    distributed.write_npz(str(tmp_path / "c.npz"), arrays)
    with np.load(tmp_path / "c.npz") as f:
        assert f["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and f["x"].dtype == np.int32 and str(f["key"]) == "abc"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    distributed.write_figure(str(tmp_path / "f.png"), fig, dpi=50)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("a", "b\n"):
        distributed.append_line(str(tmp_path / "log.jsonl"), line)
    assert (tmp_path / "log.jsonl").read_text() == "a\nb\n"
    assert _no_temporaries(tmp_path)


def test_games_job_writes_through_the_writer(tmp_path, monkeypatch):
    """Every file of a small games job comes from the writer: counted by wrapping `_atomic_write`."""
    sys.path.insert(0, ROOT)
    from configs import games as games_config
    from nash_lm.games import report

    written = []
    real = distributed._atomic_write
    monkeypatch.setattr(distributed, "_atomic_write", lambda path, fill: (written.append(path), real(path, fill)))
    import ml_collections

    config = games_config.get_config()
    config.steps, config.log_every = 20, 10
    config.instances = ml_collections.ConfigDict({"rps": config.instances.rps})
    config.algorithms = ml_collections.ConfigDict({"nash_md": {}, "omd": {"eta": 0.05}})
    report.run(config, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(tmp_path))
    assert {"metrics.jsonl", "summary.json", "report.md"} <= set(os.listdir(tmp_path))


def test_no_plain_writes_outside_the_writer():
    """The package's files are written only by nash_lm/distributed.py (checkpoints: orbax; TensorBoard event
    files: tensorboardX; ArrayRecord data files: their own writer; exports and conversions: their modules)."""
    allowed = {"nash_lm/distributed.py", "nash_lm/export.py", "nash_lm/interop/hf.py", "nash_lm/interop/gguf.py"}
    pattern = re.compile(r"open\([^)]*[\"'](w|wb|a|ab|x|xb)[\"']|\.savefig\(|np\.save|json\.dump\(|"
                         r"\.write_text\(|\.write_bytes\(")
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "nash_lm")):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            if not name.endswith(".py") or rel in allowed:
                continue
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                if pattern.search(line) and "distributed." not in line:
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
