# Two front-door commands: `make quickstart` (the main job on its built-in default) and
# `make test` (installs what the tests need, builds the extension, runs the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install is constrained to the lock file: the versions the suite was tested with.
LOCKFILE := requirements-lock.txt
CONSTRAINTS := -c $(LOCKFILE)
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(LOCKFILE))
# Serialises concurrent builds of the extension (several shells share one build folder).
LOCK := flock /tmp/embedcore-build.lock

.PHONY: venv install build test quickstart bench clean info lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an open range on a fresh environment would pull a multi-GB CUDA build.
$(VENV)/.deps: $(BIN)/python pyproject.toml $(LOCKFILE)
	$(BIN)/pip install -q $(CONSTRAINTS) "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q $(CONSTRAINTS) "torch==$(TORCH_VERSION)" setuptools wheel ninja pybind11
	touch $@

venv: $(VENV)/.deps

# Editable install with the dev extra: builds embedcore/_C*.so in place (ninja, incremental).
build: $(VENV)/.deps
	$(LOCK) $(BIN)/pip install -q $(CONSTRAINTS) "torch==$(TORCH_VERSION)" -e ".[dev]" --no-build-isolation

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

# Re-resolve to the newest versions pyproject allows (torch stays at TORCH_VERSION) and record
# them; run `make test` on the result before committing the new lock.
lock: $(VENV)/.deps
	$(LOCK) $(BIN)/pip install -q --upgrade --upgrade-strategy eager "torch==$(TORCH_VERSION)" \
		-e ".[dev]" --no-build-isolation
	grep '^#' $(LOCKFILE) > $(LOCKFILE).new
	$(BIN)/pip freeze --exclude-editable | grep -v '^embedcore' | sed 's/^\(torch==[^+]*\)+.*/\1/' >> $(LOCKFILE).new
	mv $(LOCKFILE).new $(LOCKFILE)

clean:
	rm -rf build embedcore/_C*.so *.egg-info
