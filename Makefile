# Two entry points: `make demo` and `make test`. Both build a local virtualenv first.
# torch: reuse the system's if there is one; otherwise install the CPU build (2.13.0+cpu),
# never a multi-GB CUDA build.
# --no-compile: pip would byte-compile every module of torch, transformers and diffusers, most
# never imported (about a minute of a 2-core machine). The import check that ends the install
# compiles and writes the bytecode of what the packages import instead, with
# PYTHONDONTWRITEBYTECODE emptied (where it is set, no later process would write it), as make
# test does for the rest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test lint test-gpu test-interpret bench clean

$(STAMP): pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    $(PY) -m venv --system-site-packages $(VENV); \
	else \
	    $(PY) -m venv $(VENV) && \
	    { $(BIN)/pip install -q --no-compile "$(TORCH_CPU)" 2>/dev/null || \
	      $(BIN)/pip install -q --no-compile "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); }; \
	fi
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q --no-compile -c $(VENV)/constraints.txt -e ".[test]"
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -c "import lorahot, peft, diffusers, transformers, hypothesis, xdist"
	$(BIN)/ruff --version && $(BIN)/mypy --version
	touch $(STAMP)

demo: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python examples/hotswap_demo.py
	PYTHONDONTWRITEBYTECODE= $(BIN)/python examples/generate_demo.py
	PYTHONDONTWRITEBYTECODE= $(BIN)/python examples/pipeline_demo.py

# lint: ruff (lint and format) over the code, mypy over the package; configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check lorahot tests benchmarks examples
	$(BIN)/ruff format --check lorahot tests benchmarks examples
	$(BIN)/mypy

# One pytest-xdist worker per core, at most 4 (each imports torch and compiles on its own);
# tests/conftest.py gives each worker its share of the cores for torch's threads.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

# PYTHONDONTWRITEBYTECODE emptied: where it is set, every process (each worker, each
# subprocess a test starts) compiled lorahot's modules and pytest rewrote the test modules again.
test: lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# The Triton kernels on a CPU, in Triton's interpreter (tests/unit/kernels/test_interpreted.py),
# then compiled ahead of time for sm90 without running (tests/unit/kernels/test_sm90_compile.py):
# Triton and a NumPy it runs with go to .interp/, ahead of the venv's on the path.
INTERP := .interp
$(INTERP)/.installed:
	$(BIN)/pip install -q --no-deps --target $(INTERP) "triton==3.5.1" "numpy==2.1.3"
	touch $@

test-interpret: $(STAMP) $(INTERP)/.installed
	TRITON_INTERPRET=1 PYTHONPATH=$(INTERP) $(BIN)/python -m pytest -q -p no:cacheprovider -m interpret tests/unit/kernels
	LORAHOT_SM90_COMPILE=1 PYTHONPATH=$(INTERP) $(BIN)/python -m pytest -q -p no:cacheprovider -m sm90 tests/unit/kernels

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --suite all

clean:
	rm -rf $(VENV) $(INTERP) .pytest_cache .hypothesis
