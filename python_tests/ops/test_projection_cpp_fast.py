"""The C++ float32 fast paths: the fused step (csrc/cpu/projection/fast_path.cpp; kernels in
csrc/cpu/fast_f32.h): float32 weights, gradients and plain moments with a float32
dense or DCT projector run on raw pointers with no ATen op at all.

- it matches the reference on odd shapes (1x1 .. 172x64), every rank from 1 to min(m, n),
  both sides, dense and DCT (int32 and int64 indices), with and without weight decay, over
  several steps, and on transposed / column-major / padded views of every operand;
- it is really taken: the profiler records no aten op inside the op (the general engine
  makes ~45 per parameter), for the single-tensor and the multi-tensor op, whose checks loop
  is then pure metadata reads too;
- the portable kernels (what a CPU without AVX2/FMA runs) match the reference and the AVX2
  kernels;
- every case it does not take (bf16, 8-bit or stochastically rounded moments, INT4
  projector, strided operands, big weights) runs the general engine, bit for bit as with
  the fast path switched off;
- the float32 INT4 route (csrc/cpu/projection/int4_path.cpp) gives the general engine's
  results bit for bit with fewer aten calls;
- the size bound follows the thread count;
- the elementwise Adam op (csrc/cpu/adam.cpp) on contiguous float32 data makes no aten op
  either and matches the reference.
"""
import importlib

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.reference import projection as ref

from .._numerics import assert_change_close, assert_matches_backend

OPS = torch.ops._lowrank_kernels  # the C++ kernels' private ops
BETAS = dict(beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture(autouse=True)
def _need_cpp():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    old = fast_path(1)
    yield
    fast_path(old)


def fast_path(mode=-1):
    """The private testing switch of the fast path (lowrank_kernels._C.projection_fast_path):
    -1 queries, 0 off, 1 on, 2 on with the portable kernels; returns the previous mode."""
    return importlib.import_module("lowrank_kernels._C").projection_fast_path(mode)


def aten_ops_inside(fn):
    """The aten ops the profiler records while ``fn`` runs (nested ones included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def _projector(kind, m, n, rank, side):
    """(proj, indices) as the _cpu ops take them, and the dense float64 P for the reference."""
    k = n if side == "right" else m
    if kind == "dense":
        q = torch.linalg.qr(torch.randn(k, rank, dtype=torch.float64))[0]
        p = (q.T if side == "right" else q).float().contiguous()
        return p, None
    basis = ops.dct_basis(k, torch.float32)
    idx = torch.randperm(k)[:rank].to(torch.int32 if kind == "dct32" else torch.int64)
    return basis, idx


def _state(m, n, rank, side):
    ls = (m, rank) if side == "right" else (rank, n)
    return torch.randn(m, n), 0.1 * torch.randn(ls), 0.1 * torch.rand(ls)


def _step(op_args, w, g, ea, eas, lr, step, wd, scale=0.5):
    p, idx, side = op_args
    OPS.projection_project_update_backproject_cpu(w, g, p, ea, eas, side, lr, BETAS["beta1"], BETAS["beta2"],
                                                   BETAS["eps"], step, wd, scale, idx)


def _ref_step(op_args, w, g, ea, eas, lr, step, wd, scale=0.5):
    p, idx, side = op_args
    ref.projection_project_update_backproject_ref(w, g, p, ea, eas, side, lr, BETAS["beta1"], BETAS["beta2"],
                                                  BETAS["eps"], step, wd, scale, idx)


def _run_and_compare(op_args, w, g_list, ea, eas, wd, expect_fast=True, what=""):
    """Steps ``len(g_list)`` times with the C++ op on (w, ea, eas) in place and with the
    reference on clones; compares after every step (W by its change)."""
    rw, ra, rb = w.detach().clone(), ea.clone(), eas.clone()
    for t, g in enumerate(g_list, start=1):
        w_before = w.clone()
        ops_seen = aten_ops_inside(lambda: _step(op_args, w, g, ea, eas, 0.01, t, wd))
        if expect_fast:
            assert ops_seen == [], f"{what}: the fast path made aten calls {ops_seen[:8]}"
        else:
            assert ops_seen, f"{what}: expected the general engine (aten calls), saw none"
        _ref_step(op_args, rw, g, ra, rb, 0.01, t, wd)
        assert_matches_backend(ea, ra, f"{what} exp_avg step {t}", rtol=2e-5)
        assert_matches_backend(eas, rb, f"{what} exp_avg_sq step {t}", rtol=2e-5)
        assert_change_close(w, w_before, rw, f"{what} W step {t}", rtol=4e-5)
        rw.copy_(w)  # the next step from the same weight: the change of one step is compared


SHAPES = [(1, 1), (1, 9), (9, 1), (33, 17), (17, 33), (64, 172), (172, 64)]


def _ranks(m, n):
    lo = min(m, n)
    return sorted({1, max(1, lo // 3), lo - 1 if lo > 1 else 1, lo})


@pytest.mark.parametrize("kind", ["dense", "dct32", "dct64"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_fast_path_vs_reference_shapes_and_ranks(m, n, side, kind):
    for rank in _ranks(m, n):
        for wd in (0.0, 0.1):
            p, idx = _projector(kind, m, n, rank, side)
            w, ea, eas = _state(m, n, rank, side)
            grads = [torch.randn(m, n) for _ in range(3)]
            _run_and_compare((p, idx, side), w, grads, ea, eas, wd, what=f"{m}x{n} r{rank} {side} {kind} wd={wd}")


def _layout(t, how):
    """The same values in another memory layout: 'T' column-major, 'pad' row-major inside a
    wider buffer (leading dimension > columns), 'Tpad' column-major inside a taller one."""
    if how == "T":
        return t.T.contiguous().T
    if how == "pad":
        buf = torch.full((t.shape[0], t.shape[1] + 5), float("nan"))
        buf[:, 2:2 + t.shape[1]] = t
        return buf[:, 2:2 + t.shape[1]]
    if how == "Tpad":
        return _layout(t.T, "pad").T
    return t


@pytest.mark.parametrize("kind", ["dense", "dct64"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("what", ["grad", "param", "moments", "proj", "all"])
@pytest.mark.parametrize("how", ["T", "pad", "Tpad"])
def test_fast_path_layouts(how, what, side, kind):
    """Column-major and padded views of each operand still take the fast path (the kernels
    take any leading dimension; small operands are copied where a kernel wants rows) and
    match; a padded buffer's other elements are left alone."""
    m, n, rank = 37, 23, 5
    p, idx = _projector(kind, m, n, rank, side)
    w, ea, eas = _state(m, n, rank, side)
    grads = [torch.randn(m, n) for _ in range(2)]
    if what in ("grad", "all"):
        grads = [_layout(g, how) for g in grads]
    if what in ("param", "all"):
        w = _layout(w, how)
    if what in ("moments", "all"):
        ea, eas = _layout(ea, how), _layout(eas, how)
    if what in ("proj", "all") and kind == "dense":
        p = _layout(p, how)
    _run_and_compare((p, idx, side), w, grads, ea, eas, 0.1, what=f"{how} {what} {side} {kind}")
    for t in (w, ea, eas):
        if t._base is not None:  # the padding stays NaN: only the view's elements were written
            assert int(torch.isnan(t._base).sum()) == t._base.numel() - t.numel()


def test_fast_path_moments_in_different_layouts():
    """exp_avg row-major, exp_avg_sq column-major: no common unit-stride dimension for runs of
    both, so the general engine runs (and matches); a rank-1 moment pair in mixed layouts is
    fine for the fast path (a size-1 dimension takes any stride)."""
    m, n = 30, 20
    p, idx = _projector("dense", m, n, 4, "right")
    w, ea, eas = _state(m, n, 4, "right")
    _run_and_compare((p, idx, "right"), w, [torch.randn(m, n)], ea, _layout(eas, "T"), 0.0, expect_fast=False,
                     what="mixed moments")
    p1, _ = _projector("dense", m, n, 1, "right")
    w, ea, eas = _state(m, n, 1, "right")
    _run_and_compare((p1, None, "right"), w, [torch.randn(m, n)], ea, _layout(eas, "T"), 0.0, what="rank-1 mixed")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct32"])
def test_portable_kernels_match_reference_and_avx2(kind, side):
    """Mode 2 forces the portable loops (what CPUs without AVX2/FMA run): they match the
    reference, and the AVX2 kernels to float32 rounding (the same operations: one FMA chain
    per GEMM element, the same epilogue)."""
    m, n, rank = 45, 29, 7
    p, idx = _projector(kind, m, n, rank, side)
    w0, ea0, eas0 = _state(m, n, rank, side)
    grads = [torch.randn(m, n) for _ in range(3)]
    outs = {}
    for mode in (1, 2):
        fast_path(mode)
        w, ea, eas = w0.clone(), ea0.clone(), eas0.clone()
        _run_and_compare((p, idx, side), w, grads, ea, eas, 0.1, what=f"mode {mode}")
        outs[mode] = (w, ea, eas)
    for a, b in zip(outs[1], outs[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- not taken
def _general_equals_fast_off(args, expect_fast=False):
    """Runs the fused _cpu op on clones with the fast path on and off: the same aten calls
    seen (or none) and bitwise the same results when the case is not eligible."""
    results = []
    for mode in (1, 0):
        fast_path(mode)
        # clones of what the op writes (grad and proj are read only: kept with their strides)
        a = [x.clone() if i in (0, 3, 4) else x for i, x in enumerate(args[:13])]
        kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args[13].items()}
        seen = aten_ops_inside(lambda: OPS.projection_project_update_backproject_cpu(*a, **kw))
        results.append((seen, [x for x in a + list(kw.values()) if isinstance(x, torch.Tensor)]))
    fast_path(1)
    (seen_on, out_on), (seen_off, out_off) = results
    assert seen_off, "the general engine made no aten call?"
    if expect_fast:
        assert seen_on == []
    else:
        assert seen_on, "a non-eligible case took the fast path"
        for x, y in zip(out_on, out_off):
            assert torch.equal(x, y)


def _args(m, n, rank, side, gdtype=torch.float32, mdtype=torch.float32, **kw):
    p, idx = _projector("dense", m, n, rank, side)
    w, ea, eas = _state(m, n, rank, side)
    return [w.to(gdtype), torch.randn(m, n).to(gdtype), p.to(kw.pop("pdtype", torch.float32)), ea.to(mdtype),
            eas.to(mdtype), side, 0.01, 0.9, 0.999, 1e-8, 3, 0.1, 0.5, dict(kw)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_not_eligible_runs_the_general_engine(side):
    m, n, r = 33, 17, 4
    _general_equals_fast_off(_args(m, n, r, side, gdtype=torch.bfloat16))
    _general_equals_fast_off(_args(m, n, r, side, mdtype=torch.bfloat16))
    _general_equals_fast_off(_args(m, n, r, side, pdtype=torch.float64))
    _general_equals_fast_off(_args(m, n, r, side, mdtype=torch.bfloat16, moment_seed=7))
    # strided grad (no unit stride)
    a = _args(m, n, r, side)
    buf = torch.zeros(m, 2 * n)
    buf[:, ::2] = a[1]
    a[1] = buf[:, ::2]
    _general_equals_fast_off(a)
    # 8-bit moments
    a = _args(m, n, r, side)
    ls = a[3].shape
    a[3] = torch.randint(0, 256, ls, dtype=torch.uint8)
    a[4] = torch.randint(0, 256, ls, dtype=torch.uint8)
    nb = (ls[1] + 7) // 8
    a[13] = dict(m_absmax=torch.rand(ls[0], nb) + 0.1, v_absmax=torch.rand(ls[0], nb) + 0.1, block_size=8)
    _general_equals_fast_off(a)
    # INT4 projector
    a = _args(m, n, r, side)
    Q = ops.Int4Projector.quantize(a[2], 16)
    a[2] = Q.packed
    a[13] = dict(q_scale=Q.scale, q_min=Q.minimum, rank=r, group_size=16)
    _general_equals_fast_off(a)
    # the eligible control: the same call with plain float32 takes the fast path
    _general_equals_fast_off(_args(m, n, r, side), expect_fast=True)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n", [(64, 172), (172, 64), (17, 9), (1, 16), (16, 1), (33, 130)])
def test_int4_lean_route_equals_general_engine(m, n, side):
    """The float32 INT4 case (int4_path.cpp: the engine's ATen kernels without the dispatcher,
    no allocation) gives bitwise the general engine's results, for every rank up to 129,
    odd group sizes, float32 and 8-bit moments, weight decay, a column-major weight, and makes
    far fewer aten calls than the engine."""
    k = min(m, n)
    for r in sorted({1, min(3, k), min(8, k), k if k <= 129 else 129}):
        for gs, eight, colmaj in ((16, False, False), (6, True, False), (256, False, True)):
            a = _args(m, n, r, side)
            if colmaj:
                a[0] = a[0].t().contiguous().t()
            Q = ops.Int4Projector.quantize(a[2], gs)
            a[2] = Q.packed
            kw = dict(q_scale=Q.scale, q_min=Q.minimum, rank=r, group_size=gs)
            if eight:
                ls = a[3].shape
                a[3] = torch.randint(0, 256, ls, dtype=torch.uint8)
                a[4] = torch.randint(0, 256, ls, dtype=torch.uint8)
                nb = (ls[1] + 7) // 8
                kw.update(m_absmax=torch.rand(ls[0], nb) + 0.1, v_absmax=torch.rand(ls[0], nb) + 0.1, block_size=8)
            a[13] = kw
            results = []
            for mode in (1, 0):
                fast_path(mode)
                b = [x.clone() if i in (0, 3, 4) else x for i, x in enumerate(a[:13])]
                kwc = {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
                # a first call on copies: the one-time checks of the route's GEMM layouts and epilogue
                OPS.projection_project_update_backproject_cpu(
                    *[x.clone() if isinstance(x, torch.Tensor) else x for x in b],
                    **{key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in kwc.items()})
                seen = aten_ops_inside(lambda: OPS.projection_project_update_backproject_cpu(*b, **kwc))
                results.append((len(seen), [x for x in b + list(kwc.values()) if isinstance(x, torch.Tensor)]))
            fast_path(1)
            (n_on, out_on), (n_off, out_off) = results
            assert n_on < n_off
            for x, y in zip(out_on, out_off):
                assert torch.equal(x, y), (m, n, side, r, gs, eight, colmaj)


@pytest.mark.parametrize("side", ["right", "left"])
def test_int4_route_float32_moments_makes_no_aten_call(side):
    """With float32 moments and no weight decay the INT4 route's GEMMs are direct BLAS calls
    and its Adam epilogue runs on raw pointers (each checked once against ATen's calls): no
    aten op at all after the first call; the portable epilogue (mode 2) gives the same bits."""
    m, n, r = 64, 172, 8
    a = _args(m, n, r, side)
    a[11] = 0.0
    Q = ops.Int4Projector.quantize(a[2], 16)
    a[2] = Q.packed
    kw = dict(q_scale=Q.scale, q_min=Q.minimum, rank=r, group_size=16)
    outs = []
    for mode in (1, 2, 0):
        fast_path(mode)
        b = [x.clone() if i in (0, 3, 4) else x for i, x in enumerate(a[:13])]
        OPS.projection_project_update_backproject_cpu(*[x.clone() if i in (0, 3, 4) else x
                                                        for i, x in enumerate(b)], **kw)  # first-use checks
        seen = aten_ops_inside(lambda: OPS.projection_project_update_backproject_cpu(*b, **kw))
        if mode == 1:
            assert seen == [], sorted(set(seen))
        outs.append([b[0], b[3], b[4]])
    fast_path(1)
    for got in outs[:2]:
        for x, y in zip(got, outs[2]):
            assert torch.equal(x, y), side


def test_size_bound_follows_threads():
    """4M multiply-adds per GEMM on one thread (1024 x 512 x 8 = 2^22: fast), half that on
    two (general engine); and a big weight is never taken; the results match either way."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _general_equals_fast_off(_args(1024, 512, 8, "right"), expect_fast=True)
        _general_equals_fast_off(_args(1024, 513, 8, "right"))
        torch.set_num_threads(2)
        _general_equals_fast_off(_args(1024, 512, 8, "right"))
        _general_equals_fast_off(_args(512, 512, 8, "left"), expect_fast=True)
    finally:
        torch.set_num_threads(old)
    m, n, r = 1024, 512, 8
    p, idx = _projector("dense", m, n, r, "right")
    w, ea, eas = _state(m, n, r, "right")
    torch.set_num_threads(1)
    try:
        _run_and_compare((p, idx, "right"), w, [torch.randn(m, n)], ea, eas, 0.1, what="at the bound")
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- the multi-tensor op
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct32", "dct64"])
def test_foreach_takes_fast_path_and_equals_single(kind, side):
    """The multi-tensor op: no aten op at all inside it (checks loop included), bitwise the
    single-tensor op on each entry."""
    shapes = [(64, 64), (172, 64), (64, 172), (1, 9), (33, 17)]
    rank = 3
    entries = []
    for m, n in shapes:
        p, idx = _projector(kind, m, n, min(rank, m, n), side)
        w, ea, eas = _state(m, n, min(rank, m, n), side)
        entries.append((w, torch.randn(m, n), p, ea, eas, idx))
    k = len(entries)
    lrs, steps, wds, scales = [0.01 * (i + 1) for i in range(k)], [i + 1 for i in range(k)], [0.1] * k, [0.5] * k
    single = [[x.clone() if x is not None else None for x in e] for e in entries]
    for i, (w, g, p, ea, eas, idx) in enumerate(single):
        OPS.projection_project_update_backproject_cpu(w, g, p, ea, eas, side, lrs[i], 0.9, 0.999, 1e-8, steps[i],
                                                       wds[i], scales[i], idx)
    multi = [[x.clone() if x is not None else None for x in e] for e in entries]
    cols = list(zip(*multi))
    idx_list = [] if kind == "dense" else list(cols[5])
    seen = aten_ops_inside(lambda: OPS.projection_foreach_project_update_backproject_cpu(
        list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]), side, lrs, 0.9, 0.999, 1e-8,
        steps, wds, scales, idx_list, [], [], [], 0, [], [], 0, []))
    assert seen == [], seen[:8]
    for a, b in zip(single, multi):
        for x, y in zip(a[:5], b[:5]):
            assert torch.equal(x, y)


def test_mode_switch_checks_its_argument():
    assert fast_path() == 1
    with pytest.raises(RuntimeError, match="mode must be -1"):
        fast_path(3)
    assert fast_path(0) == 1 and fast_path() == 0


# --------------------------------------------------------------------------- the elementwise Adam op
def test_adam_update_float32_fast_path():
    """adam_update_cpu / adam_foreach_update_cpu on contiguous float32 data: no aten op inside
    the multi-tensor op (the single-tensor one allocates N), the reference's values, for
    lengths around the 8-lane vectors (tails through the padded copy); a non-contiguous
    moment still takes the general loop and matches."""
    from lowrank_kernels.reference import adam as adam_ref

    shapes = [(1,), (7,), (8,), (9,), (3, 5), (17, 31), (64, 8)]
    rs = [torch.randn(s) for s in shapes]
    ms = [0.1 * torch.randn(s) for s in shapes]
    vs = [0.1 * torch.rand(s) for s in shapes]
    ns = [torch.full(s, float("nan")) for s in shapes]
    rm, rv = [m.clone() for m in ms], [v.clone() for v in vs]
    seen = aten_ops_inside(lambda: OPS.adam_foreach_update_cpu(rs, ms, vs, ns, 0.8, 0.95, 1e-6, [], [], 0, []))
    assert seen == [], seen[:8]
    for i, r in enumerate(rs):
        n_ref = adam_ref.adam_update_ref(r, rm[i], rv[i], 0.8, 0.95, 1e-6)
        assert_matches_backend(ms[i], rm[i], f"exp_avg {shapes[i]}")
        assert_matches_backend(vs[i], rv[i], f"exp_avg_sq {shapes[i]}")
        assert_matches_backend(ns[i], n_ref, f"N {shapes[i]}")
    r, m, v = torch.randn(6, 5), 0.1 * torch.randn(5, 6).T, 0.1 * torch.rand(6, 5)
    rm, rv = m.clone(), v.clone()
    n = OPS.adam_update_cpu(r, m, v, 0.8, 0.95, 1e-6)
    assert_matches_backend(n, adam_ref.adam_update_ref(r, rm, rv, 0.8, 0.95, 1e-6), "N (transposed exp_avg)")
    assert_matches_backend(m, rm, "exp_avg (transposed)")
