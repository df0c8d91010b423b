"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed):
no register spill, shared memory within the arch's opt-in maximum, and every grouped
(multi-tensor) kernel launched for an aligned sub-list keeps its single-kernel counterpart's
vector loads and cp.async pipeline (the PTX columns ``vector_loads``, ``cp_async``; see
``compile_check.check_counterparts``).

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
    "_adam_update_grouped_kernel", "_adam_update_q8_grouped_kernel", "_residual_kernel", "_residual_grouped_kernel",
    "_ns_sumsq_kernel", "_ns_normalize_kernel", "_ns_gram_kernel", "_ns_poly_kernel", "_ns_update_kernel",
    "_adafactor_scale_grouped_kernel",
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


GROUPED = {"_projection_project_adam_grouped_kernel", "_projection_backproject_apply_grouped_kernel",
           "_adam_update_grouped_kernel", "_adam_update_q8_grouped_kernel"}


def test_grouped_kernels_keep_the_single_kernels_fast_path(rows):
    """Every grouped kernel has, per arch, rows of an aligned sub-list compared with a
    single-kernel counterpart (at least its vector loads, cp.async where it has them: a
    ``slow_path`` status otherwise) and rows of an unaligned sub-list that say why they are not."""
    _, _, data = rows
    assert set(cc.GROUPED_COUNTERPART) == GROUPED
    for arch in ARCHS:
        mine = [r for r in data if r["arch"] == f"sm_{arch}" and r["kernel"] in GROUPED]
        for k in GROUPED:
            assert any(r["kernel"] == k and r["counterpart"] for r in mine), (arch, k)
            assert any(r["kernel"] == k and r["reason"] == cc.UNALIGNED_REASON for r in mine), (arch, k)
        for r in mine:
            assert bool(r["counterpart"]) != bool(r["reason"] == cc.UNALIGNED_REASON), r
            assert not r["status"].startswith("slow_path"), r
            if r["counterpart"]:
                single = cc.GROUPED_COUNTERPART[r["kernel"]]
                assert r["counterpart"].startswith(single + " " + r["config"] + " "), r
        # the aligned launches with a dense projector are pipelined and vectorized (what the rule
        # protects), under every Triton (3.6 and 3.9 checked)
        for r in mine:
            if r["counterpart"] and r["kernel"].startswith("_projection") and "_dense" in r["variant"]:
                assert int(r["vector_loads"]) > 0 and int(r["cp_async"]) > 0, r
    for r in data:
        assert r["stages"] and int(r["mma"]) >= 0 and int(r["scalar_loads"]) >= 0, r


def _row(kernel, vec, cp, status="ok", variant="v"):
    return {"kernel": kernel, "variant": variant, "config": "c", "status": status, "vector_loads": vec,
            "scalar_loads": 0, "cp_async": cp, "counterpart": "", "reason": ""}


def test_counterpart_rule(monkeypatch):
    """A grouped row with fewer vector loads, or no cp.async where its counterpart has some, is
    ``slow_path`` unless ``KNOWN_SLOWER`` gives a reason; equal or better rows stay ok."""
    g, s = "_projection_project_adam_grouped_kernel", "_projection_project_adam_kernel"
    job = cc.Job(g, "v", "c", 90, {}, {}, {}, {}, pair=0)
    cases = [((8, 12), (8, 12), "ok"), ((8, 12), (9, 3), "ok"), ((8, 12), (4, 12), "slow_path"),
             ((8, 12), (8, 0), "slow_path"), ((0, 0), (0, 0), "ok"), ((8, 0), (8, 0), "ok")]
    for (sv, sc), (gv, gc), want in cases:
        rows = [_row(s, sv, sc), _row(g, gv, gc)]
        cc.check_counterparts(rows, [cc.Job(s, "v", "c", 90, {}, {}, {}, {}), job])
        assert rows[1]["status"].split(":")[0] == want, ((sv, sc), (gv, gc), rows[1])
        assert rows[1]["counterpart"].startswith(s)
    monkeypatch.setattr(cc, "KNOWN_SLOWER", [(g, "v", "a reason")])
    rows = [_row(s, 8, 12), _row(g, 2, 0)]
    cc.check_counterparts(rows, [cc.Job(s, "v", "c", 90, {}, {}, {}, {}), job])
    assert rows[1]["status"] == "ok" and rows[1]["reason"] == "a reason"
    rows = [_row(g, 0, 0)]
    cc.check_counterparts(rows, [cc.Job(g, "v", "c", 90, {}, {}, {}, {}, reason=cc.UNALIGNED_REASON)])
    assert rows[0]["status"] == "ok" and rows[0]["reason"] == cc.UNALIGNED_REASON


def test_ptx_stats():
    ptx = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
	@!%p2 ld.global.v2.b16 { %rs1, %rs2 }, [ %rd3 + 0 ];
	ld.global.v4.b16 { %rs1, %rs2, %rs3, %rs4 }, [ %rd3 + 0 ];
	@%p3 ld.global.b16 { %rs3 }, [ %rd4 + 0 ];
	ld.global.b32 %r7, [ %rd5 + 0 ];
	ld.global.nc.b8 %rs9, [ %rd5 + 0 ];
	ld.global.b64 %rd6, [ %rd7 + 0 ];
	ld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r9 + 0 ];
	cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
	@%p1 cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x4, %r2;
	cp.async.commit_group;
	cp.async.wait_group 0;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1, %f2, %f3, %f4 }, { %r1 }, { %r2 }, { %f1 };
	wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 { %f1 }, %rd1, %rd2, p, 1, 1, 1, 1;
	wgmma.fence.sync.aligned;
	wgmma.commit_group.sync.aligned;
"""
    assert cc.ptx_stats(ptx) == {"vector_loads": 3, "scalar_loads": 3, "cp_async": 2, "mma": 2}


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


def test_arch_all_is_every_shared_memory_class():
    """``--arch all``: sm_80 (163 KB), sm_86 and sm_89 (99 KB), sm_90 (227 KB), each with a limit."""
    assert cc.ALL_ARCHS == (80, 86, 89, 90)
    assert all(a in L.SMEM_LIMIT for a in cc.ALL_ARCHS) and L.SMEM_LIMIT[86] == L.SMEM_LIMIT[89] == 99 * 1024
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels.compile_check", "--arch", "all", "--only",
                        "^adam_update_rfp32_mfp32$", "-q"], capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = list(csv.DictReader(r.stdout.splitlines()))
    assert sorted(x["arch"] for x in got) == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert all(x["status"] == "ok" for x in got)
