"""backproject_apply_ with per-row factors: ``W <- diag(decay * row_decay) W + diag(alpha * row_alpha) back(N)``
(float32 vectors of length m, combined with the scalar decay / alpha), every backend and
projector kind, both sides, odd shapes; validation before any write."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from .._numerics import assert_change_close
from ..conftest import rel_err, require_backend
from .test_projection_kinds import make_projector


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("projection_backproject_apply", name)
    return name


def test_reference_is_the_row_scaled_formula_float64():
    m, n, r = 13, 7, 3
    w0 = torch.randn(m, n, dtype=torch.float64)
    u = torch.randn(r, n, dtype=torch.float64)
    p = torch.randn(m, r, dtype=torch.float64)
    rd, ra = torch.rand(m), torch.randn(m)
    w = w0.clone()
    with use_backend("reference"):
        ops.backproject_apply_(w, u, p, side="left", alpha=-0.5, decay=0.9, row_decay=rd, row_alpha=ra)
    want = 0.9 * rd.double()[:, None] * w0 - 0.5 * ra.double()[:, None] * (p @ u)
    torch.testing.assert_close(w, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("which", ["both", "decay", "alpha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank", [(37, 23, 5), (19, 41, 1), (130, 70, 9)])
@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
def test_row_factors_vs_reference(backend, kind, m, n, rank, side, dtype, which):
    proj, dense = make_projector(kind, m, n, rank, side, dtype)
    w0 = torch.randn(m, n).to(dtype)
    upd = torch.randn(ops.lowrank_shape(m, n, rank, side))
    rd = torch.rand(m) + 0.5 if which in ("both", "decay") else None
    ra = torch.randn(m) if which in ("both", "alpha") else None
    outs = {}
    for be, p in (("reference", dense), (backend, proj)):
        w = w0.clone()
        with use_backend(be):
            ops.backproject_apply_(w, upd, p, side=side, alpha=-0.7, decay=0.97, row_decay=rd, row_alpha=ra)
        outs[be] = w
    d = lambda a: a.double() - w0.double()  # noqa: E731  (the change, not W)
    assert_change_close(outs[backend], w0, outs["reference"], f"row factors ({which})")
    # and the factors did something: not the unscaled update
    w = w0.clone()
    with use_backend("reference"):
        ops.backproject_apply_(w, upd, dense, side=side, alpha=-0.7, decay=0.97)
    assert rel_err(d(w), d(outs["reference"])) > 1e-2


def test_transposed_weight(backend):
    """A column-major weight view (the C++ row-panel path, Triton strides)."""
    m, n, r = 29, 45, 4
    for side in ("right", "left"):
        store = torch.randn(n, m)
        w = store.T
        p = torch.randn(r, n) if side == "right" else torch.randn(m, r)
        u = torch.randn(ops.lowrank_shape(m, n, r, side))
        rd, ra = torch.rand(m), torch.randn(m)
        ref = w.clone()
        with use_backend("reference"):
            ops.backproject_apply_(ref, u, p, side=side, alpha=0.3, decay=0.5, row_decay=rd, row_alpha=ra)
        with use_backend(backend):
            ops.backproject_apply_(w, u, p, side=side, alpha=0.3, decay=0.5, row_decay=rd, row_alpha=ra)
        torch.testing.assert_close(store.T, ref, rtol=1e-5, atol=1e-5)


def test_bad_row_factors_change_nothing(backend):
    m, n, r = 12, 8, 3
    w = torch.randn(m, n)
    w0 = w.clone()
    u, p = torch.randn(m, r), torch.randn(r, n)
    cases = [
        (dict(row_decay=torch.rand(n)), ValueError, r"row_decay must have shape \(12,\)"),
        (dict(row_alpha=torch.rand(m, 1)), ValueError, r"row_alpha must have shape \(12,\)"),
        (dict(row_decay=torch.rand(m, dtype=torch.float64)), TypeError, "row_decay must be float32"),
        (dict(row_alpha=torch.ones(m, dtype=torch.int32)), TypeError, "row_alpha must be float32"),
        (dict(row_alpha=torch.rand(m, device="meta")), ValueError, "all tensors must be on one device"),
        (dict(row_decay=w.view(-1)[:12]), ValueError, "param and row_decay share memory"),
    ]
    with use_backend(backend):
        for kw, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                ops.backproject_apply_(w, u, p, side="right", alpha=1.0, **kw)
    assert torch.equal(w, w0)


def test_legacy_projector_types_refuse_row_factors():
    from lowrank_kernels.ops import projection as P

    class Legacy:
        pass

    P.register_projector_type(Legacy, project_adam_=print, backproject_apply_=print, project_update_backproject_=print)
    try:
        with pytest.raises(TypeError, match="row_decay / row_alpha"):
            ops.backproject_apply_(torch.randn(3, 3), torch.randn(3, 1), Legacy(), side="right", alpha=1.0,
                                   row_alpha=torch.ones(3))
    finally:
        P._STRUCTURED.pop(Legacy)
