# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FX_VENV := .venv-fuxictr
FX_STAMP := $(FX_VENV)/.installed
BENCH_QUALITY_ARGS ?=
MEMBERS ?= deepfm,dcnv2
SEQ_MAX_LEN ?= 0
PYTEST_ARGS ?=

.PHONY: venv demo test bench-serve bench-quality clean

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

# FuxiCTR (the reference column of bench-quality) lives in its own venv: it needs numpy>=2.
$(FX_STAMP): benchmarks/requirements-fuxictr.txt
	test -x $(FX_VENV)/bin/python || $(PYTHON) -m venv $(FX_VENV)
	$(FX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FX_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-fuxictr.txt
	touch $(FX_STAMP)

# Quick default (< 30 min on 2 cores); the full setting: make bench-quality BENCH_QUALITY_ARGS=--full
bench-quality: venv $(FX_STAMP)
	$(BIN)/python benchmarks/bench_quality.py --fuxictr-python $(FX_VENV)/bin/python $(BENCH_QUALITY_ARGS)

clean:
	rm -rf artifacts model_repository
