# advpure — `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# Debian packages the project uses: the embedded dataset, and a real SLURM for the `slurm` tests.
APT_PACKAGES ?= dataset-fashion-mnist slurm-wlm munge
EXP ?= fmnist
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_FAST := -m "not slow and not slurm" --durations=15

.PHONY: help setup apt train benchmark certify test test-all test-slow test-slurm perf gpu-check lint format clean clean-all config

help: ## show this help
	@echo "advpure — adversarial purification with score-based generative models"
	@echo "usage: make <target> [EXP=<experiment>] [ARGS='key=value ...']"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo
	@echo "experiments: $$(ls src/advpure/conf/experiment/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' ')"

setup: apt $(STAMP) ## create .venv: pinned CPU torch first (TORCH=... to override), then the package + dev extras; apt packages when root

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

apt: ## apt-get install the dataset and slurm when running as root on Debian (skips what is installed)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt-get install$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1; \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	    echo "warning: could not install$$missing (the data dir or a download will be used instead)"; \
	  fi; \
	fi

train: setup ## train train.stages (default classifier, score; each skipped when its weights exist; ARGS='train.stages=[ddpmpp]', 'train.force=true')
	$(PY) -m advpure train experiment=$(EXP) $(ARGS)

benchmark: setup ## train what is missing, then attack the undefended and the defended classifier (EXP=fmnist_diffusion: ADP vs DiffPure/GDMP/VE); prints the table
	$(PY) -m advpure benchmark experiment=$(EXP) $(ARGS)

certify: setup ## randomized-smoothing l2 certificates (Cohen et al. 2019) of EXP (default fmnist_certify): table + plot
	$(PY) -m advpure certify experiment=$(if $(filter command line environment,$(origin EXP)),$(EXP),fmnist_certify) $(ARGS)

config: setup ## print the resolved config of EXP with ARGS applied
	$(PY) -m advpure config experiment=$(EXP) $(ARGS)

test: setup ## fast test suite (~10 min on 2 cores; the 15 slowest tests listed at the end)
	$(PY) -m pytest $(PYTEST_FAST) $(ARGS)

test-all: setup ## every test: fast, slow and SLURM
	$(PY) -m pytest $(ARGS)

test-slow: setup ## only the slow tests (trained nets on the embedded default, long runs)
	$(PY) -m pytest -m "slow and not slurm" --durations=15 --timeout=3600 $(ARGS)

test-slurm: setup ## the tests that start a real single-node SLURM cluster (root, slurm-wlm + munge)
	$(PY) -m pytest -m slurm --durations=15 --timeout=1800 $(ARGS)

perf: setup ## performance suite: ratios against baselines and % of the machine's peak -> runs/perf/perf.json
	$(PY) -m advpure.perf $(ARGS)

gpu-check: setup ## one-command GPU check (<= 8 min on one GPU, no network): CUDA paths, throughput, GPU-hours -> runs/perf/gpu_check.json
	$(PY) -m advpure.perf.gpu_check $(ARGS)

lint: setup ## ruff check + format check
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests experiments
	$(VENV)/bin/ruff format src tests experiments

clean: ## remove caches and run outputs (keeps .venv, trained weights and data)
	rm -rf runs wandb lightning_logs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-all: clean ## also remove .venv, trained weights (artifacts/) and downloaded data (data/)
	rm -rf $(VENV) artifacts data
