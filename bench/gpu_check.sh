#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the one-shot GPU check of lowrank_kernels.
#
# For an H100/H200 machine with torch and triton preinstalled (plain python3, no venv) and
# no network: nothing is installed, downloaded or built (the CUDA path is Triton + the
# reference; the C++ extension is CPU-only). Five checks, under one budget (default 470 s,
# GPU_CHECK_BUDGET), each under `timeout`:
#   1. the test suite on CUDA: every test that takes the `device` fixture, on CUDA tensors
#      (LOWRANK_KERNELS_TEST_DEVICE=cuda: projection, DCT, quant kernels, INT4 tile loader,
#      batched DCT, the optimizers), then `pytest -m gpu`;
#   2. determinism: `python -m lowrank_kernels._determinism --device cuda`: two fresh
#      processes, GaLoreAdamW and DCTAdamW steps each, bitwise-equal weights and DCT
#      indices, the tile configs each process chose printed;
#   3. int64 offsets: `python -m bench.gpu_int64_check`: back-projection into a bf16 weight
#      of more than 2^31 elements at rank 8 (sampled rows vs float64), DCT scores of a
#      48x4096x11008 bf16 stack (each matrix vs float64);
#   4. the compile table for the running arch, `python -m lowrank_kernels.compile_check
#      --arch <arch>` (started first, in the background: it needs the CPUs, not the GPU),
#      then `python -m bench.gpu_kernel_report`: what the runtime reports (registers,
#      spills, shared memory) for the kernels it compiled, appended to that table and
#      matched against it;
#   5. `python -m bench.bench_step --gpu-check`: the 4-layer LLaMA-1B-shaped stack (bf16,
#      rank 512) against torch's fused AdamW in the same run, host time per parameter on
#      its own line; the INT4-projector step over the bf16 step at 4096x11008 rank 512;
#      then `python -m bench.bench_refresh --gpu-check`: the whole-stack DCT refresh of the
#      same stack (DCTAdamW's one list call per shape, target <= 1.5 ms, vs one call per
#      matrix and PyTorch's unfused scoring; the list's indices checked against per-matrix).
# OUTDIR receives 6 files: gpu_check.log (everything printed), determinism.txt, int64.csv,
# compile_sm<arch>.csv, step.csv, refresh.csv. Exit status: 0 when every check passed, else the number
# of checks that failed (a check that runs out of time fails).
#
# GPU_CHECK_DRY=1: a CPU dry run of the same steps at tiny sizes (Triton interpreter; tests
# only collected, or not at all with GPU_CHECK_DRY_COLLECT=0; compile_check only located), so
# the script cannot rot (python_tests/test_gpu_check.py runs it).
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-470}"
COMPILE_SUBSET="${GPU_CHECK_COMPILE_SUBSET:-ci}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # never reach for the network
export MPLBACKEND=Agg
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1        # Triton kernels in the interpreter, on CPU tensors
  DEVICE=cpu
else
  export TRITON_INTERPRET=0        # real Triton kernels on the GPU (conftest only sets it when unset)
  DEVICE=cuda
fi

FAILED=0
FAILED_NAMES=""
left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap N R: the smaller of N and what is left minus a reserve of R seconds (at least 10)
cap() {
  local n=$1 r=$2 l
  l=$(( $(left) - r ))
  [ "$l" -lt "$n" ] && n=$l
  [ "$n" -lt 10 ] && n=10
  echo "$n"
}
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $* ==="; }
fail() { FAILED=$((FAILED + 1)); FAILED_NAMES="$FAILED_NAMES $1"; }
run_timed() {  # run_timed SECONDS NAME CMD...: run under timeout; log the outcome; return its status
  local secs=$1 name=$2 rc
  shift 2
  timeout -s INT -k 10 "$secs" "$@"
  rc=$?
  if [ $rc -eq 124 ]; then
    echo ">>> $name: FAILED: stopped by its time limit (${secs}s)"
  elif [ $rc -ne 0 ]; then
    echo ">>> $name: FAILED rc=$rc"
  else
    echo ">>> $name: ok"
  fi
  return $rc
}
have_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# ----------------------------------------------------------------------------- 0. environment
step "environment (dry run: $DRY, budget ${BUDGET}s, out $OUT)"
date -u
git log -1 --format='commit %h %s' 2>/dev/null || true
git status --porcelain 2>/dev/null | head -5
if [ "$DRY" != "1" ]; then
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi unavailable"
fi
ARCH=$(timeout 120 "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
import triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}",
      file=sys.stderr)
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        print("none")
        sys.exit(1)
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}",
          file=sys.stderr)
    print(f"{p.major}{p.minor}")
else:
    print("90")  # dry run: the table of the usual target
EOF
)
if [ "$ARCH" = "none" ] || [ -z "$ARCH" ]; then
  echo ">>> no usable CUDA device: nothing to check"
  exit 1
fi
echo "arch: sm_$ARCH"
CSV_COMPILE="$OUT/compile_sm$ARCH.csv"
COMPILE_LOG="$(mktemp)"

# ----------------------------------------------------------------------------- 4a. compile table (background)
COMPILE_PID=""
if ! have_module lowrank_kernels.compile_check; then
  echo ">>> lowrank_kernels.compile_check: MISSING (module not found)"
elif [ "$DRY" = "1" ]; then
  echo ">>> compile_check: present (dry run: not compiled; python_tests runs it for sm_80/sm_90)"
else
  step "compile table for sm_$ARCH (background, --subset $COMPILE_SUBSET)"
  JOBS=$(( $(nproc 2>/dev/null || echo 8) / 2 ))  # the other half: the tests (Triton compiles, pytest-xdist)
  [ "$JOBS" -lt 2 ] && JOBS=2
  timeout -s INT -k 10 "$(cap 300 60)" "$PY" -m lowrank_kernels.compile_check --arch "$ARCH" --subset "$COMPILE_SUBSET" \
    --jobs "$JOBS" --out "$CSV_COMPILE" >"$COMPILE_LOG" 2>&1 &
  COMPILE_PID=$!
fi

# ----------------------------------------------------------------------------- 1. tests on CUDA
step "1. tests on $DEVICE: LOWRANK_KERNELS_TEST_DEVICE=$DEVICE (every test taking the 'device' fixture)"
if [ "$DRY" = "1" ] && [ "${GPU_CHECK_DRY_COLLECT:-1}" = "0" ]; then
  echo ">>> dry run: collection skipped (GPU_CHECK_DRY_COLLECT=0)"
elif [ "$DRY" = "1" ]; then
  # The selection a GPU run makes, collected only (running the suite here is `make test`'s job).
  LOWRANK_KERNELS_TEST_DEVICE=cuda run_timed "$(cap 120 60)" "pytest --collect-only (device=cuda selection)" \
    "$PY" -m pytest python_tests --collect-only -q -p no:cacheprovider || fail tests
else
  # pytest-xdist (in the GPU image) spreads the Triton compiles over processes; they share
  # Triton's on-disk kernel cache and the one GPU.
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_TEST_PROCS:-6}")
  LOWRANK_KERNELS_TEST_DEVICE=cuda run_timed "$(cap 220 200)" "pytest device=cuda" \
    "$PY" -m pytest python_tests -q -rfEs -p no:cacheprovider --maxfail=20 "${XDIST[@]}" || fail tests-device
  step "1b. pytest -m gpu"
  run_timed "$(cap 90 170)" "pytest -m gpu" \
    "$PY" -m pytest python_tests -m gpu -q -rfEs -p no:cacheprovider || fail tests-gpu
fi

# ----------------------------------------------------------------------------- 2. determinism
step "2. determinism: two fresh processes, GaLoreAdamW + DCTAdamW, bitwise-equal weights and indices"
if have_module lowrank_kernels._determinism; then
  run_timed "$(cap 90 130)" "determinism" "$PY" -m lowrank_kernels._determinism --device "$DEVICE" --steps 3 \
    >"$OUT/determinism.txt" 2>&1
  rc=$?
  cat "$OUT/determinism.txt"
  [ $rc -eq 0 ] || fail determinism
else
  echo ">>> lowrank_kernels._determinism: MISSING (module not found)" | tee "$OUT/determinism.txt"
  fail determinism
fi

# ----------------------------------------------------------------------------- 3. int64 offsets
step "3. int64 offsets: >2^31-element bf16 back-projection (rank 8), 48x4096x11008 bf16 DCT scores"
INT64_ARGS=()
[ "$DRY" = "1" ] && INT64_ARGS+=(--tiny)
run_timed "$(cap 120 100)" "gpu_int64_check" "$PY" -m bench.gpu_int64_check "${INT64_ARGS[@]}" \
  --device "$DEVICE" --out "$OUT/int64.csv" || fail int64

# ----------------------------------------------------------------------------- 5. step figures
step "5. optimizer step: 4-layer LLaMA-1B stack vs fused AdamW; INT4 vs bf16 projector at 4096x11008; whole-stack DCT refresh"
STEP_ARGS=()
[ "$DRY" = "1" ] && STEP_ARGS+=(--tiny)
run_timed "$(cap 120 40)" "bench_step --gpu-check" "$PY" -m bench.bench_step --gpu-check "${STEP_ARGS[@]}" \
  --out "$OUT/step.csv" || fail step
run_timed "$(cap 60 30)" "bench_refresh --gpu-check" "$PY" -m bench.bench_refresh --gpu-check "${STEP_ARGS[@]}" \
  --out "$OUT/refresh.csv" || fail refresh

# ----------------------------------------------------------------------------- 4b. compile table + runtime report
step "4. compile table for sm_$ARCH and what the runtime reports"
if [ -n "$COMPILE_PID" ]; then
  wait "$COMPILE_PID"
  rc=$?
  tail -n 40 "$COMPILE_LOG"
  if [ $rc -ne 0 ]; then
    echo ">>> compile_check: FAILED rc=$rc"
    fail compile
  else
    echo ">>> compile_check: ok ($(($(wc -l <"$CSV_COMPILE") - 1)) rows)"
  fi
  if [ -s "$CSV_COMPILE" ]; then
    run_timed "$(cap 90 0)" "gpu_kernel_report" "$PY" -m bench.gpu_kernel_report --compile-csv "$CSV_COMPILE" \
      || fail runtime-report
  else
    fail runtime-report
  fi
elif [ "$DRY" = "1" ]; then
  have_module lowrank_kernels.compile_check || fail compile
  run_timed "$(cap 90 0)" "gpu_kernel_report --tiny" "$PY" -m bench.gpu_kernel_report --tiny \
    || fail runtime-report
else
  fail compile
fi
rm -f "$COMPILE_LOG"

# ----------------------------------------------------------------------------- summary
step "done in $(( $(date +%s) - START ))s: $FAILED check(s) failed${FAILED_NAMES:+:$FAILED_NAMES}"
ls -la "$OUT"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the command returns
exit "$FAILED"
