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
EXPERIMENTS_ARGS ?=
SOAK_SECONDS ?= 600
SOAK_ARGS ?=

PERF_VENV := .venv-perf
PERF_STAMP := $(PERF_VENV)/.installed
MA_VENV := .venv-ma
MA_STAMP := $(MA_VENV)/.installed
# Model Analyzer's best member settings, fed into `make loadtest` when `make model-analyzer` wrote them.
MA_SWEEP := artifacts/model_analyzer/sweep.yaml
# `make loadtest` uses the demo repository when `make demo` made one, else builds a small one.
LT_DEMO := $(and $(wildcard model_repository/repository.json),$(wildcard artifacts/demo/data/test.tsv))
LT_REPO := $(if $(LT_DEMO),model_repository,artifacts/loadtest/demo/model_repository)
LT_DATA := $(if $(LT_DEMO),artifacts/demo/data/test.tsv,artifacts/loadtest/demo/data/test.tsv)
LT_SMALL := artifacts/loadtest/demo

.PHONY: venv perf-venv ma-venv model-analyzer demo test bench-serve bench-quality bench-data bench-train bench-reg bench-defaults bench-ensemble loadtest loadtest-demo soak bench-recovery experiments gpu-wheels gpu-check results docs-cli bench-tune bench-guard rollout clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

$(PERF_STAMP): requirements-perf.txt
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-perf.txt
	touch $(PERF_STAMP)

perf-venv: $(PERF_STAMP)

$(MA_STAMP): requirements-ma.txt
	test -x $(MA_VENV)/bin/python || $(PYTHON) -m venv $(MA_VENV)
	$(MA_VENV)/bin/python -m pip install --quiet -r requirements-ma.txt
	touch $(MA_STAMP)

ma-venv: $(MA_STAMP)

# Triton Model Analyzer over each member's instances / batching delay / preferred batch size (CPU, local launch of
# the bundled tritonserver); writes artifacts/model_analyzer/sweep.yaml, which `make loadtest` then runs.
model-analyzer: venv perf-venv ma-venv
	$(BIN)/python benchmarks/model_analyzer.py --out artifacts/model_analyzer
	$(BIN)/python benchmarks/publish.py artifacts/model_analyzer docs/model_analyzer model_analyzer.md model_analyzer.csv sweep.yaml

demo: venv
	$(BIN)/ctr-ensemble demo --members $(MEMBERS) --seq-max-len $(SEQ_MAX_LEN)

test: venv perf-venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-serve: venv perf-venv
	$(BIN)/python benchmarks/bench_serve.py --out artifacts/bench
	$(BIN)/python benchmarks/publish.py artifacts/bench docs/serve serve.md serve_targets.csv serve.csv serve_ratios.csv serve_stages.csv serve_fusion.csv serve_trace.csv

# data prepare at scale: a >= 5 M-row Criteo-layout file (generated once, reused), prepared with 2 workers
BENCH_ROWS ?= 5000000
bench-data: venv
	$(BIN)/python benchmarks/bench_data.py --rows $(BENCH_ROWS)

# training throughput per member from the bench-data shards, the plain-PyTorch DCNv2 baseline, optimiser quality
bench-train: venv
	test -f artifacts/bench/data/prepared/train/manifest.json || $(MAKE) bench-data
	$(BIN)/python benchmarks/bench_train.py

# The embedding regularizer over all table rows vs the batch's rows: step cost (DCNv2 reference shape) and DeepFM
# quality by optimiser; writes docs/bench/regularizer/train.{md,csv}.
bench-reg: venv
	$(BIN)/python benchmarks/bench_train.py --skip members,reference,fuxictr --out docs/bench/regularizer --seconds 15

# How the members' defaults were chosen: one default changed at a time on bench-quality's data (docs/bench/defaults/).
bench-defaults: venv
	$(BIN)/python benchmarks/bench_defaults.py --docs docs/bench/defaults

# Fitted fusion vs tau = 1 vs mean vs the best member, on bench-quality's data (its quality_runs.csv picks the two
# best members of each dataset by validation AUC); writes docs/bench/ensemble/.
bench-ensemble: venv
	$(BIN)/python benchmarks/bench_ensemble.py --docs docs/bench/ensemble

# Independent vs mutual vs collaborative training (quick default; EXPERIMENTS_ARGS="--full" or "--dataset criteo").
experiments: venv
	$(BIN)/python benchmarks/experiments.py $(EXPERIMENTS_ARGS)

loadtest: venv perf-venv
	test -f $(LT_REPO)/repository.json -a -f $(LT_DATA) || $(MAKE) loadtest-demo
	$(BIN)/ctr-ensemble loadtest --sweep $(if $(wildcard $(MA_SWEEP)),--sweep-config $(MA_SWEEP)) --repository $(LT_REPO) --data $(LT_DATA) --out artifacts/loadtest
	$(BIN)/python benchmarks/publish.py artifacts/loadtest docs/loadtest latency_vs_auc.md latency_vs_auc.csv latency_vs_auc.png

# Soak: a long Locust load on the ensemble (default 10 minutes), errors must be 0; p99 drift and RSS leak check.
soak: venv
	test -f $(LT_REPO)/repository.json -a -f $(LT_DATA) || $(MAKE) loadtest-demo
	$(BIN)/ctr-ensemble soak --repository $(LT_REPO) --data $(LT_DATA) --duration $(SOAK_SECONDS) --out artifacts/soak $(SOAK_ARGS)
	$(BIN)/python benchmarks/publish.py artifacts/soak docs/soak soak.md soak_windows.csv soak.png

# Rollout under load: the small demo's repository (a copy) serves; a second release (members retrained with
# another seed) is deployed and rolled back under Locust load; errors must be 0 (docs/rollout/rollout.md).
ROLLOUT := artifacts/rollout
rollout: venv
	test -f $(LT_SMALL)/model_repository/repository.json || $(MAKE) loadtest-demo
	test -f $(ROLLOUT)/v2/model_repository/repository.json || { for m in deepfm dcnv2; do $(BIN)/ctr-ensemble train \
	  --model $$m --train $(LT_SMALL)/data/train.tsv --val $(LT_SMALL)/data/val.tsv --spec $(LT_SMALL)/feature_spec.json \
	  --out $(ROLLOUT)/v2/members/$$m.pt --epochs 2 --threads 2 --seed 7 || exit 1; done; \
	  $(BIN)/ctr-ensemble export --checkpoint $(ROLLOUT)/v2/members/deepfm.pt --checkpoint $(ROLLOUT)/v2/members/dcnv2.pt \
	  --repository $(ROLLOUT)/v2/model_repository --parity-data $(LT_SMALL)/data/val.tsv --fusion-kind cpu; }
	rm -rf $(ROLLOUT)/served && cp -rL $(LT_SMALL)/model_repository $(ROLLOUT)/served
	$(BIN)/ctr-ensemble rollout --repository $(ROLLOUT)/served --new $(ROLLOUT)/v2/model_repository \
	  --data $(LT_SMALL)/data/test.tsv --out $(ROLLOUT)
	$(BIN)/python benchmarks/publish.py $(ROLLOUT) docs/rollout rollout.md rollout.json

# Recovery after a fusion-stub kill under load through the container's entrypoint (python -m
# ctr_ensemble.serving.entrypoint --local, the production arguments): errors during the outage, seconds to recover.
bench-recovery: venv
	test -f $(LT_REPO)/repository.json -a -f $(LT_DATA) || $(MAKE) loadtest-demo
	$(BIN)/python benchmarks/bench_recovery.py --repository $(LT_REPO) --data $(LT_DATA) --out artifacts/recovery
	$(BIN)/python benchmarks/publish.py artifacts/recovery docs/recovery recovery.md recovery.csv

# A small demo (the demo pipeline's steps at 30k training rows, 2 epochs) when `make demo` has not run.
loadtest-demo: venv
	$(BIN)/ctr-ensemble data synth --out $(LT_SMALL)/data --train-rows 30000 --val-rows 6000 --test-rows 6000
	$(BIN)/ctr-ensemble data fit --train $(LT_SMALL)/data/train.tsv --out $(LT_SMALL)/feature_spec.json
	for m in deepfm dcnv2; do $(BIN)/ctr-ensemble train --model $$m --train $(LT_SMALL)/data/train.tsv \
	  --val $(LT_SMALL)/data/val.tsv --spec $(LT_SMALL)/feature_spec.json --out $(LT_SMALL)/members/$$m.pt \
	  --epochs 2 --threads 2 || exit 1; done
	$(BIN)/ctr-ensemble export --checkpoint $(LT_SMALL)/members/deepfm.pt --checkpoint $(LT_SMALL)/members/dcnv2.pt \
	  --repository $(LT_SMALL)/model_repository --parity-data $(LT_SMALL)/data/val.tsv --fusion-kind cpu \
	  --fit-fusion $(LT_SMALL)/data/val.tsv

# FuxiCTR (the reference column of bench-quality) lives in its own venv: it needs numpy>=2.
$(FX_STAMP): benchmarks/requirements-fuxictr.txt
	test -x $(FX_VENV)/bin/python || $(PYTHON) -m venv $(FX_VENV)
	$(FX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FX_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-fuxictr.txt
	touch $(FX_STAMP)

# Quick default (ours with the product defaults vs FuxiCTR BARS, 3 seeds); writes docs/bench/quality/.
# The full setting: make bench-quality BENCH_QUALITY_ARGS=--full
bench-quality: venv $(FX_STAMP)
	$(BIN)/python benchmarks/bench_quality.py --fuxictr-python $(FX_VENV)/bin/python --docs docs/bench/quality $(BENCH_QUALITY_ARGS)

# The GPU check (README, "GPU check"). gpu-wheels, here: the cp312 wheels the GPU machine lacks, into an ignored
# folder carried there, and whether they fit a device call with the working tree. gpu-check, there: no venv,
# no network; the machine's python3 with the carried wheels in a --target folder (GPU_CHECK_DRY=1: CPU only).
GPU_WHEELS ?= artifacts/gpu-wheels
GPU_CHECK_OUT ?= artifacts/gpu
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=
gpu-wheels: venv
	$(BIN)/python benchmarks/gpu_wheels.py --out $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --wheels $(GPU_WHEELS) $(if $(GPU_CHECK_DRY),--dry-run) $(GPU_CHECK_ARGS)

# The README's "Results at a glance" table and the member table's AUC column, from the stamped files under docs/
# (a file without a commit, date and machine stamp is left out). Run after any target above that writes docs/.
# tune --model deepfm --trials 20 on the MovieLens task: best trial vs the defaults on test (docs/tune/)
bench-tune: venv
	$(BIN)/python benchmarks/bench_tune.py --docs docs/tune

bench-guard: venv
	$(BIN)/python benchmarks/bench_guard.py --docs docs/serve

results: venv
	$(BIN)/python benchmarks/results_table.py

# docs/cli.md from every command's --help (tests/test_docs_tools.py fails when it is out of date).
docs-cli: venv
	$(BIN)/python benchmarks/cli_docs.py --out docs/cli.md

clean:
	rm -rf artifacts model_repository model_repository.versions
