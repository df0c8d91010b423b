# The two commands of the README: `make test` and `make bench`.
# Both create .venv if missing, install the pinned dependencies, build the C++
# extension, then run. A second run reuses .venv and the built extension.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP := $(VENV)/.ext-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: test test-triton36 bench build deps clean

$(PY):
	python3 -m venv $(VENV)

# torch 2.13.0 only where the venv has no torch (a GPU machine keeps its own).
$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements.txt
	touch $@

deps: $(DEPS_STAMP)

# Builds lowrank_kernels._C with ninja; serialized by a lock so that parallel
# invocations in one tree do not race on build/.
$(EXT_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	flock .venv/.build-lock $(PY) -m pip install --no-build-isolation --no-deps --use-pep517 -e .
	touch $@

build: $(EXT_STAMP)

test: build
	LOWRANK_KERNELS_EXPECT_EXT=1 TRITON_INTERPRET=1 $(PY) -m pytest python_tests -q $(PYTEST_ARGS)
	$(MAKE) test-triton36

# The Triton kernels under Triton 3.6, the version the GPU machines carry (requirements-triton36.txt):
# a side folder with that triton and its numpy (< 2.3) ahead of the main venv's on PYTHONPATH, the
# same torch; its own Triton cache. Runs the compile check's ci subset (sm_80/sm_90: compiles, no
# spill) and the interpreter tests of every kernel family (projection single and grouped, the
# moment formats, adam, DCT scoring single and list, quant).
TRITON36 := $(VENV)/triton36
TRITON36_STAMP := $(TRITON36)/.stamp
TRITON36_TESTS := python_tests/kernels python_tests/ops/test_projection_triton.py \
	python_tests/ops/test_projection_grouped.py python_tests/ops/test_moments_ops.py python_tests/ops/test_adam.py \
	python_tests/ops/test_dct_foreach.py python_tests/ops/test_quant.py

$(TRITON36_STAMP): requirements-triton36.txt | $(DEPS_STAMP)
	rm -rf $(TRITON36)
	$(PY) -m pip install --no-deps --target $(TRITON36) -r requirements-triton36.txt
	touch $@

test-triton36: build $(TRITON36_STAMP)
	PYTHONPATH=$(abspath $(TRITON36)) $(PY) -c "import numpy, triton; print('triton', triton.__version__, \
		'numpy', numpy.__version__); assert triton.__version__ == '3.6.0', triton.__file__"
	PYTHONPATH=$(abspath $(TRITON36)) TRITON_CACHE_DIR=$(abspath $(TRITON36))/cache LOWRANK_KERNELS_EXPECT_EXT=1 \
		TRITON_INTERPRET=1 $(PY) -m pytest $(TRITON36_TESTS) -q -p no:cacheprovider

bench: build
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.readme

clean:
	rm -rf build *.egg-info lowrank_kernels/*.so $(EXT_STAMP)
