"""The shared Triton launch policy (lowrank_kernels/kernels/_launch.py): deterministic
tile choice, the per-arch tables, opt-in autotuning with rank 0's choice, and two fresh
processes stepping GaLoreAdamW / DCTAdamW to bitwise-equal results."""
import importlib
import os
import socket
import subprocess
import sys

import pytest
import torch

L = pytest.importorskip("lowrank_kernels.kernels._launch")
residual = pytest.importorskip("lowrank_kernels.kernels.residual")

KERNELS = ("project", "backproject", "dct_gemm")
FAKE_ARCHS = (80, 86, 87, 89, 90, 100, 120)


def _choose(kernel, arch, M, N, K, op_bytes, side="right", mode=0):
    return L.choose_config(kernel, arch, M=M, N=N, K=K, op_bytes=op_bytes, side=side, mode=mode)


# --------------------------------------------------------------------------- pure function of the key
@pytest.mark.parametrize("kernel", KERNELS)
def test_choice_is_a_pure_function_of_arch_shapes_dtypes(kernel):
    shapes = [(4096, 512, 11008), (16, 5000, 4096), (5000, 16, 300), (123, 77, 33), (1, 1, 1), (64, 65, 7)]
    first = {}
    for arch in FAKE_ARCHS:
        for shape in shapes:
            for op_bytes in ([2, 2], [4, 2], [4, 4], [2, 1]):
                for side in ("right", "left"):
                    for mode in (0, 1, 2):
                        t = _choose(kernel, arch, *shape, op_bytes, side, mode)
                        key = (arch, shape, tuple(op_bytes), side, mode)
                        first[key] = t
    # Same key, same answer, whatever was asked in between (no state, no timing).
    for key, t in reversed(list(first.items())):
        arch, shape, op_bytes, side, mode = key
        assert _choose(kernel, arch, *shape, list(op_bytes), side, mode) == t
    # The choice only depends on the arch's table, the operand width, the projector mode
    # and the shape bucket.
    for arch in FAKE_ARCHS:
        big16 = _choose(kernel, arch, 4096, 4096, 512, [2, 2])
        big32 = _choose(kernel, arch, 4096, 4096, 512, [4, 2])
        assert big16 != big32  # float32 operands take a smaller tile
        assert _choose(kernel, arch, 16, 4096, 512, [2, 2]).bm == 64  # rank-16 rows: 64-row tiles
        assert _choose(kernel, arch, 4096, 16, 512, [2, 2]).bn == 64


def test_arch_mapping_and_unknown_archs_get_the_smallest_table():
    assert L.table_arch(80) == 80 and L.table_arch(87) == 80
    assert L.table_arch(90) == 90
    for arch in (75, 86, 89, 100, 103, 120, 121):
        assert L.table_arch(arch) == 89  # 99 KB: fits every CUDA GPU of capability >= 8.0


def test_interpreter_tile_and_both_prefetch_variants():
    right = _choose("project", None, 500, 500, 500, [4, 4], "right")
    left = _choose("project", None, 500, 500, 500, [4, 4], "left")
    assert (right.bm, right.bn, right.bk, right.stages) == (64, 64, 64, 1)
    assert right.prefetch and not left.prefetch  # CI runs both variants of the projection kernels
    assert not _choose("dct_gemm", None, 500, 500, 500, [4, 4], "right").prefetch


def test_bad_key_raises():
    with pytest.raises(ValueError, match="unknown kernel 'gemm'"):
        _choose("gemm", 90, 10, 10, 10, [2, 2])
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        _choose("project", 90, 10, 10, 10, [2, 2], side="up")
    with pytest.raises(ValueError, match="mode must be 0"):
        _choose("project", 90, 10, 10, 10, [2, 2], mode=3)


# --------------------------------------------------------------------------- the tables fit their arch
@pytest.mark.parametrize("arch", L.TABLE_ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_table_tile_fits_shared_memory_estimate(kernel, arch):
    """Pipelined operand buffers within the arch's opt-in maximum (the compile check
    measures the real value: python_tests/kernels/test_compile_check.py)."""
    for wide, op_bytes in ((False, 2), (True, 4)):
        for mode in (0, 1, 2):
            for t in L.candidates(kernel, arch, wide=wide, mode=mode):
                assert t.smem_estimate(op_bytes) <= L.SMEM_LIMIT[arch], (kernel, arch, t)
                # dct scoring sizes its partial buffer for 64-wide tiles (kernels/dct.py:_partial_rows);
                # the other tables hold tiles of at least 16 (Fira's residual, on the back-projection
                # table, bounds its partial sums by 16-wide tiles)
                low = 64 if kernel == "dct_gemm" else residual._MIN_TILE
                assert t.bm >= low and t.bn >= low and t.warps in (4, 8) and t.stages >= 1
            assert set(L.default_tiles(kernel, arch, wide=wide, mode=mode)) <= set(
                L.candidates(kernel, arch, wide=wide, mode=mode))


def test_old_fixed_fp32_config_is_not_in_the_smaller_tables():
    """128x128x64 with 3 stages in float32 is ~192 KB: over A100's 163 KB and 99 KB cards."""
    old = L.Tile(128, 128, 64, 8, 3)
    assert old.smem_estimate(4) == 196608 > L.SMEM_LIMIT[80]
    for kernel in KERNELS:
        for arch in (80, 89):
            for mode in (0, 1, 2):
                assert all((t.bm, t.bn, t.bk, t.stages) != (128, 128, 64, 3)
                           for t in L.candidates(kernel, arch, wide=True, mode=mode))


# --------------------------------------------------------------------------- alignment-keyed entries
def test_unaligned_launches_take_the_unaligned_table_only_where_it_has_one():
    """``aligned=False`` changes the tile only of the kernels / archs / entries :data:`UNALIGNED`
    holds (Triton 3.6: 8-bit project + Adam with 16-bit operands; 4 warps aligned, 8 unaligned)."""
    shapes = [(4096, 512, 11008), (16, 5000, 4096), (5000, 16, 300), (123, 77, 33), (64, 768, 512)]
    for kernel in (*KERNELS, "project_q8", "project_q8_grouped", "project_grouped", "backproject_grouped"):
        for arch in FAKE_ARCHS:
            for shape in shapes:
                for op_bytes in ([2, 2], [4, 2], [4, 4]):
                    for mode in (0, 1, 2):
                        kw = dict(M=shape[0], N=shape[1], K=shape[2], op_bytes=op_bytes, mode=mode,
                                  qblock=256 if kernel.startswith("project_q8") else 0)
                        a = L.choose_config(kernel, arch, aligned=True, **kw)
                        u = L.choose_config(kernel, arch, aligned=False, **kw)
                        assert L.choose_config(kernel, arch, **kw) == a  # aligned is the default
                        table = L.UNALIGNED.get((kernel, L.table_arch(arch)))
                        if table is None or table == L.TABLES[(kernel, L.table_arch(arch))]:
                            assert u == a, (kernel, arch, shape, op_bytes, mode)
                        wide = max(op_bytes) >= 4
                        assert u in L.candidates(kernel, arch, wide=wide, mode=mode, qblock=kw["qblock"] or 256,
                                                 aligned=False)
    if L.TRITON_VERSION >= (3, 7):
        assert not L.UNALIGNED
        return
    for kernel in ("project_q8", "project_q8_grouped"):
        for arch in (80, 86, 89, 90):
            for M, N in ((64, 768), (512, 768), (512, 64)):  # every bucket
                kw = dict(M=M, N=N, K=512, op_bytes=[2, 2], mode=1, side="left", qblock=256)
                assert L.choose_config(kernel, arch, aligned=True, **kw).warps == 4
                assert L.choose_config(kernel, arch, aligned=False, **kw).warps == 8
            assert {t.warps for t in L.candidates(kernel, arch, wide=False, mode=1, aligned=True)} == {4}
            assert {t.warps for t in L.candidates(kernel, arch, wide=False, mode=1, aligned=False)} == {8}
    # sm_80, dense projector: the small-M tile's 4 warps only for aligned launches, so an unaligned
    # launch (rank 300) never tries them, not even as an autotuning candidate
    kw = dict(M=24, N=768, K=512, op_bytes=[2, 2], mode=0, side="left", qblock=256)
    assert L.choose_config("project_q8", 80, aligned=True, **kw).warps == 4
    assert L.choose_config("project_q8", 80, aligned=False, **kw).warps == 8
    assert {t.warps for t in L.candidates("project_q8", 80, wide=False, aligned=False)} == {8}
    assert L.choose_config("project_q8", 90, aligned=False, **kw) == L.choose_config("project_q8", 90, **kw)


def test_launchers_pass_their_alignment_check_to_the_table():
    """The single 8-bit launcher's :func:`q8_aligned` and the grouped launcher's sub-lists reach
    the recorded key, so the compile check re-tiles each launch as the launcher would."""
    from lowrank_kernels.kernels import moments as km
    from lowrank_kernels.kernels import projection as kp
    from lowrank_kernels.kernels import projection_grouped as kg

    meta = torch.device("meta")

    def E(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=meta)

    def single(m, n, r, offset=0):
        grad = E(m * n + offset, dtype=torch.bfloat16)[offset:].view(m, n)
        ea, eas = E(r, n, dtype=torch.uint8), E(r, n, dtype=torch.uint8)
        ab = (r, -(-n // 256))
        fmt = km.moment_format("test", ea, eas, E(*ab), E(*ab), 256, -1)
        with L.capture() as caps:
            kp._launch_project_adam(grad, E(m, r, dtype=torch.bfloat16), ea, eas, "left", 0.9, 0.999, 1e-8, fmt)
        (c,) = caps
        return c.key["aligned"]

    assert single(512, 768, 64) is True
    assert single(512, 768, 24) is True  # an odd rank: the projector is not checked (q8_aligned)
    assert single(300, 200, 24) is False  # N, K not multiples of 16
    assert single(512, 768, 64, offset=1) is False  # gradient 2 bytes off a 16-byte boundary
    # plain moments: no alignment-keyed entry, recorded as aligned
    with L.capture() as caps:
        kp._launch_project_adam(E(300, 200), E(300, 24), E(24, 200), E(24, 200), "left", 0.9, 0.999, 1e-8)
    assert caps[0].key["aligned"] is True

    shapes = [(512, 768, 64), (256, 128, 32), (300, 200, 24)]
    with L.capture() as caps:
        kg.projection_foreach_project_update_backproject_triton(
            [E(m, n) for m, n, _ in shapes], [E(m, n) for m, n, _ in shapes], [E(m, r) for m, _, r in shapes],
            [E(r, n, dtype=torch.uint8) for _, n, r in shapes], [E(r, n, dtype=torch.uint8) for _, n, r in shapes],
            "left", [1e-3] * 3, 0.9, 0.999, 1e-8, [2] * 3, [0.0] * 3, [1.0] * 3, (), (), (), (), 0,
            [E(r, -(-n // 256)) for _, n, r in shapes], [E(r, -(-n // 256)) for _, n, r in shapes], 256, ())
    q8 = [c for c in caps if c.tile_kernel == "project_q8_grouped"]
    assert sorted(c.key["aligned"] for c in q8) == [False, True]
    for c in q8:
        assert c.meta["ALIGNED"] == c.key["aligned"]
        assert c.tile_for(90) == L.choose_config("project_q8_grouped", 90, **c.key)


# --------------------------------------------------------------------------- autotuning is opt-in
@pytest.mark.parametrize("value,expected", [(None, False), ("0", False), ("1", True), ("yes", False)])
def test_autotune_env_default_off(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("LOWRANK_KERNELS_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LOWRANK_KERNELS_TRITON_AUTOTUNE", value)
    try:
        assert importlib.reload(L).AUTOTUNE is expected
    finally:
        monkeypatch.delenv("LOWRANK_KERNELS_TRITON_AUTOTUNE", raising=False)
        importlib.reload(L)


def test_cpu_launch_ignores_autotune_and_uses_the_table(monkeypatch):
    """Without a CUDA device (interpreter) the table's tile is launched even with AUTOTUNE on."""
    monkeypatch.setattr(L, "AUTOTUNE", True)
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, kw))

    tile = L.launch_gemm("project", FakeKernel(), lambda t: (t.bm,), (), {"X": 1}, device=torch.device("cpu"),
                         M=100, N=100, K=70, op_bytes=[4, 4], side="left")
    assert tile == _choose("project", None, 100, 100, 70, [4, 4], "left")
    (grid, kw), = calls
    assert grid == (tile.bm,) and kw["X"] == 1 and kw["enable_fp_fusion"] is L.FP_FUSION["projection"]
    assert kw["EVEN_K"] is (70 % tile.bk == 0) and kw["BLOCK_K"] == tile.bk


def test_autotune_restores_outputs_and_takes_the_fastest(monkeypatch):
    """The autotuner times every candidate, restores what the kernel wrote after each trial."""
    out = torch.zeros(4)
    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*a, BLOCK_M, BLOCK_N, BLOCK_K, **kw):
                assert torch.equal(out, torch.zeros(4))  # restored before every trial
                out.add_(1.0)
                seen.append((BLOCK_M, BLOCK_N, BLOCK_K, kw["num_stages"]))
            return run

    cands = L.candidates("dct_gemm", 90, wide=False)
    assert len(cands) >= 3
    fastest = 2
    times = iter(range(len(cands)))

    def fake_bench(fn, warmup, rep):
        i = next(times)
        fn()
        return 1.0 if i == fastest else 5.0

    monkeypatch.setattr(L.triton.testing, "do_bench", fake_bench)
    tile = L._autotune("dct_gemm", FakeKernel(), lambda t: (1,), (), {}, torch.device("cpu"), 90, False, 64, (out,))
    assert tile == cands[fastest]
    assert len(seen) == len(cands) and torch.equal(out, torch.zeros(4))


# --------------------------------------------------------------------------- rank 0's choice
def _bcast_worker(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = L.broadcast_choice(3 if rank == 0 else 5, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_broadcast_choice_uses_rank_zero():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as mgr:
        results = mgr.dict()
        mp.spawn(_bcast_worker, args=(port, results), nprocs=2, join=True)
        assert dict(results) == {0: 3, 1: 3}
    assert L.broadcast_choice(7, torch.device("cpu")) == 7  # not initialized: own choice


# --------------------------------------------------------------------------- two fresh processes
def test_two_processes_step_to_bitwise_equal_weights_and_indices():
    """python -m lowrank_kernels._determinism: GaLoreAdamW and DCTAdamW on the C++ backend
    and on the Triton kernels (interpreter), two fresh processes, equal digests."""
    from lowrank_kernels.ops import _registry as reg

    backends = ["cpp"] if reg.why_unavailable(reg.OPS["projection_project_adam"], "cpp", torch.device("cpu")) is None \
        else []
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    if not backends:
        pytest.skip("neither the C++ extension nor the Triton interpreter is available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lowrank_kernels._determinism", "--device", "cpu",
                        "--backend", ",".join(backends), "--steps", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "determinism: PASS" in r.stdout
    for b in backends:
        assert f"{b}/galore_weights: equal" in r.stdout and f"{b}/dct_indices: equal" in r.stdout
    if "triton" in backends:
        assert "config project" in r.stdout and "config dct_gemm" in r.stdout  # the chosen tiles are printed
