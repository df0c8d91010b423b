"""The Triton back-projection with per-row factors on a 16-bit weight: bounded float32 row
panels, so the weight is rounded to its dtype once (as the C++ and reference backends round
it), not once after ``row_decay`` and again after the apply.

Runs under TRITON_INTERPRET=1 on CPU, on CUDA with LOWRANK_KERNELS_TEST_DEVICE=cuda.
"""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend

kp = pytest.importorskip("lowrank_kernels.kernels.projection")

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _inputs(side, kind, dtype, device, m=70, n=19, r=5):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(m, n, generator=gen).to(dtype)
    upd = torch.randn(*((m, r) if side == "right" else (r, n)), generator=gen).to(dtype)
    decay = torch.rand(m, generator=gen) + 0.5
    alpha = torch.randn(m, generator=gen)
    decay[3] = 0.0
    k = n if side == "right" else m
    if kind == "dense":
        proj = torch.randn(*((r, n) if side == "right" else (m, r)), generator=gen).to(dtype)
        dense = proj.double()
    else:
        proj = ops.DCTProjector(ops.dct_basis(k, dtype=dtype), torch.randperm(k, generator=gen)[:r].to(torch.int32))
        rows = proj.basis.double()[proj.indices.long()]
        dense = rows if side == "right" else rows.T
    return (w.to(device), upd.to(device), _to(proj, device), dense.to(device), decay.to(device), alpha.to(device))


def _to(proj, device):
    if isinstance(proj, torch.Tensor):
        return proj.to(device)
    return ops.DCTProjector(proj.basis.to(device), proj.indices.to(device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct"])
@pytest.mark.parametrize("panel", [None, 64])
def test_16bit_weight_rounded_once(dtype, side, kind, panel, device, monkeypatch):
    """``W <- diag(d) W + diag(b) back(N)`` for a 16-bit ``W`` (several panels when ``panel`` is
    small): within half an ulp of the float64 result (plus the float32 GEMM's error), and equal
    to the float32 computation on ``W.float()`` rounded once to ``W``'s dtype."""
    require_backend("projection_backproject_apply", "triton", device)
    if panel is not None:
        monkeypatch.setattr(kp, "_ROW_PANEL_ELEMS", panel)
    w, upd, proj, dense, d, b = _inputs(side, kind, dtype, device)
    assert len(list(kp._row_panels(*w.shape, 5))) == (1 if panel is None else w.shape[0] // 5)
    out, w32 = w.clone(), w.float()
    with use_backend("triton"):
        ops.backproject_apply_(out, upd, proj, side=side, alpha=1.0, decay=1.0, row_decay=d, row_alpha=b)
        ops.backproject_apply_(w32, upd, proj, side=side, alpha=1.0, decay=1.0, row_decay=d, row_alpha=b)
    back = upd.double() @ dense if side == "right" else dense @ upd.double()
    want = d.double()[:, None] * w.double() + b.double()[:, None] * back
    assert out.dtype == dtype
    assert ((out.double() - want).abs() <= ULP[dtype] / 2 * want.abs() + 1e-5).all()
    if device.type == "cpu":  # the interpreter's tiles are the same for a panel and the whole
        assert torch.equal(out, w32.to(dtype))
    else:
        assert ((out.double() - w32.to(dtype).double()).abs() <= ULP[dtype] * want.abs() + 1e-5).all()


def test_float32_weight_takes_no_panels(device, monkeypatch):
    """A float32 ``W`` is scaled in place in its own dtype: no panel copies."""
    require_backend("projection_backproject_apply", "triton", device)
    monkeypatch.setattr(kp, "_row_panels", lambda *a: pytest.fail("panels for a float32 W"))
    w, upd, proj, _, d, b = _inputs("right", "dense", torch.float32, device)
    with use_backend("triton"):
        ops.backproject_apply_(w, upd, proj, side="right", alpha=1.0, decay=1.0, row_decay=d, row_alpha=b)
