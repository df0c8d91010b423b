"""The trion list op (``foreach_trion_update_``): every backend (C++, Triton under the
interpreter) against the reference on odd shapes, both sides, both score norms, float32 and
bfloat16 weights; on C++ each entry bitwise the single ops' sequence (the per-parameter step);
clear errors with nothing written."""
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


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_entry_is_the_single_ops_sequence(case, backend):
    """Bitwise on CPU: the list op equals the per-parameter step's op sequence on the same backend."""
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
