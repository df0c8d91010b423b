"""apply_rows (GradNormLoRP's per-row apply): bad input raises before W is written."""
import pytest
import torch

import lowrank_kernels.optim.gradnormlorp as gnl
from lowrank_kernels.ops import use_backend


def _inputs(side, dtype=torch.float32, m=13, n=9, r=3):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(m, n, generator=gen).to(dtype)
    proj = torch.randn(*((r, n) if side == "right" else (m, r)), generator=gen).to(dtype)
    upd = torch.randn(*((m, r) if side == "right" else (r, n)), generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = (torch.rand(m, generator=gen) + 0.5).to(acc)
    b = torch.randn(m, generator=gen).to(acc)
    return w, upd, proj, d, b


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("decay_len", ValueError, "decay must have shape"),
        ("alpha_2d", ValueError, "alpha must have shape"),
        ("alpha_int", TypeError, "alpha must have a floating dtype"),
        ("decay_list", TypeError, "decay must be a Tensor"),
        ("update_shape", ValueError, "update must have shape"),
        ("side", ValueError, "side must be"),
    ],
)
def test_bad_input_raises_and_leaves_w_unchanged(side, dtype, bad, exc, match, backend):
    w, upd, proj, d, b = _inputs(side, dtype)
    kw = dict(decay=d, alpha=b)
    s = side
    if bad == "decay_len":
        kw["decay"] = d[:-1]
    elif bad == "alpha_2d":
        kw["alpha"] = b[:, None]
    elif bad == "alpha_int":
        kw["alpha"] = torch.ones(w.shape[0], dtype=torch.int32)
    elif bad == "decay_list":
        kw["decay"] = d.tolist()
    elif bad == "update_shape":
        upd = upd[:, :-1]
    else:
        s = "middle"
    out = w.clone()
    with use_backend(backend), pytest.raises(exc, match=match):
        gnl.apply_rows(out, upd, proj, s, **kw)
    assert torch.equal(out, w)


@pytest.mark.parametrize("side", ["right", "left"])
def test_float64_keeps_float64_factors(side, backend):
    """A float64 W takes its float64 per-row factors exactly (the op's row factors are float32)."""
    if backend == "triton":
        pytest.skip("float64 is served by the reference and C++ backends, not Triton")
    w, upd, proj, _, _ = _inputs(side, torch.float64)
    d = torch.full((w.shape[0],), 1.0 + 1e-9, dtype=torch.float64)  # 1 in float32
    b = torch.full((w.shape[0],), 1e-3 * (1.0 + 1e-9), dtype=torch.float64)
    back = upd @ proj if side == "right" else proj @ upd
    want = d[:, None] * w + b[:, None] * back
    out = w.clone()
    with use_backend(backend):
        gnl.apply_rows(out, upd, proj, side, decay=d, alpha=b)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
