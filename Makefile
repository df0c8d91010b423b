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

.PHONY: test bench build deps clean

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

bench: build
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.readme

clean:
	rm -rf build *.egg-info lowrank_kernels/*.so $(EXT_STAMP)
