"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed):
no register spill, shared memory within the arch's opt-in maximum.

Runs ``python -m lowrank_kernels.compile_check --subset ci`` (a deterministic
representative set: every kernel, every projector mode and side, dtype mixes, ragged K,
int64 offsets, and every default tile of the tables; see the module doc) in a process
without ``TRITON_INTERPRET``. The full matrix (every variant x every tile autotuning may
try) is ``python -m lowrank_kernels.compile_check --subset full``: too slow for CI."""
import csv
import os
import subprocess
import sys

import pytest

L = pytest.importorskip("lowrank_kernels.kernels._launch")
cc = pytest.importorskip("lowrank_kernels.compile_check")

ARCHS = (80, 90)
KERNELS = {
    "_projection_project_adam_kernel", "_projection_backproject_apply_kernel", "_dct_gemm_kernel", "_dct_partial_sum_kernel",
    "_quant_int4_pack_kernel", "_quant_int4_unpack_kernel", "_quant_int8_quantize_kernel",
    "_quant_int8_dequantize_kernel", "_quant_int8_update_sr_kernel", "_adam_update_kernel", "_adam_update_q8_kernel",
    "_projection_project_adam_grouped_kernel", "_projection_backproject_apply_grouped_kernel",
    "_adam_update_grouped_kernel", "_adam_update_q8_grouped_kernel",
}
TILE_KERNEL = {"_projection_project_adam_kernel": "project", "_projection_backproject_apply_kernel": "backproject",
               "_dct_gemm_kernel": "dct_gemm", "_projection_project_adam_grouped_kernel": "project_grouped",
               "_projection_backproject_apply_grouped_kernel": "backproject_grouped"}


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cc") / "compile.csv"
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels.compile_check", "--arch", ",".join(map(str, ARCHS)),
                        "--subset", "ci", "--out", str(out), "-q"], capture_output=True, text=True, env=_env(),
                       timeout=1500)
    assert out.exists(), r.stderr[-3000:]
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == cc.COLUMNS
        data = list(reader)
    return r.returncode, r.stderr, data


def test_every_row_compiles_without_spills_within_shared_memory(rows):
    rc, err, data = rows
    bad = [r for r in data if r["status"] != "ok"]
    assert not bad, bad[:5]
    assert rc == 0, err[-3000:]
    for r in data:
        arch = int(r["arch"].removeprefix("sm_"))
        assert int(r["spills"]) == 0, r
        assert 0 < int(r["registers"]) <= 255, r
        assert int(r["shared_bytes"]) <= L.SMEM_LIMIT[arch], r


def test_kernels_list_is_every_triton_kernel_of_the_package():
    """A new ``*_kernel`` in ``lowrank_kernels/kernels/`` must be added to the compile check."""
    import importlib
    import pkgutil

    import triton

    import lowrank_kernels.kernels as pkg

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            # JITFunction, InterpretedFunction and the autotune/heuristics wrappers are all KernelInterfaces
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.KernelInterface):
                found.add(name)
    assert found == KERNELS


def test_every_kernel_and_arch_is_covered(rows):
    _, _, data = rows
    for arch in ARCHS:
        assert {r["kernel"] for r in data if r["arch"] == f"sm_{arch}"} == KERNELS


def test_every_default_tile_of_the_tables_was_compiled(rows):
    """The tiles launched without autotuning (every bucket, width and projector mode)."""
    _, _, data = rows
    for arch in ARCHS:
        for kname, tk in TILE_KERNEL.items():
            seen = {r["config"] for r in data if r["arch"] == f"sm_{arch}" and r["kernel"] == kname}
            for wide in (False, True):
                for mode in ((0, 1, 2) if tk != "dct_gemm" else (0, 2)):
                    for t in L.default_tiles(tk, arch, wide=wide, mode=mode):
                        assert t.label() in seen, (arch, kname, wide, mode, t)


def test_a_spilling_config_is_reported():
    """The check can fail: a 4-warp 128x64 tile of the INT4 project kernel spills on sm_80."""
    code = r"""
import sys
from lowrank_kernels import compile_check as cc
from lowrank_kernels.kernels import _launch as L
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
thunk = dict(cc._variants("full"))["proj_gbf16_mfp32_pfp32_right_int4_ragged"]
with L.capture() as caps:
    thunk()
c = [c for c in caps if c.tile_kernel == "project"][0]
meta = c.with_tile(L.Tile(128, 64, 64, 4, 3))
backend = make_backend(GPUTarget("cuda", 80, 32))
jf = c.kernel
bound, spec, opts = create_function_from_signature(jf.signature, jf.params, backend)(*c.args, **meta)
options, sig, constexprs, attrs = jf._pack_args(backend, meta, bound, spec, opts)
row = cc._compile(cc.Job(f"{jf.fn.__module__}:{jf.fn.__name__}", "spill", "x", 80, sig, constexprs, attrs,
                         dict(options.__dict__)))
print(row["status"], row["spills"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    status, spills = r.stdout.split()[-2:]
    assert status == "spills" and int(spills) > 0


def test_ptxas_log_parser():
    log = """ptxas info    : Function properties for k
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size"""
    assert cc._parse_ptxas(log) == {"registers": 255, "spill_stores": 8, "spill_loads": 12}
    assert cc._parse_ptxas("nothing here") is None


def test_refuses_to_run_under_the_interpreter():
    env = dict(_env(), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels.compile_check", "--arch", "90"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr


def test_bad_arch_argument():
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels.compile_check", "--arch", "75"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 2 and "arch 75 unsupported" in r.stderr


def test_runtime_option_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels.compile_check", "--arch", "90", "--runtime"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
