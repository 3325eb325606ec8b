# Two entry points that set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
# The versions inside pyproject.toml's ranges that setup installs (CI's); `make setup CONSTRAINTS=`: none.
CONSTRAINTS ?= .ci/constraints.txt

.PHONY: setup train lint test bench check-pypi

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/sigma-moe train $(CONFIG)

# Style: ruff (configured in pyproject.toml) lints and checks the formatting; `ruff format .` and
# `ruff check --fix .` repair most of what it finds. `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# .venv/bin first on PATH: DeepSpeed's JIT op is then always built with the venv's ninja (a system
# ninja hashes commands differently and makes every other process rebuild it).
test: setup lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_feedforward.py

# What a machine without this one's local CPU wheels gets from plain PyPI (the CUDA build of torch and
# the triton it pins), resolved with no pip configuration and a fresh HOME, not installed: the newest
# torch the range allows, and its oldest (2.11.0, whose triton 3.6.0 the range must admit, not replace).
# CI runs it.
PLAIN_PYPI = env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL HOME="$$(mktemp -d)" \
	  PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet --dry-run --ignore-installed
check-pypi: setup
	$(PLAIN_PYPI) --report $(VENV)/plain-pypi.json -e '.[test]'
	$(PY) .ci/check_plain_pypi.py $(VENV)/plain-pypi.json
	$(PLAIN_PYPI) --report $(VENV)/plain-pypi-oldest.json -e '.[test]' torch==2.11.0
	$(PY) .ci/check_plain_pypi.py $(VENV)/plain-pypi-oldest.json --torch 2.11.0
