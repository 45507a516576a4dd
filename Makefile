# Two entry points: `make test` and `make bench` (then `make bench-publish`). Each builds .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-oldest lint bench bench-publish bench-ops fitness clean gpu gpu-test gpu-bench gpu-install gpu-versions

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch, pinned here and not in setup.py so installs never pull a CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP) lint
	# Triton's interpreter runs the real kernels on CPU (set before any @triton.jit is defined)
	TRITON_INTERPRET=1 $(BIN)/pytest tests -n 2 --dist loadfile -q -p no:cacheprovider --durations=15
	# the transformers tests that reach the Triton backend again, on the split attention path
	TRITON_INTERPRET=1 FASTPREFIX_ATTENTION=split $(BIN)/pytest tests/integrations/test_transformers.py -k triton -n 2 -q \
		-p no:cacheprovider

# The oldest stack setup.py allows (transformers 5.17, triton 3.6, as on the GPU machine) beside the CPU torch wheel:
# a second venv, the model-level suites and the kernel interpreter suites (.ci/run runs it after make test).
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
OLDEST_TESTS := tests/integrations tests/adapters tests/methods tests/ops/test_attention_kernel.py tests/ops/test_attention_features.py \
	tests/ops/test_split_attention.py tests/ops/test_split_features.py tests/ops/test_embedding_kernel.py \
	tests/ops/test_kernel_fixes.py tests/ops/test_reference.py tests/ops/test_varlen_attention.py \
	tests/ops/test_concat_attention.py tests/ops/test_dispatch_table.py tests/ops/test_prefix_index.py \
	tests/ops/test_prefix_index_kernels.py

$(OLDEST_STAMP): setup.py constraints-oldest.txt
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q $(TORCH)
	$(OLDEST)/bin/python -m pip install -q -c constraints-oldest.txt -e ".[test]"
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	TRITON_INTERPRET=1 $(OLDEST)/bin/pytest $(OLDEST_TESTS) -n 2 --dist loadfile -q -p no:cacheprovider \
		-W "ignore:Conversion of an array with ndim:DeprecationWarning"

lint: $(STAMP)
	# the floor plan (.importlinter) on the installed layout, where kernels/ and benchmarks/ sit inside fastprefix
	rm -rf build/lint && mkdir -p build/lint && cp -r fastprefix build/lint/ && cp -r kernels build/lint/fastprefix/kernels \
		&& cp -r benchmarks build/lint/fastprefix/benchmarks
	cd build/lint && ../../$(BIN)/lint-imports ../../.importlinter

# make bench writes a new run folder, benchmarks/runs/<UTC date-time>-minilm/ (git ignores it), and prints where;
# nothing committed changes. make bench-publish [RUN=benchmarks/runs/<folder>] (default: the newest run) copies that
# run into benchmarks/results/minilm.{md,json,png} and rewrites the README's block from it (a test checks they
# agree); it refuses a --quick run or one shorter than the defaults.
bench: $(STAMP)
	$(BIN)/fastprefix-bench

bench-publish: $(STAMP)
	$(BIN)/fastprefix-bench publish $(RUN)

bench-ops: $(STAMP)
	# importlib mode: the repo root must not land on sys.path (its kernels/ would pose as HF's `kernels`)
	$(BIN)/pytest benchmarks --import-mode=importlib -q -p no:cacheprovider --benchmark-only

fitness: $(STAMP)
	$(BIN)/python -P -m fastprefix.kernels.fitness

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info

# ---------------------------------------------------------------- on a CUDA machine (README: "On a GPU")
# The machine's own python3 with its torch, triton, transformers, peft and pytest: no .venv, no network.
# `make gpu` runs both suites even if the first fails (one GPU session must bring back every number), and
# fails if either did. Budget: gpu-test ~4 min, gpu-bench ~4 min on one H100; the timeouts are backstops.
GPU_PYTHON ?= python3
GPU_SHIM := $(CURDIR)/build/gpu-path
# compiled kernels: Triton reads "0" as off (tests/conftest.py only sets TRITON_INTERPRET when it is unset).
# Everything runs from tests/: the repo root must not be on sys.path (its kernels/ would pose as HF's `kernels`).
# PYTHONPATH names the fallback tree of gpu-install (an absent folder on it is harmless).
GPU_ENV := TRITON_INTERPRET=0 PYTHONPATH=$(GPU_SHIM)$${PYTHONPATH:+:$$PYTHONPATH}

gpu:
	@rc=0; $(MAKE) --no-print-directory gpu-test || rc=1; $(MAKE) --no-print-directory gpu-bench || rc=1; exit $$rc

gpu-install:
	# fastprefix alone (editable, no dependencies, no build isolation, no index: nothing is downloaded). The tree
	# itself is not importable as is (setup.py maps kernels/ and benchmarks/ into the package), so install, then
	# check the mapped subpackage imports (a pip below 23.1 "succeeds" through `setup.py develop`, which ignores
	# package_dir); where pip can't or the check fails, build that mapping from symlinks and run from the tree.
	@if PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1 \
		$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e . && \
		(cd tests && $(GPU_PYTHON) -c "import fastprefix.kernels.attention.dispatch, fastprefix.benchmarks.gpu"); \
	then rm -rf $(GPU_SHIM); \
	else echo "pip could not install fastprefix importably: running it from the tree via $(GPU_SHIM)"; \
		rm -rf $(GPU_SHIM) && mkdir -p $(GPU_SHIM)/fastprefix && \
		for f in $(CURDIR)/fastprefix/*; do ln -s $$f $(GPU_SHIM)/fastprefix/; done && \
		ln -s $(CURDIR)/kernels $(GPU_SHIM)/fastprefix/kernels && \
		ln -s $(CURDIR)/benchmarks $(GPU_SHIM)/fastprefix/benchmarks && \
		(cd tests && PYTHONPATH=$(GPU_SHIM) $(GPU_PYTHON) -c "import fastprefix.kernels.attention.dispatch"); fi

gpu-versions: gpu-install
	cd tests && $(GPU_ENV) $(GPU_PYTHON) -m fastprefix.benchmarks.gpu

gpu-test: gpu-versions
	cd tests && $(GPU_ENV) timeout 300 $(GPU_PYTHON) -m pytest gpu/test_gpu_kernels.py gpu/test_gpu_transformers.py \
		-m cuda -q -p no:cacheprovider -rs --durations=15

gpu-bench: gpu-versions
	# writes benchmarks/results/<gpu-name>.{md,json,png} (after every group, so a timeout keeps what ran)
	cd tests && $(GPU_ENV) timeout 270 $(GPU_PYTHON) -m fastprefix.benchmarks --suite gpu \
		--out-dir $(CURDIR)/benchmarks/results
