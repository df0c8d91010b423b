#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: the one-shot GPU check of lowrank_kernels, under 8 minutes on one H100.
#
# For a GPU machine with torch and triton preinstalled (plain python3, no venv) and no network:
# nothing is installed or downloaded; it runs under whatever Triton the machine has. Every check
# prints one line `check <name>: pass|fail|skip <figure>`; the last lines of the output repeat
# them all, and the exit status is the number of failed checks (a check with no line, one that
# crashed or ran out of time, fails). Checks, under one budget (default 450 s, GPU_CHECK_BUDGET),
# each under `timeout`:
#   build-extension  the C++ extension built against the machine's torch (ninja, no downloads; in
#                    the background, into a temporary folder, not into the tree) and one of its ops
#                    against the reference, from a copy of the package that holds it;
#   step-correctness the bench step's optimizers (GaLore, DCT, Q-GaLore INT4; one LLaMA-1B layer in
#                    bf16, rank 512) against a float64 twin on the reference backend, elementwise,
#                    and the bucketed step against foreach=False (python -m bench.gpu_checks);
#   graph-refresh    a whole training step (forward, backward, opt.step()) of capturable GaLoreAdamW
#                    / DCTAdamW captured in a CUDA graph, replayed across eager projector refreshes,
#                    equal to an eager run;
#   second-device    the same steps on cuda:1 bitwise equal to cuda:0 (skip with one GPU);
#   int64-grouped    more than 2^31 elements: single back-projection, grouped project+Adam (float32
#                    and 8-bit moments, both sides), grouped Adam (float32 and 8-bit), batched DCT
#                    scores, each sampled against the reference (python -m bench.gpu_int64_check);
#   determinism      two fresh processes, GaLoreAdamW + DCTAdamW, bitwise-equal weights and indices;
#   speed-rows       python -m bench.bench_step --gpu-check: the 4-layer LLaMA-1B stack against
#                    fused AdamW, like for like (16-bit moments vs fused AdamW on bf16 weights,
#                    float32 moments vs fused AdamW on float32 master weights, bucketed vs
#                    per-parameter) as ratios with their goals (reported, not enforced);
#   refresh-stack    python -m bench.bench_refresh --gpu-check (whole-stack DCT refresh, target
#                    <= 1.5 ms reported; the list's indices checked against per-matrix calls);
#   tests-smoke      the curated GPU test list first (the kernels and optimizers that matter most:
#                    GPU_CHECK_SMOKE), then tests-gpu-marked (`pytest -m gpu`), then tests-rest
#                    (every other test taking the `device` fixture, on CUDA, with the time left:
#                    running out of time there is not a failure); per-file pass/fail counts
#                    are printed for each, also when a run is stopped by its time limit;
#   compile-table    python -m lowrank_kernels.compile_check for the running arch (started first,
#                    in the background: it needs CPUs, not the GPU), then runtime-report
#                    (python -m bench.gpu_kernel_report: registers, spills, shared memory the
#                    runtime reports, matched against that table).
# The correctness checks (step-correctness .. determinism) run side by side on the GPU (they
# time nothing); the speed rows then run alone.
# OUTDIR receives 7 files: gpu_check.log (everything printed), determinism.txt, int64.csv,
# compile_sm<arch>.csv, step.csv, refresh.csv, tests.csv (per-file counts).
#
# GPU_CHECK_DRY=1: a CPU dry run of the same steps at tiny sizes (Triton interpreter; the
# extension already built here checked instead of a new build; compile_check only located; the
# test phases on GPU_CHECK_DRY_TESTS, a few fast CPU test files), so the script cannot rot
# (python_tests/test_gpu_check.py runs it and asserts every check line passes).
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
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
COMPILE_SUBSET="${GPU_CHECK_COMPILE_SUBSET:-ci}"
# The smoke list: the grouped kernels of the bucketed step (every projector kind, dtype mix and
# moment format), capturable steps, and every optimizer against the reference on the device
# (meant to take about 90 s on an H100, Triton compiles included; not yet timed on one).
SMOKE="${GPU_CHECK_SMOKE:-python_tests/ops/test_projection_grouped.py python_tests/optim/test_capturable.py python_tests/optim/test_device_backends.py}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
WORK="$(mktemp -d)"
: >"$LOG"
: >"$WORK/summary"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # `bench` for pytest's -p plugin (xdist workers too)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # never reach for the network
export MPLBACKEND=Agg
if [ "$DRY" = "1" ]; then
  export TRITON_INTERPRET=1        # Triton kernels in the interpreter, on CPU tensors
  DEVICE=cpu
  TINY=(--tiny)
  SMOKE="${GPU_CHECK_DRY_TESTS:-python_tests/kernels/test_quant_nonfinite.py}"
else
  export TRITON_INTERPRET=0        # real Triton kernels on the GPU (conftest only sets it when unset)
  DEVICE=cuda
  TINY=()
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap N R: the smaller of N and what is left minus a reserve of R seconds (0: no time left)
cap() {
  local n=$1 r=$2 l
  l=$(( $(left) - r ))
  [ "$l" -lt "$n" ] && n=$l
  [ "$n" -lt 0 ] && n=0
  echo "$n"
}
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $* ==="; }
# show FILE: print it and keep its check lines for the summary; say LINE: the same for one line
show() { cat "$1"; grep -E '^check [a-z0-9-]+: ' "$1" >>"$WORK/summary"; }
say() { echo "$1"; echo "$1" | grep -E '^check [a-z0-9-]+: ' >>"$WORK/summary"; }
have_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
# run_check SECS FILE "NAMES" CMD...: run CMD under timeout, its output into FILE; afterwards a
# `check NAME: fail` line for every NAME the command did not report (crash, time limit), and for
# the first NAME when it exited non-zero although every line it printed passed. NAME=rc:<name>:
# the command prints no check line; its exit status is the verdict.
run_check() {
  local secs=$1 file=$2 names=$3 rc name
  shift 3
  if [ "$secs" -le 0 ]; then
    echo "(no time left)" >"$file"
    rc=124
  else
    timeout -s INT -k 10 "$secs" "$@" >"$file" 2>&1
    rc=$?
  fi
  for name in $names; do
    if [ "${name#rc:}" != "$name" ]; then
      name=${name#rc:}
      if [ $rc -eq 0 ]; then
        echo "check $name: pass (exit status 0)" >>"$file"
      else
        echo "check $name: fail (exit status $rc$([ $rc -eq 124 ] && echo ": stopped by its ${secs}s time limit"))" >>"$file"
      fi
    elif ! grep -q "^check $name: " "$file"; then
      echo "check $name: fail (no result: exit status $rc$([ $rc -eq 124 ] && echo ", stopped by its ${secs}s time limit"))" >>"$file"
    fi
  done
  name=${names%% *}
  if [ $rc -ne 0 ] && [ "${name#rc:}" = "$name" ] && ! grep -q "^check [a-z0-9-]*: fail" "$file"; then
    echo "check $name: fail (exit status $rc after its checks)" >>"$file"
  fi
  return $rc
}

# ----------------------------------------------------------------------------- environment
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
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}",
              file=sys.stderr)
    p = torch.cuda.get_device_properties(0)
    print(f"{p.major}{p.minor}")
else:
    print("90")  # dry run: the table of the usual target
EOF
)
if [ "$ARCH" = "none" ] || [ -z "$ARCH" ]; then
  echo ">>> no usable CUDA device: nothing to check"
  echo "check environment: fail (no usable CUDA device)"
  rm -rf "$WORK"
  exit 1
fi
echo "arch: sm_$ARCH"
CSV_COMPILE="$OUT/compile_sm$ARCH.csv"
NPROC=$(nproc 2>/dev/null || echo 8)

# ----------------------------------------------------------------------------- background: extension, compile table
BUILD_PID=""
if [ "$DRY" != "1" ]; then
  step "background: build the C++ extension against this torch (ninja, into $WORK/ext)"
  mkdir -p "$WORK/ext"
  MAX_JOBS=$(( NPROC / 4 < 2 ? 2 : NPROC / 4 )) timeout -s INT -k 10 "$(cap 360 60)" nice -n 10 \
    "$PY" setup.py -q build_ext --build-lib "$WORK/ext/lib" --build-temp "$WORK/ext/tmp" >"$WORK/build.log" 2>&1 &
  BUILD_PID=$!
fi
COMPILE_PID=""
if ! have_module lowrank_kernels.compile_check; then
  echo ">>> lowrank_kernels.compile_check: MISSING (module not found)"
elif [ "$DRY" != "1" ]; then
  step "background: compile table for sm_$ARCH (--subset $COMPILE_SUBSET)"
  JOBS=$(( NPROC * 3 / 8 ))
  [ "$JOBS" -lt 2 ] && JOBS=2
  TRITON_INTERPRET=0 timeout -s INT -k 10 "$(cap 300 60)" nice -n 5 "$PY" -m lowrank_kernels.compile_check \
    --arch "$ARCH" --subset "$COMPILE_SUBSET" --jobs "$JOBS" --out "$CSV_COMPILE" >"$WORK/compile.log" 2>&1 &
  COMPILE_PID=$!
fi

# ----------------------------------------------------------------------------- correctness, side by side
step "correctness (side by side): step-correctness, graph-refresh, second-device | int64-grouped | determinism"
run_check "$(cap 170 230)" "$WORK/checks.out" "step-correctness graph-refresh second-device" \
  "$PY" -m bench.gpu_checks "${TINY[@]}" --device "$DEVICE" &
P1=$!
INT64_ARGS=("${TINY[@]}")
run_check "$(cap 170 230)" "$WORK/int64.out" "int64-grouped" \
  "$PY" -m bench.gpu_int64_check "${INT64_ARGS[@]}" --device "$DEVICE" --out "$OUT/int64.csv" &
P2=$!
if have_module lowrank_kernels._determinism; then
  run_check "$(cap 100 230)" "$OUT/determinism.txt" "rc:determinism" \
    "$PY" -m lowrank_kernels._determinism --device "$DEVICE" --steps 3 &
  P3=$!
else
  echo "lowrank_kernels._determinism: MISSING (module not found)" >"$OUT/determinism.txt"
  echo "check determinism: fail (lowrank_kernels._determinism: MISSING)" >>"$OUT/determinism.txt"
  P3=""
fi
wait "$P1" "$P2" ${P3:+"$P3"}
for f in "$WORK/checks.out" "$WORK/int64.out" "$OUT/determinism.txt"; do
  echo "--- $(basename "$f")"
  show "$f"
done

# ----------------------------------------------------------------------------- speed rows (alone on the GPU)
step "speed rows: 4-layer LLaMA-1B stack vs fused AdamW, like for like; INT4 vs bf16 projector; whole-stack DCT refresh"
run_check "$(cap 120 170)" "$WORK/step.out" "speed-rows" \
  "$PY" -m bench.bench_step --gpu-check "${TINY[@]}" --out "$OUT/step.csv"
show "$WORK/step.out"
run_check "$(cap 60 150)" "$WORK/refresh.out" "rc:refresh-stack" \
  "$PY" -m bench.bench_refresh --gpu-check "${TINY[@]}" --out "$OUT/refresh.csv"
show "$WORK/refresh.out"

# ----------------------------------------------------------------------------- tests: smoke list, -m gpu
COUNTS="$WORK/counts.tsv"
: >"$COUNTS"
XDIST=()
if [ "$DRY" != "1" ]; then
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_TEST_PROCS:-6}")
fi
# pytest_phase NAME SECS [--time-limit-ok] -- ENV... -- PYTEST_ARGS...: one test phase, counted per file
pytest_phase() {
  local name=$1 secs=$2 ok_flag="" rc
  shift 2
  if [ "$1" = "--time-limit-ok" ]; then ok_flag=--time-limit-ok; shift; fi
  shift  # --
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  if [ "$secs" -le 0 ]; then
    rc=124
    echo "(no time left for the $name tests)"
  else
    env "${envs[@]}" GPU_CHECK_TEST_COUNTS="$COUNTS" GPU_CHECK_TEST_PHASE="$name" \
      timeout -s INT -k 15 "$secs" "$PY" -m pytest -q -rfE -p no:cacheprovider -p bench.gpu_pytest_counts "$@" \
      >"$WORK/pytest-$name.out" 2>&1
    rc=$?
    tail -n 25 "$WORK/pytest-$name.out"
  fi
  "$PY" -m bench.gpu_pytest_counts "$COUNTS" --phase "$name" --rc "$rc" --csv "$OUT/tests.csv" $ok_flag \
    >"$WORK/counts-$name.out" 2>&1
  show "$WORK/counts-$name.out"
  grep -q "^check tests-$name: " "$WORK/counts-$name.out" || say "check tests-$name: fail (no counts)"
}
read -r -a SMOKE_FILES <<<"$SMOKE"
step "tests-smoke: the curated list on $DEVICE (LOWRANK_KERNELS_TEST_DEVICE=$DEVICE): ${SMOKE_FILES[*]}"
pytest_phase smoke "$(cap 120 110)" -- LOWRANK_KERNELS_TEST_DEVICE="$DEVICE" -- \
  "${XDIST[@]}" --maxfail=30 "${SMOKE_FILES[@]}"
step "tests-gpu-marked: pytest -m gpu"
if [ "$DRY" = "1" ]; then
  GPU_MARKED=("${SMOKE_FILES[@]}")   # the dry run: the selection only (nothing is marked gpu there)
else
  GPU_MARKED=(python_tests)
fi
pytest_phase gpu-marked "$(cap 80 90)" -- LOWRANK_KERNELS_TEST_DEVICE=cpu -- \
  "${XDIST[@]}" --maxfail=30 -m gpu "${GPU_MARKED[@]}"

# ----------------------------------------------------------------------------- compile table + runtime report
step "compile-table for sm_$ARCH and what the runtime reports"
if [ -n "$COMPILE_PID" ]; then
  secs=$(cap 60 40)
  ( sleep "$secs"; kill -INT "$COMPILE_PID" 2>/dev/null ) &
  WATCH=$!
  wait "$COMPILE_PID"
  rc=$?
  kill "$WATCH" 2>/dev/null
  tail -n 30 "$WORK/compile.log"
  rows=0
  [ -s "$CSV_COMPILE" ] && rows=$(( $(wc -l <"$CSV_COMPILE") - 1 ))
  bad=$(grep -c -v ',ok$' "$CSV_COMPILE" 2>/dev/null)
  bad=$(( ${bad:-1} - 1 ))
  if [ $rc -eq 0 ]; then
    say "check compile-table: pass $rows kernels compiled for sm_$ARCH (--subset $COMPILE_SUBSET), no spill, shared memory within the limit"
  else
    say "check compile-table: fail rc=$rc, $rows rows, $bad not ok (spills, shared memory or compile errors; see $(basename "$CSV_COMPILE"))"
  fi
  if [ -s "$CSV_COMPILE" ]; then
    run_check "$(cap 60 60)" "$WORK/report.out" "rc:runtime-report" \
      "$PY" -m bench.gpu_kernel_report --compile-csv "$CSV_COMPILE"
  else
    echo "check runtime-report: fail (no compile table to match against)" >"$WORK/report.out"
  fi
elif [ "$DRY" = "1" ]; then
  if have_module lowrank_kernels.compile_check; then
    say "check compile-table: pass (dry run: lowrank_kernels.compile_check present, not compiled here; python_tests/kernels/test_compile_check.py compiles the ci subset)"
  else
    say "check compile-table: fail (lowrank_kernels.compile_check: MISSING)"
  fi
  run_check "$(cap 90 20)" "$WORK/report.out" "rc:runtime-report" "$PY" -m bench.gpu_kernel_report --tiny
else
  say "check compile-table: fail (lowrank_kernels.compile_check: MISSING)"
  echo "check runtime-report: fail (no compile table)" >"$WORK/report.out"
fi
show "$WORK/report.out"

# ----------------------------------------------------------------------------- tests: the rest, with the time left
REST_IGNORE=()
for f in "${SMOKE_FILES[@]}"; do REST_IGNORE+=(--ignore "$f"); done
if [ "$DRY" = "1" ]; then
  REST=("${GPU_CHECK_DRY_REST:-python_tests/kernels/test_gather_mask.py}")
else
  REST=(python_tests "${REST_IGNORE[@]}")
fi
step "tests-rest: every other test taking the 'device' fixture on $DEVICE, with the time left ($(cap 100000 35)s)"
pytest_phase rest "$(cap 100000 35)" --time-limit-ok -- LOWRANK_KERNELS_TEST_DEVICE="$DEVICE" -- \
  "${XDIST[@]}" --maxfail=30 "${REST[@]}"

# ----------------------------------------------------------------------------- build-extension
step "build-extension"
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  rc=$?
  SO=$(find "$WORK/ext/lib" -name '_C*.so' 2>/dev/null | head -1)
  if [ $rc -ne 0 ] || [ -z "$SO" ]; then
    tail -n 30 "$WORK/build.log"
    say "check build-extension: fail (setup.py build_ext exit status $rc$([ $rc -eq 124 ] && echo ': stopped by its time limit'))"
  else
    mkdir -p "$WORK/pkg"
    cp -r lowrank_kernels "$WORK/pkg/"
    rm -f "$WORK"/pkg/lowrank_kernels/_C*.so
    cp "$SO" "$WORK/pkg/lowrank_kernels/"
    # From the copy: `lowrank_kernels` (with the new extension) comes from PYTHONPATH, not the tree.
    secs=$(cap 60 0)
    [ "$secs" -lt 15 ] && secs=15
    (cd "$WORK/pkg" && PYTHONPATH="$WORK/pkg" timeout "$secs" "$PY" "$ROOT/bench/gpu_checks.py" --only build-extension \
      >"$WORK/ext.out" 2>&1)
    rc=$?
    grep -q "^check build-extension: " "$WORK/ext.out" || echo "check build-extension: fail (exit status $rc)" >>"$WORK/ext.out"
    show "$WORK/ext.out"
  fi
elif [ "$DRY" = "1" ]; then
  if ls lowrank_kernels/_C*.so >/dev/null 2>&1; then
    run_check 60 "$WORK/ext.out" "build-extension" "$PY" -m bench.gpu_checks --only build-extension
    show "$WORK/ext.out"
  else
    say "check build-extension: skip (dry run: no extension built here)"
  fi
fi

# ----------------------------------------------------------------------------- summary
step "done in $(( $(date +%s) - START ))s"
FAILED=$(grep -c -E '^check [a-z0-9-]+: fail' "$WORK/summary")
echo "checks ($FAILED failed):"
cat "$WORK/summary"
ls -la "$OUT"
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the command returns
[ "$FAILED" -gt 255 ] && FAILED=255
exit "$FAILED"
