# sd35-workspace — `make help` lists the targets.
# Versions come from constraints.txt (the one pin file: Makefile, CI and docker/Dockerfile read it).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
PYTEST_ARGS ?=
# `make test` runs test files on this many parallel workers (pytest-xdist; one file stays on one worker, so its
# module fixtures are built once): half the suite waits on servers, subprocesses and timeouts, not the CPU.
TEST_WORKERS ?= 2
# A local folder of wheels (e.g. a CPU torch wheel) pip should look in first, when it exists.
WHEELHOUSE ?= /opt/wheels
# torch's CUDA build on a GPU server (docs/container.md has the driver each line needs):
#   make setup CUDA=12    the `# torch-cuda12:` line next to the torch pin in constraints.txt (cu126: up to
#                         Hopper, driver >= 560); docker/Dockerfile's CUDA build argument defaults to it
#   make setup CUDA=13    the `# torch-cuda13:` line (cu130: Turing to Blackwell, driver >= 580)
#   CUDA=12.6 / cu130     a line by version or index name; TORCH_INDEX_URL=... overrides the index itself
# Without CUDA pip takes torch from PyPI (its default Linux wheel is a CUDA 13 build) or WHEELHOUSE.
CUDA ?=
CUDA_LINE := $(or $(if $(CUDA),$(shell sed -n 's/^. torch-cuda$(CUDA): *//p' constraints.txt)),$(CUDA))
TORCH_CUDA_TAG := $(if $(CUDA),$(shell echo '$(CUDA_LINE)' | sed -nE 's/^(cu[0-9]+)$$/\1/p; s/^([0-9]+)\.([0-9]+)(\.[0-9]+)?$$/cu\1\2/p'))
ifneq ($(CUDA),)
ifeq ($(TORCH_CUDA_TAG),)
$(error CUDA=$(CUDA) is not a CUDA line: use 12 or 13 (the torch-cudaNN lines in constraints.txt), a version like 12.6, or an index name like cu126)
endif
endif
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(OFFLINE),,$(or $(TORCH_INDEX_URL),$(if $(TORCH_CUDA_TAG),https://download.pytorch.org/whl/$(TORCH_CUDA_TAG))))
# The local version (+cu126) makes pip replace a torch of another build; a stamp per build re-runs setup.
TORCH_SPEC := torch==$(TORCH_VERSION)$(if $(TORCH_CUDA_TAG),+$(TORCH_CUDA_TAG))
STAMP := $(VENV)/.sd35-setup$(if $(TORCH_CUDA_TAG),-$(TORCH_CUDA_TAG))
# OFFLINE=1 (an air-gapped server): install only from WHEELHOUSE (`make wheelhouse` filled it), no index at all.
OFFLINE ?=
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt $(if $(or $(OFFLINE),$(wildcard $(WHEELHOUSE))),--find-links $(WHEELHOUSE)) $(if $(OFFLINE),--no-index --no-build-isolation)

.DEFAULT_GOAL := help
.PHONY: help setup browser run test test-fast test-gpu gpu-check wheelhouse doctor serve serve-ray serve-ray-stop lab bench-memory clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) browser ## Create .venv and install the pinned packages (idempotent; run/test call it)

# The web page's tests (tests/test_page.py) drive Debian's chromium through Playwright; never
# `playwright install` (it downloads a browser). Installed as root when missing; without it they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium); } || \
	  echo "note: no chromium (apt-get install chromium as root): tests/test_page.py will be skipped"

$(STAMP): constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Offline, the editable install builds without isolation: its build backend comes from the wheelhouse.
	$(if $(OFFLINE),$(PIP_INSTALL) setuptools wheel)
	@# torch first and exactly pinned: a looser spec would pull the CUDA 13 build (GBs) from PyPI.
	$(PIP_INSTALL) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[dev,ray]"
	@touch $@

run: setup ## Generate one image with the settings' defaults (.env / SD35_*; tiny model unless set)
	$(BIN)/sd35 generate $(ARGS)

test: setup ## Run the test suite (CPU tiers; GPU tests skip with the reason when there is no GPU)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup ## Run the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-gpu: setup ## Run only the GPU / FP8 tests (on a GPU machine)
	$(BIN)/python -m pytest -m "gpu or fp8" $(PYTEST_ARGS)

gpu-check: setup ## GPU acceptance on one GPU, offline: test tier, step times, memory, compile, fp8 error (docs/benchmarks.md)
	$(BIN)/sd35 bench gpu $(ARGS)

# Air-gapped GPU servers: on a machine with an index, download every pinned wheel (torch's CUDA build and its
# nvidia-* wheels included) for the server's platform; copy wheelhouse/ over; then
# `make setup OFFLINE=1 CUDA=12 WHEELHOUSE=/path/to/wheelhouse` there installs with no index.
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64
WHEEL_PYTHON ?= 3.11
WHEEL_DIR ?= wheelhouse
wheelhouse: ## Download every pinned wheel for CUDA=12|13 servers into wheelhouse/ (for `make setup OFFLINE=1`)
	@test -n "$(TORCH_CUDA_TAG)" || { echo "pass CUDA=12 or CUDA=13 (the server's torch line)"; exit 2; }
	@mkdir -p $(WHEEL_DIR)
	@grep -E '^[A-Za-z0-9_.-]+(\[[^]]*\])?==' constraints.txt | grep -v '^torch==' > $(WHEEL_DIR)/.pinned.txt
	$(PYTHON) -m pip download -q --disable-pip-version-check -d $(WHEEL_DIR) --only-binary=:all: \
	  --python-version $(WHEEL_PYTHON) $(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) \
	  --index-url https://download.pytorch.org/whl/$(TORCH_CUDA_TAG) --extra-index-url https://pypi.org/simple \
	  "$(TORCH_SPEC)"
	$(PYTHON) -m pip download -q --disable-pip-version-check -d $(WHEEL_DIR) --only-binary=:all: --no-deps \
	  --python-version $(WHEEL_PYTHON) $(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) \
	  -r $(WHEEL_DIR)/.pinned.txt setuptools wheel
	@echo "$(WHEEL_DIR)/: $$(ls $(WHEEL_DIR)/*.whl | wc -l) wheels; on the server: make setup OFFLINE=1 CUDA=$(CUDA) WHEELHOUSE=$$PWD/$(WHEEL_DIR)"

doctor: setup ## Check this machine for every onboarding pitfall (GPU, FP8, token, cache, ports)
	$(BIN)/sd35 doctor

serve: setup ## Serve the OpenAI-compatible image API on 127.0.0.1:8000 (settings from .env)
	$(BIN)/sd35 serve $(ARGS)

# A local single-node Ray and the app on it: SD35_RAY_REPLICAS replicas, Serve's HTTP on SD35_HOST:SD35_PORT,
# the SD35_*/HF_* variables (and .env) copied to the replicas. Ray on loopback only: Ray turns
# --node-ip-address=127.0.0.1 into the node's IP, but with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single node)
# its GCS, raylet and workers listen on 127.0.0.1; token auth (~/.ray/auth_token, 0600) keeps other local
# accounts out (docs/scale-out.md).
RAY_PORT ?= 6390
RAY_ENV := RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_ADDRESS=127.0.0.1:$(RAY_PORT)
# Stops only the Ray whose GCS is 127.0.0.1:$(RAY_PORT), never `ray stop` (every Ray on the machine).
RAY_STOP := $(RAY_ENV) $(BIN)/python -m sd35.service.ray_app stop
serve-ray: setup ## Serve the same API on a local Ray Serve (SD35_RAY_REPLICAS replicas, port SD35_PORT)
	@# Ray's token: made once (0600, under a 077 umask) unless RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH gives one.
	@test -n "$$RAY_AUTH_TOKEN$$RAY_AUTH_TOKEN_PATH" || test -s ~/.ray/auth_token || \
	  (umask 077 && $(BIN)/ray get-auth-token --generate >/dev/null)
	@chmod 600 ~/.ray/auth_token 2>/dev/null || true
	@# A Ray already on RAY_PORT (an earlier serve-ray?) is left alone: the stop below must not reach it.
	@$(BIN)/python -c 'import socket; socket.socket().bind(("127.0.0.1", $(RAY_PORT)))' 2>/dev/null || { \
	  echo "error: 127.0.0.1:$(RAY_PORT) is in use (a Ray of an earlier make serve-ray?)" >&2; \
	  echo "fix: make serve-ray-stop first, or pick another port: make serve-ray RAY_PORT=..." >&2; exit 2; }
	$(RAY_ENV) $(BIN)/ray start --head --port=$(RAY_PORT) --include-dashboard=false --disable-usage-stats \
	  $(RAY_START_ARGS) || { $(RAY_STOP); \
	  echo "error: ray start failed (output above; Ray's logs: /tmp/ray/session_latest/logs); what it started is stopped" >&2; \
	  echo "fix: 'timed out during startup' means a machine too busy for Ray's fixed start-up waits: retry later" >&2; \
	  exit 1; }
	$(RAY_ENV) $(BIN)/python -m sd35.service.ray_app up || { $(RAY_STOP); exit 1; }

serve-ray-stop: ## Stop the Ray Serve app and the local Ray that `make serve-ray` started (only that one)
	-$(RAY_ENV) $(BIN)/python -m sd35.service.ray_app down
	$(RAY_STOP)

lab: setup ## JupyterLab on a private Unix socket (prints the ssh -L line; ARGS=--tcp for 127.0.0.1:8888)
	$(BIN)/sd35 lab $(ARGS)

bench-memory: setup ## Weight bytes per precision mode for SD3.5 Medium and Large (ARCH=medium|large)
	$(BIN)/sd35 bench memory --arch $(or $(ARCH),medium)

clean: ## Remove the venv, caches and outputs/ (not the Hugging Face cache)
	rm -rf $(VENV) .pytest_cache outputs build src/*.egg-info
