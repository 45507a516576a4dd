# Two entry points: `make test` and `make bench`. Each builds .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test bench bench-ops fitness clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch, pinned here and not in setup.py so installs never pull a CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP)
	# Triton's interpreter runs the real kernels on CPU (set before any @triton.jit is defined)
	TRITON_INTERPRET=1 $(BIN)/pytest tests -n 2 --dist loadfile -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/fastprefix-bench

bench-ops: $(STAMP)
	# importlib mode: the repo root must not land on sys.path (its kernels/ would pose as HF's `kernels`)
	$(BIN)/pytest benchmarks --import-mode=importlib -q -p no:cacheprovider --benchmark-only

fitness: $(STAMP)
	$(BIN)/python -P -m fastprefix.kernels.fitness

clean:
	rm -rf $(VENV) build *.egg-info
