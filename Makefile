# Set-up, demo, tests and benchmarks. Every target that runs code depends on
# `setup`, which is a no-op when requirements.txt has not changed.
SHELL := /bin/bash
PYTHON := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed
export RAY_USAGE_STATS_ENABLED := 0
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test fashion-mnist bench bench-shards bench-methods bench-real bench-tune bench-loader clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@command -v python3.11 >/dev/null || { echo "python3.11 is required (the pinned torch 2.14.1 build is for Python 3.11)"; exit 1; }
	@test -x $(PYTHON) || python3.11 -m venv .venv
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

# The demo's normal and anomalous images come from Debian's Fashion-MNIST package.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if ! test -e $(FASHION_DIR)/train-images-idx3-ubyte.gz; then \
	  echo "Installing the Debian package dataset-fashion-mnist for the demo"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
	  || { echo "Could not install dataset-fashion-mnist. Install it as root (apt-get install dataset-fashion-mnist) and rerun make demo."; exit 1; }; \
	fi

demo: setup fashion-mnist
	$(PYTHON) -m jobs.demo

# Tests run inside a private network namespace with only loopback when the
# machine allows it, so Ray, moto and gloo cannot reach or be reached from
# anything else; elsewhere they run as they are, still bound to 127.0.0.1.
test: setup
	@bash tests/run_isolated.sh $(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

include infra/jobs.mk

bench-shards: setup
	$(PYTHON) -m bench.bench_shards --output bench/results/shards.json

bench-real: setup
	$(PYTHON) -m bench.bench_methods --methods 1,4 --image-size 64 --epochs 10 --output bench/results/real

bench-methods: setup
	$(PYTHON) -m bench.bench_methods --methods 1,2,3,4,5 --image-size 64 --epochs 10 --output bench/results/methods64

bench-tune: setup
	$(PYTHON) -m bench.bench_tune --output bench/results/tune

bench-loader: setup
	$(PYTHON) -m bench.bench_loader --output bench/results/loader/loader.json

bench: bench-shards bench-methods bench-tune bench-loader

clean:
	rm -rf demo runs bench/results .pytest_cache
