"""The projection family on every backend: reference vs float64 math, backends vs reference,
opcheck, odd shapes and ranks, non-contiguous gradients, bad input that changes nothing."""
import math

import numpy as np
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from .._numerics import F32_RTOL, assert_change_close, assert_close_f32, assert_flash_rule
from ..conftest import require_backend

SHAPES = [(123, 77), (64, 300), (33, 33), (5, 17)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("projection_project_adam", name)
    return name


@pytest.fixture(params=reg.BACKENDS)
def dev_backend(request, device):
    """Each backend that can run on the test device (CPU, or CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda)."""
    name = request.param
    require_backend("projection_project_adam", name, device)
    return name


def make_inputs(m, n, rank, side, dtype, moment_dtype=torch.float32, transposed_grad=False):
    if transposed_grad:
        grad = torch.randn(n, m, dtype=dtype).T  # non-contiguous view
    else:
        grad = torch.randn(m, n, dtype=dtype)
    if side == "right":
        proj = torch.linalg.qr(torch.randn(n, rank, dtype=torch.float64))[0].T.to(dtype)
        lshape = (m, rank)
    else:
        proj = torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64))[0].to(dtype)
        lshape = (rank, n)
    exp_avg = (0.1 * torch.randn(lshape)).to(moment_dtype)
    exp_avg_sq = (0.1 * torch.rand(lshape)).to(moment_dtype)
    return grad, proj, exp_avg, exp_avg_sq


def ranks_for(m, n):
    return sorted({1, min(m, n) // 3 + 1, min(m, n)})


# --------------------------------------------------------------------------- reference vs float64 numpy
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n", SHAPES[:2])
def test_reference_matches_numpy_float64(side, m, n):
    rank = 7
    grad, proj, ea, eas = make_inputs(m, n, rank, side, torch.float64, torch.float64)
    G, P, M0, V0 = (t.numpy().copy() for t in (grad, proj, ea, eas))
    b1, b2, eps = 0.9, 0.99, 1e-6
    R = G @ P.T if side == "right" else P.T @ G
    M = b1 * M0 + (1 - b1) * R
    V = b2 * V0 + (1 - b2) * R * R
    N = M / (np.sqrt(V) + eps)
    with use_backend("reference"):
        out = ops.project_adam_(grad, proj, ea, eas, side=side, beta1=b1, beta2=b2, eps=eps)
    np.testing.assert_allclose(out.numpy(), N, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ea.numpy(), M, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(eas.numpy(), V, rtol=1e-12, atol=1e-14)

    W0 = np.random.default_rng(0).standard_normal((m, n))
    w = torch.from_numpy(W0.copy())
    with use_backend("reference"):
        ops.backproject_apply_(w, out, proj, side=side, alpha=-0.3, decay=0.99)
    back = N @ P if side == "right" else P @ N
    np.testing.assert_allclose(w.numpy(), 0.99 * W0 - 0.3 * back, rtol=1e-12, atol=1e-12)


def test_reference_fused_step_is_adamw_formula():
    m, n, rank, side = 40, 30, 5, "right"
    grad, proj, ea, eas = make_inputs(m, n, rank, side, torch.float64, torch.float64)
    w = torch.randn(m, n, dtype=torch.float64)
    w0, ea0, eas0 = w.clone(), ea.clone(), eas.clone()
    lr, b1, b2, eps, step, wd, scale = 0.01, 0.9, 0.999, 1e-8, 3, 0.1, 0.25
    with use_backend("reference"):
        ops.project_update_backproject_(
            w, grad, proj, ea, eas, side=side, lr=lr, beta1=b1, beta2=b2, eps=eps, step=step,
            weight_decay=wd, scale=scale,
        )
    R = grad @ proj.T
    M = b1 * ea0 + (1 - b1) * R
    V = b2 * eas0 + (1 - b2) * R * R
    step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    expect = w0 * (1 - lr * wd) - step_size * scale * (M / (V.sqrt() + eps)) @ proj
    torch.testing.assert_close(w, expect, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- backends vs reference
# On the `device` fixture (CPU; CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda). Tolerances at
# the size of the real error (python_tests/_numerics.py): float32 outputs elementwise at
# ~1e-5, apply ops by their change, 16-bit outputs by flash-attention's rule.
def run_both(backend, fn, *tensors):
    """Run ``fn`` on copies of ``tensors`` with the reference and with ``backend``."""
    ref_in = [t.clone() for t in tensors]
    out_in = [t.clone() if t.is_contiguous() else t.T.clone().T for t in tensors]
    with use_backend("reference"):
        r = fn(*ref_in)
    with use_backend(backend):
        o = fn(*out_in)
    return (r, ref_in), (o, out_in)


def truth64(fn, *tensors):
    """``fn`` on float64 copies (the reference computes in float64 then): the truth."""
    ins = [t.double() for t in tensors]
    with use_backend("reference"):
        r = fn(*ins)
    return r, ins


def _on(device, *tensors):
    return [t.to(device) if t.is_contiguous() else t.T.contiguous().to(device).T for t in tensors]


def _plain_adam(g, p, ea, eas, side, b1, b2, eps, dt):
    """Plain PyTorch in dtype ``dt`` (every op rounds to ``dt``)."""
    g, p, ea, eas = (t.to(dt) for t in (g, p, ea, eas))
    r = g @ p.T if side == "right" else p.T @ g
    m = ea * b1 + r * (1 - b1)
    v = eas * b2 + r * r * (1 - b2)
    return m / (v.sqrt() + eps), m, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_project_adam_backend_vs_reference(dev_backend, device, dtype, side, m, n):
    b1, b2, eps = 0.9, 0.95, 1e-6

    def fn(g, p, ea, eas):
        return ops.project_adam_(g, p, ea, eas, side=side, beta1=b1, beta2=b2, eps=eps)

    for rank in ranks_for(m, n):
        for moment_dtype in {torch.float32, dtype}:
            inputs = _on(device, *make_inputs(m, n, rank, side, dtype, moment_dtype, transposed_grad=(rank == 1)))
            (r, (_, _, rea, reas)), (o, (_, _, oea, oeas)) = run_both(dev_backend, fn, *inputs)
            assert o.shape == r.shape and o.dtype == moment_dtype
            what = f"rank {rank}, moments {moment_dtype}"
            if moment_dtype in (torch.float32, torch.float64):
                assert_close_f32(oea, rea, f"exp_avg, {what}")
                assert_close_f32(oeas, reas, f"exp_avg_sq, {what}")
                assert_close_f32(o, r, f"N, {what}", rtol=4 * F32_RTOL)
            else:  # 16-bit moments and N: against float64, vs plain PyTorch in that dtype
                t, (_, _, tea, teas) = truth64(fn, *inputs)
                pn, pm, pv = _plain_adam(*inputs, side, b1, b2, eps, dtype)
                assert_flash_rule(oea, tea, pm, f"exp_avg, {what}")
                assert_flash_rule(oeas, teas, pv, f"exp_avg_sq, {what}")
                assert_flash_rule(o, t, pn, f"N, {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_backproject_apply_backend_vs_reference(dev_backend, device, dtype, side, m, n):
    alpha, decay = -0.7, 0.999

    def fn(w_, u_, p_):
        ops.backproject_apply_(w_, u_, p_, side=side, alpha=alpha, decay=decay)

    for rank in ranks_for(m, n):
        _, proj, upd, _ = make_inputs(m, n, rank, side, dtype, dtype)
        w, upd, proj = _on(device, torch.randn(m, n, dtype=dtype), upd, proj)
        (_, (rw, _, _)), (_, (ow, _, _)) = run_both(dev_backend, fn, w, upd, proj)
        if dtype == torch.float32:
            assert_change_close(ow, w, rw, f"W, rank {rank}")
        else:
            _, (tw, _, _) = truth64(fn, w, upd, proj)
            plain = w * decay + alpha * (upd @ proj if side == "right" else proj @ upd)
            assert_flash_rule(ow, tw, plain, f"W, rank {rank}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_fused_step_backend_vs_reference(dev_backend, device, dtype, side):
    m, n = 123, 77
    lr, b1, b2, eps, step, wd, scale = 0.01, 0.9, 0.999, 1e-8, 5, 0.1, 0.25

    def fn(w_, g_, p_, ea_, eas_):
        ops.project_update_backproject_(
            w_, g_, p_, ea_, eas_, side=side, lr=lr, beta1=b1, beta2=b2, eps=eps, step=step,
            weight_decay=wd, scale=scale,
        )

    for rank in (1, 20, 77):
        g, p, ea, eas = make_inputs(m, n, rank, side, dtype, torch.float32, transposed_grad=True)
        w, g, p, ea, eas = _on(device, torch.randn(m, n, dtype=dtype), g, p, ea, eas)
        (_, (rw, _, _, rea, reas)), (_, (ow, _, _, oea, oeas)) = run_both(dev_backend, fn, w, g, p, ea, eas)
        assert_close_f32(oea, rea, f"exp_avg, rank {rank}")
        assert_close_f32(oeas, reas, f"exp_avg_sq, rank {rank}")
        if dtype == torch.float32:
            assert_change_close(ow, w, rw, f"W, rank {rank}", rtol=4 * F32_RTOL)
        else:
            _, (tw, *_) = truth64(fn, w, g, p, ea, eas)
            nn_, _, _ = _plain_adam(g, p, ea, eas, side, b1, b2, eps, torch.float32)
            step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
            nd, pd = nn_.to(dtype), p.to(dtype)
            plain = w * (1 - lr * wd) - (step_size * scale) * (nd @ pd if side == "right" else pd @ nd)
            assert_flash_rule(ow, tw, plain, f"W, rank {rank}")


def test_fused_step_equals_two_ops(backend):
    m, n, rank, side = 50, 70, 9, "left"
    g, p, ea, eas = make_inputs(m, n, rank, side, torch.float32)
    w = torch.randn(m, n)
    w2, ea2, eas2 = w.clone(), ea.clone(), eas.clone()
    with use_backend(backend):
        ops.project_update_backproject_(w, g, p, ea, eas, side=side, lr=0.02, step=2, weight_decay=0.05, scale=0.5)
        nn_ = ops.project_adam_(g, p, ea2, eas2, side=side)
        step_size = 0.02 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
        ops.backproject_apply_(w2, nn_, p, side=side, alpha=-step_size * 0.5, decay=1 - 0.02 * 0.05)
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ea, ea2)


# --------------------------------------------------------------------------- opcheck
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_cases():
    g, p, ea, eas = make_inputs(20, 13, 4, "right", torch.float32)
    w = torch.randn(20, 13)
    yield "projection_project_adam", (g, p, ea, eas, "right", 0.9, 0.999, 1e-8)
    gl, pl, eal, easl = make_inputs(13, 20, 4, "left", torch.bfloat16, torch.bfloat16)
    yield "projection_project_adam", (gl, pl, eal, easl, "left", 0.9, 0.999, 1e-8)
    yield "projection_backproject_apply", (w, ea, p, "right", -0.5, 0.9)
    yield "projection_project_update_backproject", (w, g, p, ea, eas, "right", 0.01, 0.9, 0.999, 1e-8, 3, 0.1, 0.25)


@pytest.mark.parametrize("case", range(4))
def test_opcheck(backend, case):
    name, args = list(_opcheck_cases())[case]
    with use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.lowrank_kernels, name).default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("case", range(4))
def test_opcheck_cpp_op_directly(case):
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops._lowrank_kernels, name + "_cpu").default, args, test_utils=OPCHECK_TESTS)


# --------------------------------------------------------------------------- bad input
def _bad_cases():
    g, p, ea, eas = make_inputs(12, 8, 3, "right", torch.float32)
    w = torch.randn(12, 8)
    good = dict(grad=g, proj=p, exp_avg=ea, exp_avg_sq=eas)
    yield "wrong side", dict(good, side="up"), ValueError, "side must be 'left' or 'right'"
    yield "3-D grad", dict(good, grad=torch.randn(12, 8, 1)), ValueError, "grad must be 2-D"
    yield "proj wrong n", dict(good, proj=torch.randn(3, 9)), ValueError, r"proj of shape \(rank, n\)"
    yield "rank too big", dict(good, proj=torch.randn(9, 8), exp_avg=torch.zeros(12, 9), exp_avg_sq=torch.zeros(12, 9)), ValueError, "rank of proj"
    yield "moment shape", dict(good, exp_avg=torch.zeros(12, 4)), ValueError, "exp_avg must have shape"
    yield "int grad", dict(good, grad=torch.ones(12, 8, dtype=torch.int32)), TypeError, "grad must have a floating dtype"
    yield "int proj", dict(good, proj=p.to(torch.int64)), TypeError, "proj must have a floating dtype"
    yield "moment dtype", dict(good, exp_avg=ea.half(), exp_avg_sq=eas.half()), TypeError, "exp_avg must be float32, float64, bfloat16 or the parameter dtype"
    yield "mixed moments", dict(good, exp_avg_sq=eas.double()), TypeError, "must have one dtype"
    yield "meta device", dict(good, proj=p.to("meta")), ValueError, "all tensors must be on one device"
    yield "aliasing", dict(good, exp_avg_sq=ea), ValueError, "share memory"
    yield "bad beta", dict(good, beta1=1.0), ValueError, "beta1 must be in"


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()])
def test_project_adam_bad_input_changes_nothing(backend, case):
    _, kwargs, exc, msg = next(c for c in _bad_cases() if c[0] == case)
    kwargs = dict(kwargs)
    kwargs.setdefault("side", "right")
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with use_backend(backend), pytest.raises(exc, match=msg):
        ops.project_adam_(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"


def test_backproject_apply_bad_input_changes_nothing(backend):
    w = torch.randn(12, 8)
    w0 = w.clone()
    p = torch.randn(3, 8)
    with use_backend(backend):
        with pytest.raises(ValueError, match="update must have shape"):
            ops.backproject_apply_(w, torch.randn(3, 12), p, side="right", alpha=1.0)
        with pytest.raises(ValueError, match="side='left' needs proj"):
            ops.backproject_apply_(w, torch.randn(3, 8), p, side="left", alpha=1.0)
        with pytest.raises(ValueError, match="param and update share memory"):
            ops.backproject_apply_(w, w[:, :3], torch.randn(3, 8), side="right", alpha=1.0)
        with pytest.raises(TypeError, match="param must have a floating dtype"):
            ops.backproject_apply_(w.long(), torch.randn(12, 3), p, side="right", alpha=1.0)
    assert torch.equal(w, w0)


def test_fused_step_bad_input_changes_nothing(backend):
    g, p, ea, eas = make_inputs(12, 8, 3, "right", torch.float32)
    w = torch.randn(12, 8)
    snap = [t.clone() for t in (w, ea, eas)]
    with use_backend(backend):
        with pytest.raises(ValueError, match="grad must have shape"):
            ops.project_update_backproject_(w[:6], g, p, ea, eas, side="right", lr=0.1, step=1)
        with pytest.raises(ValueError, match="step must be >= 1"):
            ops.project_update_backproject_(w, g, p, ea, eas, side="right", lr=0.1, step=0)
    for a, b in zip((w, ea, eas), snap):
        assert torch.equal(a, b)


def test_allocations_are_poisoned_in_kernel_tests():
    # python_tests/ops/conftest.py: an output element a kernel leaves unwritten must not
    # look valid, so new tensors start as NaN / out-of-range integers here.
    assert torch.empty(5).isnan().all()
    assert (torch.empty(3, dtype=torch.uint8) == 0xAB).all()
    assert (torch.empty(3, dtype=torch.int32) == -7).all()
