# Two front-door commands: `make quickstart` (the main job on its built-in default) and
# `make test` (installs what the tests need, builds the extension, runs the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Serialises concurrent builds of the extension (several shells share one build folder).
LOCK := flock /tmp/embedcore-build.lock

.PHONY: venv install build test quickstart bench clean info

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an open range on a fresh environment would pull a multi-GB CUDA build.
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" setuptools wheel ninja pybind11
	touch $@

venv: $(VENV)/.deps

# Editable install with the dev extra: builds embedcore/_C*.so in place (ninja, incremental).
build: $(VENV)/.deps
	$(LOCK) $(BIN)/pip install -q "torch==$(TORCH_VERSION)" -e ".[dev]" --no-build-isolation

install: build

info: install
	$(BIN)/python -m embedcore.info

test: install
	$(BIN)/python -m embedcore.info
	$(BIN)/python -m pytest -q tests

quickstart: install
	$(BIN)/python train.py examples/quickstart.yaml

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-only -q \
		--benchmark-json=benchmarks/results-cpu.json

clean:
	rm -rf build embedcore/_C*.so *.egg-info
