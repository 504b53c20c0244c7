# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# ggml is built without OpenMP (build-support/llama-cpp.sh), so this reaches only torch's OpenMP: its idle
# threads sleep instead of spinning beside llama.cpp's passes (docs/threading.md).
export OMP_WAIT_POLICY ?= PASSIVE
# glibc asks the kernel for huge pages for the memory it maps, llama.cpp's repacked weights among it: one-row
# passes ~7% faster where transparent huge pages are in `madvise` mode (verispec/huge_pages.py).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
LLAMA_BUILD := build-support/llama-cpp.sh build-support/ggml-fa-split-kv-env.patch build-support/ggml-batch-invariant.patch

.PHONY: install install-test llama-tools demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# llama-cpp-python from its pinned sdist, patched and built by build-support/llama-cpp.sh into a cache outside
# the repo (about 5-12 minutes the first time), then everything else from pyproject.toml. --no-compile: pip
# would byte-compile every file of every package, torch's included (the whole install from cached wheels took
# 71 s with it and 26 s without, on this 2-core machine); Python compiles the modules it imports on first use.
PIP_INSTALL := $(BIN)/pip install --no-compile
$(VENV)/.installed: $(BIN)/python pyproject.toml $(LLAMA_BUILD)
	PYTHON=$(BIN)/python build-support/llama-cpp.sh wheel > $(VENV)/.llama-wheel
	$(PIP_INSTALL) --no-deps --force-reinstall "$$(cat $(VENV)/.llama-wheel)"
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# llama.cpp's own programs (llama-server, llama-cli, llama-simple, llama-bench, llama-speculative-simple,
# llama-lookup) from the same vendored source, unpatched, into the same cache: the bench's reference and peers.
llama-tools:
	build-support/llama-cpp.sh tools

# Base dependencies only (`install`, not `install-test`): the demo is what `pip install verispec` gives a user.
# Exits non-zero if any row fails. DEMO_ARGS: extra `verispec demo` options, e.g. CI's shorter run.
DEMO_ARGS ?=
demo: install llama-tools
	$(BIN)/verispec models pull qwen2.5-coder-1.5b
	$(BIN)/verispec models pull qwen2.5-coder-0.5b
	$(BIN)/verispec demo $(DEMO_ARGS)

test: install-test llama-tools
	$(BIN)/verispec models pull smollm2-135m
	$(BIN)/verispec models pull qwen2.5-coder-1.5b
	$(BIN)/verispec models pull qwen2.5-coder-0.5b
	$(BIN)/python -m pytest -q -ra --durations=25

bench: install llama-tools
	$(BIN)/verispec bench --out bench-out

clean:
	rm -rf $(VENV) bench-out
