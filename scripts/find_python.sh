#!/usr/bin/env bash
# Prints the path of the first Python >= 3.12 on this machine that actually runs (and has venv), or one line on
# stderr and exit 1. Candidates, in order: python3.12, python3.13, python3.14 and python3 on PATH, then pyenv's
# installed versions. Each is run, not just found: a pyenv shim on PATH exists but fails when its version is not
# selected. Used by the Makefile (PY= overrides it).
set -u
candidates=(python3.12 python3.13 python3.14 python3)
root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
for v in "$root"/versions/3.12* "$root"/versions/3.13* "$root"/versions/3.14*; do
  [ -d "$v" ] && candidates+=("$v"/bin/python3)
done
for c in "${candidates[@]}"; do
  if out="$("$c" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null)"; then
    echo "$out"
    exit 0
  fi
done
echo "no Python >= 3.12 found (tried ${candidates[*]}): install one, or name it with make PY=/path/to/python3.12" >&2
exit 1
