"""The adam family: the elementwise Adam moment update on an already projected R
(APOLLO, FRUGAL), on every backend, against float64 math and the reference."""
import numpy as np
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from ..conftest import TOL, require_backend

# A direct call of a C++ kernel's op with bad input fails a bare TORCH_CHECK (the op layer's
# validators, which run before every routed call, have the messages).
BARE_CHECK = "to be true, but got false"


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("adam_update", name)
    return name


def test_reference_matches_numpy_float64():
    r = torch.randn(17, 5, dtype=torch.float64)
    m0, v0 = 0.1 * torch.randn(17, 5, dtype=torch.float64), 0.1 * torch.rand(17, 5, dtype=torch.float64)
    R, M0, V0 = r.numpy(), m0.numpy().copy(), v0.numpy().copy()
    M = 0.8 * M0 + 0.2 * R
    V = 0.95 * V0 + 0.05 * R * R
    m, v = m0.clone(), v0.clone()
    with use_backend("reference"):
        n = ops.adam_update_(r, m, v, beta1=0.8, beta2=0.95, eps=1e-6)
    np.testing.assert_allclose(m.numpy(), M, rtol=1e-13)
    np.testing.assert_allclose(v.numpy(), V, rtol=1e-13)
    np.testing.assert_allclose(n.numpy(), M / (np.sqrt(V) + 1e-6), rtol=1e-12)


@pytest.mark.parametrize("moment_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(123, 77), (1, 5), (3000,), (9, 1031)])
def test_backend_vs_reference(backend, dtype, moment_dtype, shape):
    md = dtype if moment_dtype == "same" else moment_dtype
    r = torch.randn(shape).to(dtype)
    m0, v0 = (0.1 * torch.randn(shape)).to(md), (0.1 * torch.rand(shape)).to(md)
    outs = {}
    for be in ("reference", backend):
        m, v = m0.clone(), v0.clone()
        with use_backend(be):
            n = ops.adam_update_(r, m, v, beta1=0.9, beta2=0.99, eps=1e-8)
        outs[be] = (n, m, v)
    tol = max(TOL[md], 1e-6)
    for a, b in zip(outs[backend], outs["reference"]):
        assert a.dtype == md and a.shape == r.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_equals_identity_projector_step(backend):
    """The op is project_adam_ with an identity projector, without the GEMM."""
    r = torch.randn(40, 6)
    m0, v0 = 0.1 * torch.randn(40, 6), 0.1 * torch.rand(40, 6)
    m1, v1, m2, v2 = m0.clone(), v0.clone(), m0.clone(), v0.clone()
    with use_backend(backend):
        n1 = ops.adam_update_(r, m1, v1, beta1=0.9, beta2=0.999, eps=1e-8)
        n2 = ops.project_adam_(r, torch.eye(6), m2, v2, side="right", beta1=0.9, beta2=0.999, eps=1e-8)
    for a, b in ((n1, n2), (m1, m2), (v1, v2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_contiguous_moments_updated_in_place(backend):
    r = torch.randn(9, 13).T  # 13 x 9, transposed
    m_store, v_store = 0.1 * torch.randn(9, 13), 0.1 * torch.rand(9, 13)
    m, v = m_store.T, v_store.T
    mr, vr = m.clone(), v.clone()
    with use_backend("reference"):
        nr = ops.adam_update_(r, mr, vr)
    with use_backend(backend):
        n = ops.adam_update_(r, m, v)
    torch.testing.assert_close(m_store.T, mr, rtol=1e-6, atol=1e-7)  # written through the views
    torch.testing.assert_close(v_store.T, vr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(n, nr, rtol=1e-6, atol=1e-7)


def test_float64_on_reference_and_cpp(backend):
    if backend == "triton":
        r = torch.randn(4, 3, dtype=torch.float64)
        m, v = torch.zeros_like(r), torch.zeros_like(r)
        with use_backend("triton"), pytest.raises(TypeError, match="float64"):
            ops.adam_update_(r, m, v)
        assert not m.any() and not v.any()
        return
    r = torch.randn(4, 3, dtype=torch.float64)
    m, v = torch.zeros_like(r), torch.zeros_like(r)
    with use_backend(backend):
        n = ops.adam_update_(r, m, v, beta1=0.0, beta2=0.0, eps=0.0)
    torch.testing.assert_close(n, r / r.abs(), rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------- bad input
def _bad_cases():
    r = torch.randn(6, 4)
    m, v = torch.zeros(6, 4), torch.zeros(6, 4)
    yield "shape", dict(r=r, exp_avg=torch.zeros(6, 3), exp_avg_sq=v), ValueError, r"exp_avg must have shape \(6, 4\)"
    yield "int r", dict(r=r.long(), exp_avg=m, exp_avg_sq=v), TypeError, "r must have a floating dtype"
    yield "moment dtype", dict(r=r, exp_avg=m.half(), exp_avg_sq=v.half()), TypeError, "exp_avg must be float32, float64, bfloat16 or the parameter dtype"
    yield "mixed moments", dict(r=r, exp_avg=m, exp_avg_sq=v.double()), TypeError, "must have one dtype"
    yield "aliasing", dict(r=r, exp_avg=m, exp_avg_sq=m), ValueError, "share memory"
    yield "r aliasing", dict(r=m, exp_avg=m, exp_avg_sq=v), ValueError, "exp_avg and r share memory"
    yield "beta", dict(r=r, exp_avg=m, exp_avg_sq=v, beta2=1.0), ValueError, "beta2 must be in"
    yield "device", dict(r=r.to("meta"), exp_avg=m, exp_avg_sq=v), ValueError, "all tensors must be on one device"


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()])
def test_bad_input_changes_nothing(backend, case):
    _, kw, exc, msg = next(c for c in _bad_cases() if c[0] == case)
    snap = {k: t.clone() for k, t in kw.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    with use_backend(backend), pytest.raises(exc, match=msg):
        ops.adam_update_(**kw)
    for k, t in snap.items():
        assert torch.equal(kw[k], t), k


def test_cpp_op_checks_directly():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    m, v = torch.zeros(6, 4), torch.zeros(6, 4)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        torch.ops._lowrank_kernels.adam_update_cpu(torch.randn(6, 5), m, v, 0.9, 0.9, 1e-8)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        torch.ops._lowrank_kernels.adam_update_cpu(torch.randn(6, 4), m, v.double(), 0.9, 0.9, 1e-8)
    assert not m.any() and not v.any()
