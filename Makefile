# Two entry points that set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.yaml

.PHONY: setup train test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/sigma-moe train $(CONFIG)

# .venv/bin first on PATH: DeepSpeed's JIT op is then always built with the venv's ninja (a system
# ninja hashes commands differently and makes every other process rebuild it).
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_feedforward.py
