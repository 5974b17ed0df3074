# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: demo test lint typecheck unit sim integration chaos bench clean

# The package alone (what `make demo` needs); the test tools come on top of it.
$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# An editable install leaves the sources uncompiled; without .pyc files every
	# cluster process compiles what it imports at each start (~0.1-0.25 s CPU each).
	$(BIN)/python -m compileall -q src
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(BIN)/lepton demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite: style, types, then unit, simulation, integration and chaos tests.
# Two pytest workers (pytest-xdist): most of the suite's wall time is real clusters
# starting, electing and healing, not CPU, so two files at a time halve it.
test: lint typecheck
	$(BIN)/pytest -q -n 2 tests

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

sim: $(STAMP)
	$(BIN)/pytest -q tests/sim

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration tests/chaos

bench: $(STAMP)
	$(BIN)/python benchmarks/compute_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
