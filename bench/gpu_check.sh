#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the one-shot GPU check of lowrank_kernels.
#
# For a GPU machine with torch and triton preinstalled (plain python3, no venv) and
# no network: nothing is installed or downloaded. In one go, under one time budget:
#   1. environment: GPU, driver, python/torch/triton, which build tools exist;
#   2. build the C++ extension against that torch (setup.py build_ext --inplace; ninja
#      if present, else torch's distutils fallback; if setuptools itself cannot build,
#      torch.utils.cpp_extension.load as a last resort), then `python3 -m lowrank_kernels`;
#   3. the GPU tests: `pytest -m gpu` (includes the bench's tiny run on CUDA, which checks
#      every timed kernel against the reference), plus any test written against the
#      `device` fixture, run with LOWRANK_KERNELS_TEST_DEVICE=cuda;
#   4. the full benchmark, `python3 -m bench --device cuda`, with an internal time budget
#      so that it stops measuring, and still writes its CSV, plots and table, in time;
#   5. the pre-training demo's GPU preset, `python3 -m bench.convergence --gpu`.
# OUTDIR receives at most 5 files (the device tool returns 8 at most): gpu_check.log
# (everything printed), the bench's Markdown tables (<device>.md), convergence.csv, and
# results.tar.gz with every CSV, Markdown table, PNG plot and JSON file of steps 4-5, to
# unpack into bench/results/ (then `python -m bench.readme` updates the README).
#
# Budget: GPU_CHECK_BUDGET seconds in all (default 570, under the device's 600 s per
# command); every step runs under `timeout`, so a hang cannot eat the rest.
# Exit status: 0 when the build, the tests and the bench all succeeded, else the number
# of steps that failed.
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-570}"
# Seconds kept for the convergence demo at the end (its GPU preset, shortened to fit).
CONV_SECS="${GPU_CHECK_CONV_SECS:-100}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export TRITON_INTERPRET=0          # real Triton kernels on the GPU (conftest only sets it when unset)
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
export PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # never reach for the network
export MPLBACKEND=Agg
if [ -z "${LOWRANK_KERNELS_GIT_SHA:-}" ]; then
  LOWRANK_KERNELS_GIT_SHA="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  export LOWRANK_KERNELS_GIT_SHA
fi

FAILED=0
left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap N: the smaller of N and what is left minus a reserve of R seconds (at least 10)
cap() { local n=$1 r=$2 l; l=$(( $(left) - r )); [ "$l" -lt "$n" ] && n=$l; [ "$n" -lt 10 ] && n=10; echo "$n"; }
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $* ==="; }
run_timed() {  # run_timed SECONDS NAME CMD...: run under timeout; log the outcome
  local secs=$1 name=$2 rc
  shift 2
  timeout -s INT -k 15 "$secs" "$@"
  rc=$?
  if [ $rc -eq 124 ]; then
    echo ">>> $name: stopped by its time limit (${secs}s)"
  elif [ $rc -eq 5 ] && [ "${name#pytest}" != "$name" ]; then
    echo ">>> $name: no tests selected"
  elif [ $rc -ne 0 ]; then
    echo ">>> $name: FAILED rc=$rc"
  else
    echo ">>> $name: ok"
  fi
  return $rc
}

# ----------------------------------------------------------------------------- 1. environment
step "environment (budget ${BUDGET}s, MAX_JOBS=$MAX_JOBS, out $OUT)"
date -u
uname -a
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
  --format=csv 2>&1 || echo "nvidia-smi unavailable"
timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, shutil, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "setuptools", "wheel", "ninja", "pybind11", "numpy", "scipy", "pytest", "matplotlib",
             "tqdm", "galore-torch", "apollo-torch", "q-galore-torch", "transformers", "bitsandbytes"):
    try:
        print(f"  {name:15s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:15s} (not installed)")
print("  ninja binary   ", shutil.which("ninja") or "(none)")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
from torch.utils.cpp_extension import is_ninja_available
print("torch sees ninja:", is_ninja_available())
EOF

# ----------------------------------------------------------------------------- 2. build
step "build the C++ extension against this torch"
# A .so built elsewhere (another torch) must not be picked up.
rm -f lowrank_kernels/_C*.so
BUILD_OK=0
run_timed "$(cap 200 340)" "setup.py build_ext --inplace" "$PY" setup.py build_ext --inplace -j "$MAX_JOBS"
rc=$?
if [ $rc -eq 0 ]; then
  BUILD_OK=1
elif [ $rc -ne 124 ] && [ "$(left)" -gt 330 ]; then  # setuptools could not build (not a timeout): try torch's JIT
  step "fallback build: torch.utils.cpp_extension.load (JIT, ninja)"
  if run_timed "$(cap 200 330)" "cpp_extension.load" "$PY" - <<'EOF'
import glob, os, shutil, tempfile
from torch.utils.cpp_extension import load
src = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
build = tempfile.mkdtemp(prefix="lk_ext_")
mod = load(name="_C", sources=src, extra_include_paths=[os.path.abspath("csrc")],
           extra_cflags=["-O3", "-std=c++17"], build_directory=build, verbose=True)
# TORCH_EXTENSION_NAME is _C, so the module initialises as lowrank_kernels._C too.
shutil.copy(mod.__file__, os.path.join("lowrank_kernels", "_C" + os.path.splitext(mod.__file__)[1]))
print("copied", mod.__file__, "->", "lowrank_kernels/")
EOF
  then BUILD_OK=1; fi
fi
[ $BUILD_OK -eq 1 ] || { FAILED=$((FAILED + 1)); echo ">>> no C++ extension: the cpp backend is skipped, CUDA paths still run"; }
ls -la lowrank_kernels/*.so 2>/dev/null
timeout 120 "$PY" -m lowrank_kernels || FAILED=$((FAILED + 1))

# ----------------------------------------------------------------------------- 3. tests
# The benchmark keeps at least 250 s: the tests get what is left above that.
step "GPU tests: pytest -m gpu"
run_timed "$(cap 120 $((250 + CONV_SECS)))" "pytest -m gpu" "$PY" -m pytest python_tests -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
  || FAILED=$((FAILED + 1))

step "backend tests on CUDA tensors: LOWRANK_KERNELS_TEST_DEVICE=cuda (tests using the 'device' fixture)"
if ! grep -qs "LOWRANK_KERNELS_TEST_DEVICE" python_tests/conftest.py; then
  echo "conftest has no LOWRANK_KERNELS_TEST_DEVICE switch: skipped"
elif [ "$(( $(left) - 250 - CONV_SECS ))" -lt 30 ]; then
  echo "skipped: less than 30 s left above the benchmark's share"
else
  LOWRANK_KERNELS_TEST_DEVICE=cuda run_timed "$(cap 120 $((250 + CONV_SECS)))" "pytest device=cuda" \
    "$PY" -m pytest python_tests -q -rs -p no:cacheprovider --continue-on-collection-errors
  rc=$?
  if [ $rc -eq 5 ]; then echo ">>> (no test takes the device fixture yet: nothing to run)"
  elif [ $rc -ne 0 ]; then FAILED=$((FAILED + 1)); fi
fi

# ----------------------------------------------------------------------------- 4. benchmark
step "benchmark: python -m bench --device cuda (left: $(left)s)"
RES="$OUT/results"
mkdir -p "$RES"
# The convergence demo keeps CONV_SECS at the end; the bench gets the rest (at most 420 s).
BENCH_SECS=$(cap 420 $((CONV_SECS + 10)))
# The bench stops measuring 45 s before its hard limit, then writes CSV, plots and table.
run_timed "$BENCH_SECS" "python -m bench" "$PY" -m bench --device cuda --out "$RES" \
  --time-budget $((BENCH_SECS > 90 ? BENCH_SECS - 45 : BENCH_SECS / 2)) ${BENCH_ARGS:-} \
  || FAILED=$((FAILED + 1))

# ----------------------------------------------------------------------------- 5. convergence demo
step "pre-training demo: python -m bench.convergence --gpu (left: $(left)s)"
run_timed "$(cap "$CONV_SECS" 5)" "bench.convergence" "$PY" -m bench.convergence --gpu --no-progress \
  --out "$RES" ${CONV_ARGS:---steps 150} || FAILED=$((FAILED + 1))

# ----------------------------------------------------------------------------- 6. pack
# The device tool returns at most 8 files: the log, the tables as plain files, and
# everything (CSV, Markdown, PNG, JSON) in one archive to unpack into bench/results/.
step "done: $FAILED step(s) failed, $(( $(date +%s) - START ))s"
cp "$RES"/*.md "$RES"/convergence.csv "$OUT"/ 2>/dev/null
tar -C "$RES" -czf "$OUT/results.tar.gz" . && rm -rf "$RES"
ls -la "$OUT"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the command returns
exit $FAILED
