# One command sets up a fresh machine and runs the tests: `make test` (CI runs exactly that).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= ort,faiss,torch,nvml,provision,dev
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-reliability lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Fresh machine: set up, generate the demo's assets, provision the demo sortie and print its summary.
demo: setup
	$(VENV)/bin/navcache demo

lint: setup
	$(VENV)/bin/ruff check src tests bench tasks flows cli
	$(VENV)/bin/ruff format --check src tests bench tasks flows cli
	$(VENV)/bin/mypy

# Fast suite: everything but the `slow` (AOTInductor compile matrices) and `gpu` markers.
test: lint
	$(VENV)/bin/pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# Everything this machine can run (GPU tests skip themselves without CUDA).
test-all: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The full reliability matrix (every kill point, tamper case and I/O fault): about 12 min on 2 cores.
test-reliability: setup
	$(VENV)/bin/pytest tests/reliability $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench runtime

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
