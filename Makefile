# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MEMBERS ?= deepfm,dcnv2
SEQ_MAX_LEN ?= 0
PYTEST_ARGS ?=
EXPERIMENTS_ARGS ?=

.PHONY: venv demo test bench-serve experiments clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ctr-ensemble demo --members $(MEMBERS) --seq-max-len $(SEQ_MAX_LEN)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-serve: venv
	$(BIN)/python benchmarks/bench_serve.py

# Independent vs mutual vs collaborative training (quick default; EXPERIMENTS_ARGS="--full" or "--dataset criteo").
experiments: venv
	$(BIN)/python benchmarks/experiments.py $(EXPERIMENTS_ARGS)

clean:
	rm -rf artifacts model_repository
