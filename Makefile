# The two commands a newcomer needs: `make repro` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
export DVC_NO_ANALYTICS=1 RAY_USAGE_STATS_ENABLED=0 BENTOML_DO_NOT_TRACK=True MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1

.PHONY: setup data repro test test-slow test-fast serve ui bench clean-outputs

## setup: virtualenv with the pinned stack, plus Fashion-MNIST's Debian package when missing
setup: $(VENV)/.installed data

# The virtualenv takes about 7 GB (PyTorch with its CUDA libraries): too little disk fails in one line, not
# half-way through pip.
SETUP_GB := 7
$(VENV)/.installed: pyproject.toml
	@free=$$(df -Pk $(dir $(abspath $(VENV))) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ ! -d $(VENV)/lib ] && [ "$$free" -lt $(SETUP_GB) ]; then \
	  echo "setup: the virtualenv needs about $(SETUP_GB) GB of disk, $$free GB free in $(dir $(abspath $(VENV)))" >&2; exit 1; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: install Debian's dataset-fashion-mnist, or fetch will download Fashion-MNIST"; fi; \
	fi

## repro: the whole pipeline on the default data, then a summary of what it produced
# (without a DVC remote, DVC's closing "Use `dvc push` ..." hint points nowhere: it is left out)
repro: setup
	set -o pipefail; export PATH=$(BIN):$$PATH; \
	if [ -n "$$(dvc remote list)" ]; then dvc repro; else dvc repro 2>&1 | grep --line-buffered -v '^Use .dvc push. to send'; fi
	$(PY) -m pipelines.stages.report

## test: the whole suite (unit + integration with real MLflow, Ray, BentoML, DVC): a test process per core (at
## most TEST_WORKERS_MAX), each module's tests in one process (they share its fixtures), then the tests that
## measure the machine's throughput, alone. Both parts run; either failing fails the target.
TEST_WORKERS_MAX ?= 4
test: setup
	status=0; \
	$(PY) -m pytest -q -n logical --maxprocesses $(TEST_WORKERS_MAX) --dist loadfile -m 'not slow and not serial' || status=$$?; \
	$(PY) -m pytest -q -m serial || status=$$?; \
	exit $$status

## test-slow: the tests too long for every run (each classify family trained for an epoch on 10k items)
test-slow: setup
	$(PY) -m pytest -q -m slow

serve:
	PATH=$(BIN):$$PATH $(PY) -m services.serve

## ui: MLflow's UI on http://127.0.0.1:5000, after printing which pages to open (both of the store the stages use)
ui:
	$(PY) -m pipelines.tracking.ui --url http://127.0.0.1:5000
	uri=$$($(PY) -m pipelines.tracking.ui --print-uri) && \
	  $(BIN)/mlflow ui --backend-store-uri "$$uri" --host 127.0.0.1 --port 5000

bench:
	$(PY) bench/train_throughput.py
	$(PY) bench/augment.py
	$(PY) bench/roi_align.py
	$(PY) bench/determinism.py
	$(PY) bench/cpu_amp.py
	$(PY) bench/tune_efficiency.py
	$(PY) bench/trial_vs_final.py
	$(PY) bench/serve.py
	$(PY) bench/owndata.py
	$(PY) bench/upload.py
	$(PY) bench/upload_memory.py
	$(PY) bench/pretrain.py
	$(PY) bench/transfer.py
	$(PY) bench/families.py
	$(PY) bench/report.py
