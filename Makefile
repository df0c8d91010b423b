# Development commands (README.md, "Development"):
#   make test           set-up + the whole test suite (Triton kernels in the interpreter on CPU)
#   make bench          set-up + `python -m bench` into bench/out/ (untracked): a short summary
#   make bench-results  set-up + the benchmark into bench/results/ and docs/results.md (committed)
#   make build          set-up + build the C++ extension only
# The set-up creates .venv if missing, installs the pinned dependencies and builds the
# C++ extension; a second run reuses .venv and the built extension.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP := $(VENV)/.ext-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)
NSRC := $(words $(filter %.cpp,$(CSRC)))
BUILD_LOG := build/ext-build.log
TRITON36 := $(VENV)/triton36
TRITON36_STAMP := $(TRITON36)/.stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test test-triton36 bench bench-results build deps clean

$(PY):
	python3 -m venv $(VENV)

# torch 2.13.0 only where the venv has no torch (a GPU machine keeps its own).
$(DEPS_STAMP): requirements.txt requirements-nodeps.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	touch $@

deps: $(DEPS_STAMP)

# Builds lowrank_kernels._C with ninja (serialized by a lock so that parallel invocations
# in one tree do not race on build/). Prints one line per compiled file ("[i/n] csrc/...");
# pip's full output goes to $(BUILD_LOG), whose tail is printed if the build fails.
$(EXT_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	@mkdir -p build
	@echo "building lowrank_kernels._C: $(NSRC) C++ files with ninja (first build: a few minutes; log: $(BUILD_LOG))"
	@flock $(VENV)/.build-lock bash -o pipefail -c \
	  '$(PY) -m pip install -v --no-build-isolation --no-deps --use-pep517 -e . 2>&1 | tee $(BUILD_LOG) \
	   | sed -nuE -e "s@^ *(\[[0-9]+/[0-9]+\]) .* -c [^ ]*(csrc/[^ ]+) .*@  \1 \2@p" -e "/^Successfully installed/p"' \
	  || { echo "build failed; the end of $(BUILD_LOG):"; tail -n 40 $(BUILD_LOG); exit 1; }
	@touch $@

build: $(EXT_STAMP)

# The whole suite, then the kernel tests again under Triton 3.6 (test-triton36 below).
test: build $(TRITON36_STAMP)
	LOWRANK_KERNELS_EXPECT_EXT=1 TRITON_INTERPRET=1 $(PY) -m pytest python_tests -q $(PYTEST_ARGS)
	$(TRITON36_RUN)

# The Triton kernels under Triton 3.6, the version the GPU machines carry (requirements-triton36.txt):
# a side folder with that triton and its numpy (< 2.3) ahead of the main venv's on PYTHONPATH, the
# same torch; its own Triton cache. Runs the compile check's ci subset (sm_80/sm_90: compiles, no
# spill, the grouped kernels' fast-path rule) and the interpreter tests of every kernel family
# (projection single and grouped, the moment formats, adam, DCT scoring single and list, quant).
# Part of `make test` (docs/architecture.md, "GPU code checks": what it costs).
TRITON36_TESTS := python_tests/kernels python_tests/ops/test_projection_triton.py \
	python_tests/ops/test_projection_grouped.py python_tests/ops/test_moments_ops.py python_tests/ops/test_adam.py \
	python_tests/ops/test_dct_foreach.py python_tests/ops/test_quant.py

$(TRITON36_STAMP): requirements-triton36.txt | $(DEPS_STAMP)
	rm -rf $(TRITON36)
	$(PY) -m pip install --no-deps --target $(TRITON36) -r requirements-triton36.txt
	touch $@

define TRITON36_RUN
PYTHONPATH=$(abspath $(TRITON36)) $(PY) -c "import numpy, triton; print('triton', triton.__version__, \
	'numpy', numpy.__version__); assert triton.__version__ == '3.6.0', triton.__file__"
PYTHONPATH=$(abspath $(TRITON36)) TRITON_CACHE_DIR=$(abspath $(TRITON36))/cache LOWRANK_KERNELS_EXPECT_EXT=1 \
	TRITON_INTERPRET=1 $(PY) -m pytest $(TRITON36_TESTS) -q -p no:cacheprovider
endef

test-triton36: build $(TRITON36_STAMP)
	$(TRITON36_RUN)

# Writes only to bench/out/ (ignored by git): the checkout stays clean.
bench: build
	$(PY) -m bench $(BENCH_ARGS)

# Refreshes the committed results: bench/results/<device>.{csv,md,png} and docs/results.md.
bench-results: build
	$(PY) -m bench --update-results $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info lowrank_kernels/*.so $(EXT_STAMP)
