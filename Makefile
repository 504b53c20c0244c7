# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# ggml's CPU threads spin-wait; OpenMP in torch should not.
export OMP_WAIT_POLICY ?= PASSIVE
export CMAKE_ARGS ?= -DGGML_NATIVE=ON

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/verispec models pull qwen2.5-coder-1.5b
	$(BIN)/verispec models pull qwen2.5-coder-0.5b
	$(BIN)/verispec demo

test: install-test
	$(BIN)/verispec models pull smollm2-135m
	$(BIN)/verispec models pull qwen2.5-coder-1.5b
	$(BIN)/verispec models pull qwen2.5-coder-0.5b
	$(BIN)/python -m pytest -q -ra

bench: install
	$(BIN)/verispec bench --out bench-out

clean:
	rm -rf $(VENV) bench-out
