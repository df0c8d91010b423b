"""The fira list op (``foreach_fira_update_``): every backend (C++, Triton under the
interpreter) against the reference on odd shapes, both sides, dense and DCT projectors, with
and without the limiter, the moment formats; the C++ op bitwise against the per-weight ops
it replaces; clear errors with nothing written."""
import importlib
import math

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend
from .test_method_steps import SHAPES, _close, _moments, _run


def _fira_args(side, dct, limiter, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 2, 4]
    ps = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    projs, idx = [], []
    for (m, n), r in zip(SHAPES, ranks):
        k = n if side == "right" else m
        if dct:
            projs.append(ops.dct_basis(k))
            idx.append(torch.randperm(k, generator=gen)[:r].to(torch.int32))
        else:
            q = torch.linalg.qr(torch.randn(k, r, generator=gen)).Q
            projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, r) if side == "right" else (r, n) for (m, n), r in zip(SHAPES, ranks)]
    ea, es, kw = _moments(low, bits, gen)
    # prev norms: +inf (a first step), one that limits, one that does not
    prev = [torch.tensor(math.inf), torch.tensor(0.05), torch.tensor(1e3)] if limiter else None
    return ps, gs, projs, ea, es, dict(side=side, beta1=0.9, beta2=0.99, eps=1e-6, scale=[0.25, 1.0, 0.5],
                                       mix=[1.0, 0.25, 1.0], alpha=[-1e-2, -2e-2, -3e-3], decay=[0.99, 1.0, 0.9],
                                       indices=idx if dct else None, prev_norm=prev,
                                       gamma=[1.01, 1.01, 1.5] if limiter else None, **kw)


CASES = [("right", False, True, 32), ("left", False, True, 32), ("right", True, True, 32), ("left", True, False, 32),
         ("right", False, False, 16), ("left", True, True, 16), ("right", True, True, 8), ("left", False, True, 8)]
IDS = [f"{s}-{'dct' if d else 'dense'}-{'lim' if l else 'free'}-{b}" for s, d, l, b in CASES]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fira_backends_match_reference(case, backend):
    require_backend("fira_foreach_update", backend)
    want = _run(ops.foreach_fira_update_, lambda: _fira_args(*case), "reference")
    got = _run(ops.foreach_fira_update_, lambda: _fira_args(*case), backend)
    _close(got[:-1], want[:-1], f"fira {case} {backend}")
    if case[2]:
        _close(got[-1]["prev_norm"], want[-1]["prev_norm"], f"fira {case} {backend} prev_norm")


def _per_weight(ps, gs, projs, ea, es, kw):
    """The same step with the per-weight ops (project, adam_update_, residual_sumsq,
    residual_apply_) and torch glue: what FiraAdamW's per-parameter path runs."""
    side = kw["side"]
    right = side == "right"
    for i, (p, g) in enumerate(zip(ps, gs)):
        proj = projs[i] if kw["indices"] is None else ops.DCTProjector(projs[i], kw["indices"][i])
        low = ops.project(g, proj, side=side)
        mom = {}
        if "m_absmax" in kw:
            mom = dict(m_absmax=kw["m_absmax"][i], v_absmax=kw["v_absmax"][i], block_size=kw["block_size"])
        elif "moment_seed" in kw:
            mom = dict(moment_seed=kw["moment_seed"][i])
        upd = torch.float32 if ea[i].dtype == torch.uint8 else ea[i].dtype
        n = ops.adam_update_(low.to(upd), ea[i], es[i], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], **mom)
        n32 = n.to(low.dtype)
        d = 1 if right else 0
        s = torch.linalg.vector_norm(n32, dim=d) / (torch.linalg.vector_norm(low, dim=d) + 1e-8)
        mix = kw["mix"][i]
        if kw["prev_norm"] is not None:
            sb = s.unsqueeze(1) if right else s.unsqueeze(0)
            q = ops.residual_sumsq(g, low * sb * (-mix), proj, s, side=side).sqrt()
            prev = kw["prev_norm"][i]
            lim = torch.clamp(q / (prev.to(q.dtype) + 1e-8), min=kw["gamma"][i]) / kw["gamma"][i]
            s = s / lim.to(s.dtype)
            prev.copy_(q / lim)
        sb = s.unsqueeze(1) if right else s.unsqueeze(0)
        ops.residual_apply_(p, g, n32 * kw["scale"][i] - low * sb * mix, proj, s, side=side, alpha=kw["alpha"][i],
                            decay=kw["decay"][i])


def small_path(mode=-1):
    """The private testing switch of the C++ op's raw path for small weights
    (lowrank_kernels._C.fira_small_path): -1 queries, 0 off, 1 on, 2 on with the portable
    kernels; returns the previous mode."""
    return importlib.import_module("lowrank_kernels._C").fira_small_path(mode)


@pytest.fixture
def small_off():
    """The general path (the per-weight kernels) for every weight, restored afterwards."""
    require_backend("fira_foreach_update", "cpp")
    old = small_path(0)
    yield
    small_path(old)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fira_cpp_general_path_bitwise_equals_per_weight_ops(case, small_off):
    """The general path (large weights; here forced on small ones) is the per-weight ops."""
    with use_backend("cpp"):
        a = _fira_args(*case)
        ops.foreach_fira_update_(*a[:-1], **a[-1])
        b = _fira_args(*case)
        _per_weight(*b)
    for x, y in zip(a[:-1], b[:-1]):
        for s, t in zip(x, y):
            assert torch.equal(s, t), case
    if case[2]:
        for s, t in zip(a[-1]["prev_norm"], b[-1]["prev_norm"]):
            assert torch.equal(s, t), case


def test_fira_bad_entry_names_it_and_writes_nothing():
    ps, gs, projs, ea, es, kw = _fira_args("right", False, True, 32)
    before = [p.clone() for p in ps] + [t.clone() for t in ea]
    gs[2] = gs[2][:, :-1]
    with pytest.raises(ValueError, match=r"foreach_fira_update_ \(entry 2\).*grads"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps + ea, before))
    ps, gs, projs, ea, es, kw = _fira_args("left", True, True, 32)
    kw["indices"][1] = torch.tensor([0, 99], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(entry 1\).*indices must lie in"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **kw)
    ps, gs, projs, ea, es, kw = _fira_args("right", False, True, 32)
    with pytest.raises(ValueError, match=r"gamma must have one entry per prev_norm"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": kw["gamma"][:1]})
    with pytest.raises(ValueError, match=r"prev_norm and gamma go together"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": None})
    with pytest.raises(TypeError, match=r"\(entry 1\): params must have a floating dtype \(float32\)"):
        ops.foreach_fira_update_([ps[0], ps[1].double(), ps[2]], gs, projs, ea, es, **kw)
    with pytest.raises(ValueError, match=r"\(entry 0\).*gamma must be finite|gamma must be finite"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": [0.5, 1.0, 1.0]})


# --------------------------------------------------------------------------- the raw path of small weights
def _one_entry(args, i):
    """Entry ``i`` of a list op's arguments as a one-entry call."""
    *ts, kw = args
    pick = lambda v: None if v is None else [v[i]]  # noqa: E731
    kw = {k: (pick(v) if isinstance(v, list) and k not in ("block_size",) else v) for k, v in kw.items()}
    return [[t[i]] for t in ts], kw


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fira_cpp_list_bitwise_equals_one_entry_calls(case):
    """FiraAdamW's per-parameter step on a float32 CPU weight is the op on a one-entry list:
    the bucket's call gives each weight the same bits."""
    require_backend("fira_foreach_update", "cpp")
    with use_backend("cpp"):
        a = _fira_args(*case)
        ops.foreach_fira_update_(*a[:-1], **a[-1])
        b = _fira_args(*case)
        for i in range(len(SHAPES)):
            ts, kw = _one_entry(b, i)
            ops.foreach_fira_update_(*ts, **kw)
    for x, y in zip(a[:-1], b[:-1]):
        for s, t in zip(x, y):
            assert torch.equal(s, t), case
    if case[2]:
        for s, t in zip(a[-1]["prev_norm"], b[-1]["prev_norm"]):
            assert torch.equal(s, t), case


def _sized_args(shapes, ranks, side, dct, limiter, bits, seed=0, mix=1.0, aligned=False):
    """A list op's arguments; ``aligned``: gradients with a strong part in the (dense) subspace,
    so no ``R`` entry is near 0 (``s = ||N|| / ||R||`` is ill-conditioned there: the
    projection's summation order alone moves it)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    projs, idx = [], []
    for i, ((m, n), r) in enumerate(zip(shapes, ranks)):
        k = n if side == "right" else m
        if dct:
            projs.append(ops.dct_basis(k))
            idx.append(torch.randperm(k, generator=gen)[:r].to(torch.int64 if seed % 2 else torch.int32))
        else:
            q = torch.linalg.qr(torch.randn(k, r, generator=gen)).Q
            # right: r x n, contiguous or a transposed view; left: m x r
            projs.append((q.T.contiguous() if seed % 2 == 0 else q.T) if side == "right" else q.contiguous())
            if aligned:
                c = (6 + torch.randn(m if side == "right" else n, r, generator=gen).abs()) * torch.randint(
                    0, 2, (1,), generator=gen).mul(2).sub(1)
                gs[i] += c @ q.T if side == "right" else q @ c.T
    low = [(m, r) if side == "right" else (r, n) for (m, n), r in zip(shapes, ranks)]
    ea, es, kw = _moments(low, bits, gen)
    if bits == 16:
        kw["moment_seed"] = list(range(5, 5 + len(shapes)))
    k = len(shapes)
    # prev norms: +inf (a first step), ones that limit, one that does not
    prev = [torch.tensor([math.inf, 0.05, 1e3, 1.0][i % 4]) for i in range(k)] if limiter else None
    return ps, gs, projs, ea, es, dict(side=side, beta1=0.9, beta2=0.99, eps=1e-6, scale=[0.25] * k, mix=[mix] * k,
                                       alpha=[-1e-2] * k, decay=[0.99] * k, indices=idx if dct else None,
                                       prev_norm=prev, gamma=[1.01] * k if limiter else None, **kw)


# Odd shapes: a few rows or columns, several back-projection panels (16384 // n rows each), and
# m * n * r on both sides of the raw path's bound (2^20 multiply-adds).
SMALL_SHAPES = [(3, 5), (37, 11), (700, 29), (129, 1016), (1016, 129)]
SMALL_RANKS = [2, 4, 3, 8, 8]
BOUND_CASES = [((128, 1024), 8, True), ((129, 1016), 8, True), ((129, 1017), 8, False), ((257, 512), 8, False),
               ((4096, 256), 1, True), ((4097, 256), 1, False),
               # the projected dimension (n right, m left) bound, 2^14: a long FMA chain per entry of R
               ((1, 1 << 14), 1, True), ((1, (1 << 14) + 1), 1, (False, True)),
               ((1, 1 << 20), 1, (False, True))]  # left: a scratch beyond what a thread keeps
RAW_CASES = [(side, dct, limiter, bits) for side in ("right", "left") for dct in (False, True)
             for limiter in (True, False) for bits in (32, 8)] + [("right", False, True, 16), ("left", True, True, 16)]
RAW_IDS = [f"{s}-{'dct' if d else 'dense'}-{'lim' if l else 'free'}-{b}" for s, d, l, b in RAW_CASES]


@pytest.mark.parametrize("mode", [1, 2], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", RAW_CASES, ids=RAW_IDS)
def test_fira_cpp_small_path_matches_reference(case, mode):
    """The raw path (both kernel sets) against the reference on odd shapes, both sides, dense
    and DCT projectors (int32 and int64 indices), limiter on and off, the moment formats."""
    require_backend("fira_foreach_update", "cpp")
    old = small_path(mode)
    try:
        for seed in (0, 1):
            make = lambda: _sized_args(SMALL_SHAPES, SMALL_RANKS, *case, seed=seed, mix=0.25 if seed else 1.0)  # noqa
            want = _run(ops.foreach_fira_update_, make, "reference")
            got = _run(ops.foreach_fira_update_, make, "cpp")
            _close(got[:-1], want[:-1], f"fira raw {case} seed {seed}")
            if case[2]:
                _close(got[-1]["prev_norm"], want[-1]["prev_norm"], f"fira raw {case} prev_norm")
    finally:
        small_path(old)


def _run_mode(mode, make, threads=None):
    old, old_threads = small_path(mode), torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run(ops.foreach_fira_update_, make, "cpp")
    finally:
        small_path(old)
        torch.set_num_threads(old_threads)


def _flat(args):
    *ts, kw = args
    return [t for lst in ts for t in lst] + list(kw["prev_norm"] or [])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape,rank,raw", BOUND_CASES, ids=[f"{m}x{n}-r{r}" for (m, n), r, _ in BOUND_CASES])
def test_fira_cpp_size_bound(shape, rank, raw, side):
    """Up to the bounds (m n r <= 2^20, the projected dimension <= 2^14) the raw path runs (its
    bits differ from the general path's), beyond them the general path (the same bits with the
    raw path off); both match the reference."""
    require_backend("fira_foreach_update", "cpp")
    if isinstance(raw, tuple):  # (right, left)
        raw = raw[side == "left"]
    make = lambda: _sized_args([shape], [rank], side, False, True, 32, aligned=True)  # noqa: E731
    on, off = _flat(_run_mode(1, make)), _flat(_run_mode(0, make))
    same = all(torch.equal(a, b) for a, b in zip(on, off))
    assert same != raw
    want = _run(ops.foreach_fira_update_, make, "reference")
    _close(_flat(_run_mode(1, make)), _flat(want), f"fira bound {shape} r{rank} {side}")


@pytest.mark.parametrize("mode", [1, 2], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", [("right", False, True, 32), ("left", True, True, 8)], ids=["right-dense", "left-dct-8"])
def test_fira_cpp_small_path_independent_of_threads(case, mode):
    """The raw path's bits are the same on 1 and 2 threads (it runs on the calling thread).
    (The AVX2 and the portable kernels may differ in the last bit: the compiler fuses a
    multiply and an add of fast_f32.h's AVX2 Adam epilogue into an FMA.)"""
    require_backend("fira_foreach_update", "cpp")
    make = lambda: _sized_args(SMALL_SHAPES, SMALL_RANKS, *case)  # noqa: E731
    one, two = _flat(_run_mode(mode, make, threads=1)), _flat(_run_mode(mode, make, threads=2))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_fira_cpp_small_path_makes_no_aten_call():
    """The raw path of float32 and 8-bit moments runs no aten op inside the C++ kernel."""
    require_backend("fira_foreach_update", "cpp")
    old = small_path(1)
    try:
        for case in (("right", False, True, 32), ("left", True, True, 8)):
            args = _sized_args(SMALL_SHAPES[:3], SMALL_RANKS[:3], *case)
            *ts, kw = args
            pos = [kw["indices"] or [], kw["prev_norm"] or []]
            call = lambda: torch.ops._lowrank_kernels.fira_foreach_update_cpu(  # noqa: E731
                ts[0], ts[1], ts[2], pos[0], ts[3], ts[4], pos[1], kw["side"], kw["beta1"], kw["beta2"], kw["eps"],
                kw["scale"], kw["mix"], kw["gamma"] or [], kw["alpha"], kw["decay"], kw.get("m_absmax", []),
                kw.get("v_absmax", []), kw.get("block_size", 0), [])
            call()  # warm (the thread's scratch)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                call()
            inside = [e.name for e in prof.events() if e.name.startswith("aten::")]
            assert inside == [], (case, inside)
    finally:
        small_path(old)
