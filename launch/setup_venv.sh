#!/usr/bin/env bash
# Builds this checkout's venv on the tested Python and installs nash-lm with one accelerator's extra, pinned to
# the tested set (constraints/py<major><minor>.txt). `launch/tpu_pod.sh setup` runs it on every TPU VM worker;
# run it by hand for the venv that launch/gpu_slurm.sbatch uses (EXTRAS=cuda, VENV on the shared filesystem).
#
#   EXTRAS=tpu launch/setup_venv.sh        # jax 0.12.1 + libtpu (the `tpu` extra of setup.py)
#   EXTRAS=cuda launch/setup_venv.sh       # jax 0.12.1 + its CUDA 13 plugin (the `cuda` extra; driver >= 580)
#
# Settings by environment: EXTRAS (comma-separated extras of setup.py, default tpu; empty for the core only),
# EXTRA_PIP (more pip specs, space-separated), PYTHON_VERSION (default 3.12, the Python of the tested set),
# VENV (default .venv in the checkout), UV (path to a uv binary).
#
# The Python: a TPU VM runtime image (v2-alpha-tpuv6e, v2-alpha-tpuv5, v2-alpha-tpuv5-lite, tpu-ubuntu2204-base)
# is Ubuntu 22.04, whose system python3 is 3.10, older than the stack needs (jax stopped publishing for Python
# 3.11 after 0.10.2; the tested set is Python 3.12 with jax 0.12.1). So the venv is made by uv, which uses a Python $PYTHON_VERSION found on the
# machine or else downloads its own build of it; uv itself comes from the package registry
# (`python3 -m pip install --user uv`) or, where the image has no pip, from uv's installer script. uv also
# installs the packages. When no Python >= 3.12 can be had, the script stops with one line saying why.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="${EXTRAS-tpu}"
EXTRA_PIP="${EXTRA_PIP:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
VENV="${VENV:-.venv}"

die() {  # one line on stderr, then exit 1; the tools' own output stays in $LOGFILE
  echo "setup_venv.sh on $(hostname): $*" >&2
  exit 1
}

[[ "$PYTHON_VERSION" =~ ^3\.([0-9]+)$ ]] && (( BASH_REMATCH[1] >= 12 )) ||
  die "PYTHON_VERSION=$PYTHON_VERSION: nash-lm needs Python 3.12 or newer (a major.minor such as 3.12)"
[[ -z "${UV:-}" || -x "${UV:-}" ]] || die "UV=$UV: not an executable file"
LOGFILE="$(mktemp "${TMPDIR:-/tmp}/nash-lm-setup-XXXXXX.log")"

# uv: given, on PATH, in ~/.local/bin from an earlier setup, or installed now.
UV="${UV:-$(command -v uv || true)}"
if [[ -z "$UV" && -x "$HOME/.local/bin/uv" ]]; then
  UV="$HOME/.local/bin/uv"
fi
if [[ -z "$UV" ]]; then
  if python3 -m pip install -q --user uv >>"$LOGFILE" 2>&1 ||
     { command -v curl >/dev/null && curl -LsSf https://astral.sh/uv/install.sh 2>>"$LOGFILE" | sh >>"$LOGFILE" 2>&1; }; then
    UV="$HOME/.local/bin/uv"
  fi
  [[ -n "$UV" && -x "$UV" ]] ||
    die "Python $PYTHON_VERSION comes through uv, and uv could not be installed (pip and uv's installer script both failed; log: $LOGFILE): install uv or set UV=/path/to/uv"
fi

# The interpreter: a Python $PYTHON_VERSION on this machine, or uv's own build of it.
"$UV" venv --seed --allow-existing --python "$PYTHON_VERSION" "$VENV" >>"$LOGFILE" 2>&1 ||
  die "no Python $PYTHON_VERSION: none on this machine and uv could not download one (log: $LOGFILE); install python$PYTHON_VERSION or point PYTHON_VERSION at one that is installed"
got="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>>"$LOGFILE")" ||
  die "$VENV/bin/python does not run (log: $LOGFILE)"
[[ "$got" == "$PYTHON_VERSION" ]] ||
  die "$VENV/bin/python is Python $got, not $PYTHON_VERSION: remove $VENV and run again"

# The packages: the extras of setup.py, pinned to the tested set of this Python where there is one.
constraints="constraints/py${PYTHON_VERSION/./}.txt"
pin=()
if [[ -f "$constraints" ]]; then
  pin=(-c "$constraints")
else
  echo "setup_venv.sh: no tested set for Python $PYTHON_VERSION ($constraints); installing the newest versions setup.py allows" >&2
fi
target="."
[[ -n "$EXTRAS" ]] && target=".[$EXTRAS]"
read -r -a extra <<<"$EXTRA_PIP"
"$UV" pip install --python "$VENV/bin/python" "${pin[@]}" -e "$target" "${extra[@]}" >>"$LOGFILE" 2>&1 ||
  die "installing $target${EXTRA_PIP:+ $EXTRA_PIP}${pin:+ with ${pin[*]}} failed (log: $LOGFILE)"

"$VENV/bin/python" -c 'import sys, jax, jaxlib, flax
print(f"{sys.argv[1]}: Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}")' \
  "$(hostname):$PWD/$VENV"
rm -f "$LOGFILE"
