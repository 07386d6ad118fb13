# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MEMBERS ?= deepfm,dcnv2
SEQ_MAX_LEN ?= 0
PYTEST_ARGS ?=

.PHONY: venv demo test bench-serve bench-data bench-train clean

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

# data prepare at scale: a >= 5 M-row Criteo-layout file (generated once, reused), prepared with 2 workers
BENCH_ROWS ?= 5000000
bench-data: venv
	$(BIN)/python benchmarks/bench_data.py --rows $(BENCH_ROWS)

# training throughput per member from the bench-data shards, the plain-PyTorch DCNv2 baseline, optimiser quality
bench-train: venv
	test -f artifacts/bench/data/prepared/train/manifest.json || $(MAKE) bench-data
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf artifacts model_repository
