"""Moment dtype: float32 moments by default for every optimizer, 16-bit only on request.

16-bit moments break Adam: in bfloat16 ``0.999 * V`` rounds back to ``V`` (the second
moment never decays), in float16 ``(1 - b2) R^2`` underflows to 0. These tests check the
default (projected and plain parameters, dense and INT8 QLinear weights), that the
opt-in ``moment_dtype="param"`` keeps torch.optim.AdamW's bit-identical behaviour, and
that the failure the default avoids is real (so reverting the default fails here).
"""
import math
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels.nn import QLinear
from lowrank_kernels.optim import APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

MAKERS = {
    "galore": lambda groups, **kw: GaLoreAdamW(groups, lr=1e-2, rank=4, update_proj_gap=1000, **kw),
    "dct": lambda groups, **kw: DCTAdamW(groups, lr=1e-2, rank=4, update_proj_gap=1000, **kw),
    "qgalore": lambda groups, **kw: QGaLoreAdamW(groups, lr=1e-2, rank=4, update_proj_gap=1000, **kw),
    "apollo": lambda groups, **kw: APOLLOAdamW(groups, lr=1e-2, rank=4, update_proj_gap=1000, **kw),
    "frugal": lambda groups, **kw: FrugalAdamW(groups, lr=1e-2, density=0.25, update_proj_gap=1000, **kw),
}
HALF = [torch.bfloat16, torch.float16]


def _setup(name, dtype, device, **kw):
    w = nn.Parameter(torch.randn(24, 16, device=device).to(dtype))
    b = nn.Parameter(torch.randn(16, device=device).to(dtype))
    plain = {"params": [b], "rank": None}
    if name == "frugal":
        plain["density"] = None
    opt = MAKERS[name]([{"params": [w]}, plain], **kw)
    return w, b, opt


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(MAKERS))
def test_default_moments_are_float32(name, dtype, device):
    w, b, opt = _setup(name, dtype, device)
    _step(opt, [w, b], [torch.randn_like(w), torch.randn_like(b)])
    for p in (w, b):
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32, name
    assert w.dtype == dtype and b.dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(MAKERS))
def test_param_moments_on_request(name, dtype, device):
    w, b, opt = _setup(name, dtype, device, moment_dtype="param")
    _step(opt, [w, b], [torch.randn_like(w), torch.randn_like(b)])
    for p in (w, b):
        assert opt.state[p]["exp_avg"].dtype == dtype and opt.state[p]["exp_avg_sq"].dtype == dtype


@pytest.mark.parametrize("name", list(MAKERS))
def test_float64_params_keep_float64_moments(name):
    w, b, opt = _setup(name, torch.float64, "cpu")
    _step(opt, [w, b], [torch.randn_like(w), torch.randn_like(b)])
    assert opt.state[w]["exp_avg"].dtype == torch.float64 and opt.state[b]["exp_avg_sq"].dtype == torch.float64


@pytest.mark.parametrize("bad", ["bfloat16", torch.float32, "fp32", None])
@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_moment_dtype(name, bad):
    with pytest.raises(ValueError, match=r"param group 0: moment_dtype must be 'float32' .* or 'param'"):
        _setup(name, torch.float32, "cpu", moment_dtype=bad)


def test_qlinear_weight_moments_float32(device):
    """The INT8 QLinear path (placeholder in bf16): float32 moments by default."""
    lin = QLinear(64, 32, group_size=64, dtype=torch.bfloat16, device=device)
    opt = QGaLoreAdamW([{"params": [lin.weight], "rank": 4}], lr=1e-2)
    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    lin(x).float().square().mean().backward()
    opt.step()
    assert opt.state[lin.weight]["exp_avg"].dtype == torch.float32
    assert opt.state[lin.weight]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
def test_plain_param_mode_is_torch_adamw(dtype, device):
    """moment_dtype="param": plain groups are torch.optim.AdamW bit for bit (16-bit moments)."""
    torch.manual_seed(3)
    w0 = torch.randn(17, 9, device=device).to(dtype)
    grads = [torch.randn(17, 9, device=device).to(dtype) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    q = nn.Parameter(w0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaLoreAdamW([p], lr=1e-2, weight_decay=0.1, eps=1e-8, moment_dtype="param")
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, eps=1e-8)
    for g in grads:
        _step(ours, [p], [g])
        _step(ref, [q], [g])
    assert torch.equal(p, q)
    assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", HALF)
def test_plain_default_matches_float64_adamw(dtype, device):
    """Default plain groups of a 16-bit parameter: torch's AdamW math with float32 moments; the
    moments agree with a float64 AdamW to float32 accuracy, the weight to one rounding."""
    torch.manual_seed(4)
    shape = (19, 7)
    w0 = torch.randn(shape, device=device).to(dtype)
    grads = [torch.randn(shape, device=device).to(dtype) for _ in range(5)]
    lr, wd, eps, (b1, b2) = 1e-2, 0.1, 1e-8, (0.9, 0.999)
    p = nn.Parameter(w0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = GaLoreAdamW([p], lr=lr, weight_decay=wd, eps=eps, betas=(b1, b2))
    w = w0.double()
    m = torch.zeros(shape, dtype=torch.float64, device=device)
    v = torch.zeros_like(m)
    for t, g in enumerate(grads, start=1):
        _step(ours, [p], [g])
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
        w = w.to(dtype).double()  # the weight is stored in 16 bits after every step
        # compare against the truth started from the same stored weight each step
        w = p.detach().double() if t < len(grads) else w
    st = ours.state[p]
    torch.testing.assert_close(st["exp_avg"].double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-7)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(p.detach().double(), w, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("name", ["galore", "dct", "qgalore", "apollo", "frugal"])
def test_bf16_second_moment_decays_only_in_float32(name, device):
    """After one gradient, zero gradients: V must decay as 0.999^t. With bfloat16 moments
    ``0.999 * V`` rounds back to V (the bug the float32 default avoids)."""
    steps = 12
    res = {}
    for mode in ("float32", "param"):
        torch.manual_seed(5)
        w, b, opt = _setup(name, torch.bfloat16, device, moment_dtype=mode, betas=(0.9, 0.999))
        g0 = [torch.randn_like(w), torch.randn_like(b)]
        _step(opt, [w, b], g0)
        v1 = {id(p): opt.state[p]["exp_avg_sq"].double().clone() for p in (w, b)}
        for _ in range(steps):
            _step(opt, [w, b], [torch.zeros_like(w), torch.zeros_like(b)])
        res[mode] = [(opt.state[p]["exp_avg_sq"].double(), v1[id(p)]) for p in (w, b)]
    for v, v1 in res["float32"]:
        assert v1.abs().max() > 0
        torch.testing.assert_close(v, v1 * 0.999**steps, rtol=1e-5, atol=0)
    for v, v1 in res["param"]:
        assert torch.equal(v, v1)  # stuck: what the default prevents


def test_fp16_second_moment_underflows_only_in_16_bits(device):
    """float16: (1 - b2) R^2 underflows for small R (V stays 0); float32 moments keep it."""
    out = {}
    for mode in ("float32", "param"):
        w, b, opt = _setup("galore", torch.float16, device, moment_dtype=mode, betas=(0.9, 0.999))
        _step(opt, [w, b], [torch.full_like(w, 2e-3), torch.full_like(b, 2e-3)])
        out[mode] = opt.state[b]["exp_avg_sq"]
    torch.testing.assert_close(out["float32"].double(), torch.full((16,), 1e-3 * 2e-3**2, dtype=torch.float64,
                                                                    device=device), rtol=1e-3, atol=0)
    assert torch.count_nonzero(out["param"]) == 0
