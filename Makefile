# sd35-workspace — `make help` lists the targets.
# Versions come from constraints.txt (the one pin file: Makefile, CI and docker/Dockerfile read it).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sd35-setup
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
PYTEST_ARGS ?=
# A local folder of wheels (e.g. a CPU torch wheel) pip should look in first, when it exists.
WHEELHOUSE ?= /opt/wheels
# GPU servers with a CUDA 12 driver: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (PyPI's default torch wheel is the CUDA 13 build; the Dockerfile uses the same cu12x index).
TORCH_INDEX_URL ?=
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt $(if $(wildcard $(WHEELHOUSE)),--find-links $(WHEELHOUSE))

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast test-gpu doctor serve lab bench-memory clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## Create .venv and install the pinned packages (idempotent; run/test call it)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and exactly pinned: a looser spec would pull the CUDA 13 build (GBs) from PyPI.
	$(PIP_INSTALL) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch==$(TORCH_VERSION)"
	$(PIP_INSTALL) -e ".[dev]"
	@touch $@

run: setup ## Generate one image with the settings' defaults (.env / SD35_*; tiny model unless set)
	$(BIN)/sd35 generate $(ARGS)

test: setup ## Run the test suite (CPU tiers; GPU tests skip with the reason when there is no GPU)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup ## Run the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-gpu: setup ## Run only the GPU / FP8 tests (on a GPU machine)
	$(BIN)/python -m pytest -m "gpu or fp8" $(PYTEST_ARGS)

doctor: setup ## Check this machine for every onboarding pitfall (GPU, FP8, token, cache, ports)
	$(BIN)/sd35 doctor

serve: setup ## Serve the OpenAI-compatible image API on 127.0.0.1:8000 (settings from .env)
	$(BIN)/sd35 serve $(ARGS)

lab: setup ## JupyterLab on a private Unix socket (prints the ssh -L line; ARGS=--tcp for 127.0.0.1:8888)
	$(BIN)/sd35 lab $(ARGS)

bench-memory: setup ## Weight bytes per precision mode for SD3.5 Medium and Large (ARCH=medium|large)
	$(BIN)/sd35 bench memory --arch $(or $(ARCH),medium)

clean: ## Remove the venv, caches and outputs/ (not the Hugging Face cache)
	rm -rf $(VENV) .pytest_cache outputs build src/*.egg-info
