"""The trion list ops (``foreach_trion_update_`` and the sharded step's halves
``foreach_trion_orth_`` / ``foreach_trion_apply_``): every backend (C++, Triton under the
interpreter) against the reference on odd shapes, both sides, both score norms, float32 and
bfloat16 weights; on C++ each entry bitwise the op on a one-entry list (the per-parameter
step) and the two halves bitwise the whole step; the C++ float32 fast path on both sides, at
its bounds and with its portable kernels; the general C++ path bitwise the single ops'
sequence; clear errors with nothing written."""
import importlib

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim.trion import trion_basis

from ..conftest import require_backend

SHAPES = {"right": [(13, 7), (5, 7), (13, 7)], "left": [(6, 11), (6, 11), (6, 17)]}  # one basis size per side
N = 3


def _args(side, pdtype=torch.float32, mdtype=torch.float32, rank=3, norm=1, sched="dion", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES[side]
    ps = [(0.1 * torch.randn(shape, generator=gen)).to(pdtype) for shape in shapes]
    gs = [torch.randn(shape, generator=gen).to(pdtype) for shape in shapes]
    ms = [torch.randn(shape, generator=gen).to(mdtype) for shape in shapes]
    s = shapes[0][1] if side == "right" else shapes[0][0]
    basis = trion_basis(s, side, mdtype, "cpu")
    kw = dict(side=side, rank=rank, mu=[0.95, 0.9, 0.0], alpha=[-2e-2, -1e-2, -3e-3], decay=[1.0, 0.999, 0.99],
              coefficients=sched, norm=norm)
    return ps, gs, ms, basis, kw


def _run(make, backend):
    ps, gs, ms, basis, kw = make()
    with use_backend(backend):
        ops.foreach_trion_update_(ps, gs, ms, basis, **kw)
    return ps, ms


CASES = [("right", torch.float32, torch.float32, 1, "dion"), ("left", torch.float32, torch.float32, 2, "muon"),
         ("right", torch.bfloat16, torch.float32, 1, "muon"), ("left", torch.bfloat16, torch.bfloat16, 1, "dion")]
IDS = [f"{s}-{str(p)[6:]}-{str(m)[6:]}-l{n}-{c}" for s, p, m, n, c in CASES]


def _make(case):
    side, pdt, mdt, norm, sched = case
    return lambda: _args(side, pdt, mdt, norm=norm, sched=sched)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backends_match_reference(case, backend):
    require_backend("trion_foreach_update", backend)
    want = _run(_make(case), "reference")
    got = _run(_make(case), backend)
    low_precision = torch.bfloat16 in case[1:3]
    for what, xs, ys in (("params", got[0], want[0]), ("momentum", got[1], want[1])):
        for i, (x, y) in enumerate(zip(xs, ys)):
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-2 if low_precision else 2e-5,
                                       atol=2e-2 if low_precision else 2e-5, msg=lambda m: f"{what}[{i}]: {m}")


def fast_path(mode=-1):
    """The private switch of the C++ float32 fast paths (lowrank_kernels._C.projection_fast_path):
    -1 queries, 0 off, 1 on, 2 on with the portable kernels; returns the previous mode."""
    return importlib.import_module("lowrank_kernels._C").projection_fast_path(mode)


@pytest.fixture
def general_cpp():
    """The C++ backend with its float32 fast path off (the general path: the single ops' kernels)."""
    require_backend("trion_foreach_update", "cpp")
    old = fast_path(0)
    yield
    fast_path(old)


@pytest.mark.parametrize("backend", ["cpp-general", "reference"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_entry_is_the_single_ops_sequence(case, backend, request):
    """Bitwise on CPU: the list op equals the single ops' sequence on the same backend (on C++
    its general path, the fast path off)."""
    if backend == "cpp-general":
        request.getfixturevalue("general_cpp")
        backend = "cpp"
    require_backend("trion_foreach_update", backend)
    got = _run(_make(case), backend)
    ps, gs, ms, basis, kw = _make(case)()
    side = kw["side"]
    with use_backend(backend):
        for i in range(N):
            ms[i].add_(gs[i])
            idx = ops.dct_score_topk(ms[i], kw["rank"], side=side, norm=kw["norm"], basis=basis)
            proj = ops.DCTProjector(basis, idx)
            low = ops.dct_project(ms[i], proj, side=side)
            ops.backproject_apply_(ms[i], low, proj, side=side, alpha=-(1.0 - kw["mu"][i]))
            o = ops.newton_schulz(low, kw["coefficients"])
            ops.backproject_apply_(ps[i], o, proj, side=side, alpha=kw["alpha"][i], decay=kw["decay"][i])
    for i in range(N):
        assert torch.equal(got[0][i], ps[i]), f"params[{i}]"
        assert torch.equal(got[1][i], ms[i]), f"momentum[{i}]"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpp_entries_are_one_entry_calls_and_the_two_halves(case):
    """Bitwise on C++: each entry of the list op is the op on that entry alone (Trion's
    per-parameter step), and the sharded step's halves (orth, then apply) are the whole step."""
    require_backend("trion_foreach_update", "cpp")
    got = _run(_make(case), "cpp")
    ps, gs, ms, basis, kw = _make(case)()
    one = {k: v for k, v in kw.items() if k not in ("mu", "alpha", "decay")}
    with use_backend("cpp"):
        for i in range(N):
            ops.foreach_trion_update_([ps[i]], [gs[i]], [ms[i]], basis, mu=[kw["mu"][i]], alpha=[kw["alpha"][i]],
                                      decay=[kw["decay"][i]], **one)
    for i in range(N):
        assert torch.equal(got[0][i], ps[i]), f"params[{i}] (one-entry call)"
        assert torch.equal(got[1][i], ms[i]), f"momentum[{i}] (one-entry call)"
    ps, gs, ms, basis, kw = _make(case)()
    with use_backend("cpp"):
        orths, idx = ops.foreach_trion_orth_(gs, ms, basis, side=kw["side"], rank=kw["rank"], mu=kw["mu"],
                                             coefficients=kw["coefficients"], norm=kw["norm"])
        assert idx.shape == (N, kw["rank"]) and idx.dtype == torch.int32
        ops.foreach_trion_apply_(ps, orths, idx, basis, side=kw["side"], alpha=kw["alpha"], decay=kw["decay"])
    for i in range(N):
        assert torch.equal(got[0][i], ps[i]), f"params[{i}] (orth + apply)"
        assert torch.equal(got[1][i], ms[i]), f"momentum[{i}] (orth + apply)"


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_halves_match_reference(side, backend):
    """foreach_trion_orth_ and foreach_trion_apply_ on every backend against the reference."""
    require_backend("trion_foreach_orth", backend)

    def run(b):
        ps, gs, ms, basis, kw = _args(side, norm=2)
        with use_backend(b):
            orths, idx = ops.foreach_trion_orth_(gs, ms, basis, side=side, rank=kw["rank"], mu=kw["mu"], norm=2)
            ops.foreach_trion_apply_(ps, orths, idx.long(), basis, side=side, alpha=kw["alpha"], decay=kw["decay"])
        return orths, idx, ps, ms

    want, got = run("reference"), run(backend)
    assert torch.equal(got[1], want[1])
    for xs, ys in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


def _aten_ops_inside(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


# (side, shapes, rank, fast): odd shapes on both sides, odd basis orders (the full scoring
# GEMM) and even ones (the butterfly: 12, 40, 64 on both sides); the right side's m == rank (m
# is not tall: the orth family takes it as it is); rank at the fast path's bound (32) and above
# it; m * n * s at the bound (2^22) and above it.
FAST_CASES = [
    ("right", [(13, 9), (9, 9), (40, 9)], 5, True),
    ("left", [(9, 13), (9, 9), (9, 31)], 5, True),
    ("right", [(17, 12), (12, 12)], 3, True),
    ("left", [(12, 17), (12, 5)], 4, True),
    ("left", [(64, 172), (64, 64)], 8, True),
    ("right", [(172, 64), (64, 64)], 8, True),
    ("right", [(5, 11)], 5, True),
    ("left", [(7, 5)], 5, True),
    ("right", [(45, 40), (33, 40)], 32, True),
    ("left", [(40, 41)], 33, False),
    ("right", [(1024, 64)], 8, True),
    ("right", [(1025, 64)], 8, False),
    ("left", [(64, 1025)], 3, False),
]


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side,shapes,rank,fast", FAST_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1][0]))}-r{c[2]}" for c in FAST_CASES])
def test_cpp_fast_path_matches_reference(side, shapes, rank, fast, norm):
    """The C++ float32 fast path (no ATen op inside) where its conditions hold, the general
    path (the single ops' kernels) beyond its bounds; both against the reference, and the
    portable kernels against the AVX2 ones."""
    require_backend("trion_foreach_update", "cpp")
    gen = torch.Generator().manual_seed(len(shapes) * 7 + rank)
    s = shapes[0][1] if side == "right" else shapes[0][0]
    basis = trion_basis(s, side, torch.float32, "cpu")
    base = [(0.1 * torch.randn(sh, generator=gen), torch.randn(sh, generator=gen), torch.randn(sh, generator=gen))
            for sh in shapes]
    k = len(shapes)
    kw = dict(side=side, rank=rank, mu=[0.9] * k, alpha=[-0.02] * k, decay=[0.99] * k, norm=norm)

    def run(backend, mode=1):
        ps, gs, ms = ([t[j].clone() for t in base] for j in range(3))
        old = fast_path(mode)
        try:
            with use_backend(backend):
                ops.foreach_trion_update_(ps, gs, ms, basis, **kw)
        finally:
            fast_path(old)
        return ps, ms

    ps, gs, ms = ([t[j].clone() for t in base] for j in range(3))
    coeffs = ops.orth.ns_coefficients("dion")
    inside = _aten_ops_inside(lambda: torch.ops._lowrank_kernels.trion_foreach_update_cpu(
        ps, gs, ms, basis, side, rank, norm, coeffs, 1e-7, kw["mu"], kw["alpha"], kw["decay"]))
    assert (not inside) == fast, inside[:5]
    want = run("reference")
    for got in (run("cpp"), run("cpp", mode=2)):
        for xs, ys in zip(got, want):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["orthogonal", "perturbed-dct"])
def test_cpp_fast_path_any_basis(side, kind):
    """The fast path with a basis of even order without the DCT's symmetry (a random orthogonal
    one; the DCT with one element changed): the full scoring GEMM, against the reference."""
    require_backend("trion_foreach_update", "cpp")
    gen = torch.Generator().manual_seed(3)
    s = 16
    if kind == "orthogonal":
        basis = torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=torch.float64))[0].float().contiguous()
    else:
        basis = trion_basis(s, side, torch.float32, "cpu").clone()
        basis[3, 5] += 0.25
    shapes = [(s, 21), (s, s)] if side == "left" else [(21, s), (s, s)]
    base = [(0.1 * torch.randn(sh, generator=gen), torch.randn(sh, generator=gen), torch.randn(sh, generator=gen))
            for sh in shapes]
    kw = dict(side=side, rank=4, mu=[0.9, 0.5], alpha=[-0.02, -0.01], decay=[0.99, 1.0])
    outs = []
    for backend in ("reference", "cpp"):
        ps, gs, ms = ([t[j].clone() for t in base] for j in range(3))
        with use_backend(backend):
            ops.foreach_trion_update_(ps, gs, ms, basis, **kw)
        outs.append(ps + ms)
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


def test_empty_list_is_a_no_op():
    basis = trion_basis(7, "right", torch.float32, "cpu")
    ops.foreach_trion_update_([], [], [], basis, side="right", rank=2, mu=[], alpha=[], decay=[])


def test_bad_entry_names_it_and_writes_nothing():
    ps, gs, ms, basis, kw = _args("right")
    before = [t.clone() for t in ps + ms]
    gs[2] = gs[2][:, :5]
    with pytest.raises(ValueError, match=r"foreach_trion_update_ \(entry 2\).*grads"):
        ops.foreach_trion_update_(ps, gs, ms, basis, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + ms))
    ps, gs, ms, basis, kw = _args("right")
    with pytest.raises(ValueError, match=r"\(entry 1\): rank of rank \(6\) must be between 1 and min\(m, n\) = 5"):
        ops.foreach_trion_update_(ps, gs, ms, basis, **{**kw, "rank": 6})
    with pytest.raises(ValueError, match=r"\(entry 0\): basis must have shape \(7, 7\)"):
        ops.foreach_trion_update_(ps, gs, ms, trion_basis(13, "left", torch.float32, "cpu"), **kw)
    with pytest.raises(ValueError, match=r"mu\[1\] must be in \[0, 1\)"):
        ops.foreach_trion_update_(ps, gs, ms, basis, **{**kw, "mu": [0.9, 1.0, 0.9]})
    with pytest.raises(ValueError, match="mu must have one entry per weight"):
        ops.foreach_trion_update_(ps, gs, ms, basis, **{**kw, "mu": [0.9]})
    with pytest.raises(ValueError, match=r"\(entry 2\): basis must have shape \(9, 9\).*got \(7, 7\)"):
        ops.foreach_trion_update_(ps[:2] + [torch.zeros(7, 9)], gs[:2] + [torch.zeros(7, 9)],
                                  ms[:2] + [torch.zeros(7, 9)], basis, **kw)
    with pytest.raises(TypeError, match=r"\(entry 1\): momentum must share one dtype"):
        ops.foreach_trion_update_(ps, gs, [ms[0], ms[1].double(), ms[2]], basis, **kw)
    with pytest.raises(ValueError, match=r"momentum\[0\]"):
        ops.foreach_trion_update_(ps, [ms[0]] + gs[1:], ms, basis, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + ms))


def test_halves_bad_arguments_name_them_and_write_nothing():
    ps, gs, ms, basis, kw = _args("right")
    before = [t.clone() for t in ps + ms]
    with pytest.raises(ValueError, match=r"foreach_trion_orth_ \(entry 2\).*grads"):
        ops.foreach_trion_orth_(gs[:2] + [gs[2][:, :5]], ms, basis, side="right", rank=3, mu=kw["mu"])
    with pytest.raises(ValueError, match=r"foreach_trion_orth_: mu\[0\] must be in \[0, 1\)"):
        ops.foreach_trion_orth_(gs, ms, basis, side="right", rank=3, mu=[1.0, 0.5, 0.5])
    orths = [torch.zeros(p.shape[0], 3) for p in ps]
    idx = torch.zeros(N, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"foreach_trion_apply_ \(entry 1\).*orths must have shape \(5, 3\)"):
        ops.foreach_trion_apply_(ps, [orths[0], orths[0], orths[2]], idx, basis, side="right", alpha=kw["alpha"],
                                 decay=kw["decay"])
    with pytest.raises(ValueError, match=r"foreach_trion_apply_: indices must lie in \[0, 7\)"):
        ops.foreach_trion_apply_(ps, orths, idx + 7, basis, side="right", alpha=kw["alpha"], decay=kw["decay"])
    with pytest.raises(ValueError, match=r"indices must have one row per weight \(3\)"):
        ops.foreach_trion_apply_(ps, orths, idx[:2], basis, side="right", alpha=kw["alpha"], decay=kw["decay"])
    assert all(torch.equal(a, b) for a, b in zip(before, ps + ms))
