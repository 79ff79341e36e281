# One command each, from a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv here and install torch *before* the package (else pip pulls a multi-GB CUDA build).
# GPU users: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124' ...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PRIME_EVAL_DATA ?= $(abspath ../shared/data)
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup demo audit test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(OFFLINE) $(BIN)/prime-eval demo

audit: $(VENV)/.installed
	$(OFFLINE) $(BIN)/prime-eval audit

test: $(VENV)/.installed
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/throughput.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/variance.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/adaptive.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/arm_vs_hf.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/generation.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/iw_bias.py
	$(OFFLINE) PRIME_EVAL_DATA=$(PRIME_EVAL_DATA) $(BIN)/python benchmarks/flops.py

clean:
	rm -rf $(VENV) .pytest_cache
