# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
CONFIG ?= configs/docstrings.py

.PHONY: run test venv bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0  # first, so that nothing later can pull a CUDA build
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/python -m nash_lm.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python bench/equilibrium.py

clean:
	rm -rf $(VENV) runs
