"""The residual family (Fira's fused back-projection): ``E = back(low) + f * G``,
``residual_sumsq`` = ``sum(E^2)`` and ``residual_apply_``: ``W <- decay W + alpha E``; every
backend against the reference on odd shapes, both sides, dense and DCT projectors, float32 /
bfloat16 (float64 on the reference and C++), transposed gradients; the identity Fira relies
on; validation before any write."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from .._numerics import assert_change_close
from ..conftest import require_backend
from .test_projection_kinds import make_projector

SHAPES = [(37, 23, 5), (19, 41, 1), (130, 70, 9)]


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("residual_apply", name)
    require_backend("residual_sumsq", name)
    return name


def _inputs(m, n, rank, side, dtype, kind, transposed=False, seed=0):
    torch.manual_seed(seed)
    proj, dense = make_projector(kind, m, n, rank, side, dtype)
    g = (torch.randn(n, m).T if transposed else torch.randn(m, n)).to(dtype)
    low = torch.randn(ops.lowrank_shape(m, n, rank, side))
    f = torch.rand(m if side == "right" else n) + 0.1
    return proj, dense, g, low, f


def _explicit(g, low, dense, f, side):
    """``E`` from its definition, in float64."""
    g, low, p, f = g.double(), low.double(), dense.double(), f.double()
    back = low @ p if side == "right" else p @ low
    return back + (f[:, None] if side == "right" else f[None, :]) * g


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_is_the_formula_float64(side):
    m, n, r = 13, 7, 3
    p = torch.randn(r, n, dtype=torch.float64) if side == "right" else torch.randn(m, r, dtype=torch.float64)
    g = torch.randn(m, n, dtype=torch.float64)
    low = torch.randn(ops.lowrank_shape(m, n, r, side), dtype=torch.float64)
    f = torch.rand(m if side == "right" else n, dtype=torch.float64)
    e = _explicit(g, low, p, f, side)
    with use_backend("reference"):
        got = ops.residual_sumsq(g, low, p, f, side=side)
        w0 = torch.randn(m, n, dtype=torch.float64)
        w = w0.clone()
        ops.residual_apply_(w, g, low, p, f, side=side, alpha=-0.3, decay=0.9)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, (e * e).sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(w, 0.9 * w0 - 0.3 * e, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("side", ["right", "left"])
def test_scaled_residual_identity(side):
    """Fira's two uses: with ``R = project(G)``, ``low = -s R`` gives ``||s (G - back(R))||^2``, and
    ``low = c N - s R`` gives ``c back(N) + s (G - back(R))`` (``s`` along the kept dimension)."""
    m, n, r = 29, 17, 4
    torch.manual_seed(3)
    proj, dense = make_projector("dense", m, n, r, side, torch.float64)
    g = torch.randn(m, n, dtype=torch.float64)
    rr = ops.project(g, proj, side=side)
    nn_ = torch.randn_like(rr)
    s = torch.rand(m if side == "right" else n, dtype=torch.float64) + 0.5
    sb = s[:, None] if side == "right" else s[None, :]
    sb_low = s[:, None] if side == "right" else s[None, :]
    back = (lambda x: x @ dense) if side == "right" else (lambda x: dense @ x)
    q = sb * (g - back(rr))
    with use_backend("reference"):
        got = ops.residual_sumsq(g, -sb_low * rr, proj, s, side=side)
        w = torch.zeros(m, n, dtype=torch.float64)
        ops.residual_apply_(w, g, 0.25 * nn_ - sb_low * rr, proj, s, side=side, alpha=1.0, decay=1.0)
    torch.testing.assert_close(got, (q * q).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(w, 0.25 * back(nn_) + q, rtol=1e-12, atol=1e-12)
    # the residual is orthogonal to the subspace: projecting it gives ~0
    assert float(ops.project(q / sb, proj, side=side).abs().max()) < 1e-10


@pytest.mark.parametrize("dtype,transposed", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank,kind", [(s + ("dense",)) for s in SHAPES] + [(37, 23, 5, "dct"), (19, 41, 1, "dct")])
def test_backends_vs_reference(backend, kind, m, n, rank, side, dtype, transposed):
    proj, dense, g, low, f = _inputs(m, n, rank, side, dtype, kind, transposed)
    w0 = torch.randn(m, n).to(dtype)
    e = _explicit(g, low, dense, f, side)
    with use_backend(backend):
        got = ops.residual_sumsq(g, low, proj, f, side=side)
        w = w0.clone()
        ops.residual_apply_(w, g, low, proj, f, side=side, alpha=-0.7, decay=0.97)
    assert got.dtype == torch.float32 and got.dim() == 0
    # the inputs are exact in float32 (bf16 ones included): only accumulation order differs
    torch.testing.assert_close(got.double(), (e * e).sum(), rtol=2e-5, atol=0)
    ref = w0.clone()
    with use_backend("reference"):
        ops.residual_apply_(ref, g, low, dense, f, side=side, alpha=-0.7, decay=0.97)
    assert_change_close(w, w0, ref, f"{backend} residual_apply_")


@pytest.mark.parametrize("side", ["right", "left"])
def test_float64_reference_and_cpp(side):
    for be in ("reference", "cpp"):
        if reg.why_unavailable(reg.OPS["residual_apply"], be, torch.device("cpu")) is not None:
            require_backend("residual_apply", be)
        proj, dense, g, low, f = _inputs(31, 22, 3, side, torch.float64, "dense")
        low = low.double()
        e = _explicit(g, low, dense, f, side)
        w0 = torch.randn(31, 22, dtype=torch.float64)
        with use_backend(be):
            got = ops.residual_sumsq(g, low, proj, f, side=side)
            w = w0.clone()
            ops.residual_apply_(w, g, low, proj, f, side=side, alpha=-0.5, decay=0.9)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, (e * e).sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(w, 0.9 * w0 - 0.5 * e, rtol=1e-12, atol=1e-12)


def test_cpp_sumsq_does_not_depend_on_threads():
    require_backend("residual_sumsq", "cpp")
    proj, _, g, low, f = _inputs(300, 200, 8, "right", torch.float32, "dense")
    n = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with use_backend("cpp"):
                outs.append(ops.residual_sumsq(g, low, proj, f, side="right"))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])


def test_bad_inputs_raise_and_write_nothing():
    m, n, r = 12, 9, 3
    proj, _, g, low, f = _inputs(m, n, r, "left", torch.float32, "dense")
    w = torch.randn(m, n)
    w0 = w.clone()
    with pytest.raises(ValueError, match="factor must have shape \\(9,\\)"):
        ops.residual_apply_(w, g, low, proj, torch.ones(m), side="left", alpha=1.0)
    with pytest.raises(TypeError, match="factor must be float32 or float64"):
        ops.residual_apply_(w, g, low, proj, f.half(), side="left", alpha=1.0)
    with pytest.raises(ValueError, match="low must have shape \\(3, 9\\)"):
        ops.residual_sumsq(g, low.T.contiguous(), proj, f, side="left")
    with pytest.raises(ValueError, match="grad must have shape \\(12, 9\\)"):
        ops.residual_apply_(w, g[:, :5], low[:, :5], proj, f[:5], side="left", alpha=1.0)
    with pytest.raises(ValueError, match="side"):
        ops.residual_sumsq(g, low, proj, f, side="up")
    with pytest.raises(ValueError, match="overlap|share memory"):
        ops.residual_apply_(g, g, low, proj, f, side="left", alpha=1.0)
    with pytest.raises(TypeError, match="proj must be a Tensor or a DCTProjector"):
        ops.residual_sumsq(g, low, "P", f, side="left")
    assert torch.equal(w, w0)
