"""The launchers install the stack they promise. No TPU VM is reachable from here, so `launch/tpu_pod.sh setup`
runs with `gcloud` replaced by a stub on PATH that records each call (and for `scp` delivers the tarball into a
sandbox home standing for the worker); the recorded remote command is then run in that sandbox, with `uv`, and
the worker's `python3`, `pip` and `curl` replaced by stubs, exactly as ssh would run it on each worker.

Checked against what the stack is (setup.py's `tpu` extra is libtpu, constraints/py312.txt pins jax 0.12.1 and
libtpu 0.0.52; a TPU VM image's own python3 is 3.10): the worker's venv is made on Python 3.12 and the
checkout is installed with the `tpu` extra pinned to that tested set, and the setup ends by importing jax from
the venv; where no Python >= 3.12 can be had (uv cannot be installed, uv finds and downloads none, the venv's
interpreter is older), the setup stops with one line on stderr naming the cause. The GPU templates name extras
and constraints files that exist. What the stubs stand for was run for real once by hand (uv 0.13.9 on a
Python 3.12.1 installed jax 0.12.1, jaxlib 0.12.1, flax 0.12.12 and libtpu 0.0.52 into the venv; the commit that
added this file says so).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["launch", "scripts", "constraints", "setup.py"]  # what the setup needs of the checkout


def _stub(path, body):
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, 0o755)


def _setup_py_extras():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
    extras = names["EXTRAS"]
    return {ast.literal_eval(k): v for k, v in zip(extras.keys, extras.values)}, names


@pytest.fixture
def recorded(tmp_path):
    """Runs `launch/tpu_pod.sh setup` from a git copy of this tree against a recording gcloud stub; returns the
    sandbox (worker home, stub dir, the calls)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in SHIPPED:
        src = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, repo / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "-q", "-m", "x"], check=True)

    home, stubs = tmp_path / "worker", tmp_path / "stubs"
    home.mkdir()
    stubs.mkdir()
    calls = tmp_path / "gcloud_calls.jsonl"
    _stub(stubs / "gcloud", f"""#!{sys.executable}
import json, shutil, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], {str(home)!r} + "/" + args[5].split(":", 1)[1])
""")
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="zone-a")
    for k in ("EXTRAS", "EXTRA_PIP", "PYTHON_VERSION", "REPO_DIR"):
        env.pop(k, None)
    r = subprocess.run(["bash", str(repo / "launch" / "tpu_pod.sh"), "setup"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {"home": home, "stubs": stubs, "calls": [json.loads(l) for l in open(calls)], "tmp": tmp_path}


def _remote_command(calls):
    ssh = [c for c in calls if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 1 and "--worker=all" in ssh[0], calls
    (cmd,) = [a[len("--command="):] for a in ssh[0] if a.startswith("--command=")]
    return cmd


def _worker_stubs(sb, *, uv_python=None, uv_fails=False, pip_ok=False):
    """The worker's tools. python3 is the image's 3.10 (no pip unless pip_ok: `pip install --user uv` then puts
    the uv stub in ~/.local/bin); curl cannot reach uv's installer. uv, when present, records its calls; its
    `venv` makes a venv whose python runs `uv_python` (or fails as uv does when it can neither find nor download
    the Python asked for)."""
    d = sb["tmp"] / "worker_bin"
    d.mkdir()
    log = sb["tmp"] / "uv_calls.jsonl"
    uv_body = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "venv":
    if {uv_fails!r}:
        sys.exit("error: No interpreter found for Python " + args[args.index("--python") + 1])
    os.makedirs(os.path.join(args[-1], "bin"), exist_ok=True)
    exe = os.path.join(args[-1], "bin", "python")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\\nexec " + {str(uv_python)!r} + ' "$@"\\n')
    os.chmod(exe, 0o755)
"""
    uv_dir = sb["home"] / ".local" / "bin"
    _stub(d / "python3", f"""#!/bin/sh
if [ "$1 $2 $3" = "-m pip install" ] && [ {int(pip_ok)} = 1 ]; then
  mkdir -p {uv_dir} && cp {d}/uv.later {uv_dir}/uv && exit 0
fi
[ "$1 $2" = "-m pip" ] && {{ echo "/usr/bin/python3: No module named pip" >&2; exit 1; }}
echo "Python 3.10.12"; exit 1
""")
    _stub(d / "curl", "#!/bin/sh\necho 'curl: (6) Could not resolve host' >&2\nexit 6\n")
    _stub(d / "uv.later", uv_body)
    return d, log


def _run_remote(sb, cmd, bindir):
    env = {"HOME": str(sb["home"]), "PATH": f"{bindir}:/usr/bin:/bin", "TMPDIR": str(sb["tmp"]),
           "JAX_PLATFORMS": "cpu", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)


def test_tpu_pod_setup_builds_a_python312_venv_with_the_tpu_extra_of_the_tested_set(recorded):
    calls = recorded["calls"]
    scp = [c for c in calls if c[:4] == ["compute", "tpus", "tpu-vm", "scp"]]
    assert len(scp) == 1 and "--worker=all" in scp[0] and "--zone=zone-a" in scp[0]
    cmd = _remote_command(calls)
    assert "0.10.2" not in cmd and "python3 -m venv" not in cmd

    # What the stack is, read independently of the launcher: the shipped tested set and setup.py's tpu extra.
    with tarfile.open(recorded["home"] / "nash-lm.tar.gz") as t:
        pins = t.extractfile("constraints/py312.txt").read().decode().split()
    assert {"jax==0.12.1", "jaxlib==0.12.1", "flax==0.12.12", "libtpu==0.0.52"} <= set(pins)
    extras, names = _setup_py_extras()
    assert any("libtpu" in ast.literal_eval(e) and "3.12" in ast.literal_eval(e) for e in names["TPU"].elts)

    # The worker: python3 is 3.10 without pip; uv is there; uv's Python 3.12 is the interpreter running here.
    if sys.version_info < (3, 12):
        pytest.skip("the recorded venv's python is this interpreter, which must be >= 3.12")
    uv = recorded["stubs"].parent / "uv_on_path"
    uv.mkdir()
    bindir, uv_log = _worker_stubs(recorded, uv_python=sys.executable)
    shutil.copy(bindir / "uv.later", uv / "uv")
    r = _run_remote(recorded, cmd, f"{uv}:{bindir}")
    assert r.returncode == 0, r.stderr
    uv_calls = [json.loads(l) for l in open(uv_log)]
    venv, install = uv_calls
    assert venv[0] == "venv" and venv[venv.index("--python") + 1] == "3.12" and venv[-1] == ".venv"
    assert install[:4] == ["pip", "install", "--python", ".venv/bin/python"]
    assert install[install.index("-c") + 1] == "constraints/py312.txt"
    assert install[install.index("-e") + 1] == ".[tpu]"
    checkout = recorded["home"] / "nash-lm"
    assert (checkout / "launch" / "setup_venv.sh").exists() and (checkout / ".venv" / "bin" / "python").exists()
    import jax

    # the venv's jax, then the device line the setup prints on each worker (process 0 of 1 on the CPU here)
    assert f"Python {sys.version.split()[0]}, jax {jax.__version__}" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "0 1 1 cpu"


@pytest.mark.parametrize("case", ["no_uv", "uv_finds_no_python", "venv_python_too_old"])
def test_tpu_pod_setup_without_a_supported_python_stops_with_one_line(recorded, case):
    cmd = _remote_command(recorded["calls"])
    if case == "no_uv":  # pip missing, uv's installer unreachable
        bindir, _ = _worker_stubs(recorded)
        want = "uv could not be installed"
    elif case == "uv_finds_no_python":  # uv installed by pip, but no Python 3.12 on the machine or to download
        bindir, _ = _worker_stubs(recorded, uv_fails=True, pip_ok=True)
        want = "no Python 3.12"
    else:  # uv hands back a venv on an older interpreter
        old = shutil.which("python3.11") or "/usr/bin/python3.11"
        if not os.path.exists(old):
            pytest.skip("no Python 3.11 to stand for an old interpreter")
        bindir, _ = _worker_stubs(recorded, uv_python=old, pip_ok=True)
        want = "is Python 3.11, not 3.12"
    r = _run_remote(recorded, cmd, str(bindir))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup_venv.sh on ") and want in lines[0], r.stderr
    assert not (recorded["home"] / "nash-lm" / ".venv" / "lib").exists()  # nothing was installed


def test_setup_refuses_a_python_older_than_the_stack(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "setup_venv.sh")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON_VERSION="3.10", TMPDIR=str(tmp_path)), timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "PYTHON_VERSION=3.10: nash-lm needs Python 3.12 or newer" in r.stderr and not os.listdir(tmp_path)


def test_gpu_templates_install_extras_and_constraints_that_exist():
    extras, _ = _setup_py_extras()
    for name in ("gpu_slurm.sbatch", "gke_gpu_jobset.yaml"):
        text = open(os.path.join(ROOT, "launch", name)).read()
        assert "0.10.2" not in text and "cuda12" not in text, name
        installs = re.findall(r"pip install -c (\S+) -e '\.\[(\w+)\]'", text) + [
            ("constraints/py312.txt", m) for m in re.findall(r"EXTRAS=(\w+) .*setup_venv\.sh", text)]
        assert installs, name
        for constraints, extra in installs:
            assert extra == "cuda" and extra in extras, (name, extra)
            assert os.path.exists(os.path.join(ROOT, constraints)), (name, constraints)
