"""The orth family: Newton-Schulz orthogonalization (``ops.newton_schulz`` and its list form).

Every backend against a float64 evaluation of the reference on random odd shapes (wide,
tall, square, a single row, empty), both named coefficient schedules and an explicit one;
the list form bitwise equal to the single op on the same backend; what the iteration is
for (singular values pushed towards 1, singular vectors kept); bad input raises before
anything runs."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import orth as ref

from ..conftest import require_backend

SHAPES = [(5, 19), (23, 6), (7, 7), (1, 9), (33, 40), (70, 3)]


@pytest.fixture(params=reg.BACKENDS)
def backend(request, device):
    require_backend("orth_newton_schulz", request.param, device)
    return request.param


def _exact(x, schedule):
    return ref.orth_newton_schulz_ref(x.double().cpu(), ref.flat(ref.NS_COEFFICIENTS[schedule]
                                                                 if isinstance(schedule, str) else schedule), 1e-7)


CASES = [(s, "dion") for s in SHAPES] + [((5, 19), "muon"), ((23, 6), ((2.0, -1.5, 0.5),) * 3)]


@pytest.mark.parametrize("shape,schedule", CASES)
def test_matches_float64_reference(backend, device, shape, schedule):
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, device=device)
    with use_backend(backend):
        y = ops.newton_schulz(x, schedule)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
    err = (y.double().cpu() - _exact(x, schedule)).abs().max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_read_exactly(backend, device, dtype):
    x = torch.randn(9, 26, device=device).to(dtype)
    with use_backend(backend):
        y = ops.newton_schulz(x, "dion")
    assert y.dtype == torch.float32
    assert (y.double().cpu() - _exact(x.float(), "dion")).abs().max().item() < 2e-5


def test_float64_is_exact_on_cpu_backends(device):
    x = torch.randn(11, 4, dtype=torch.float64, device=device)
    for be in ("reference", "cpp"):
        if reg.why_unavailable(reg.OPS["orth_newton_schulz"], be, x.device) is not None:
            continue
        with use_backend(be):
            y = ops.newton_schulz(x, "muon")
        assert y.dtype == torch.float64
        assert (y.cpu() - _exact(x, "muon")).abs().max().item() < 1e-12


def test_orthogonalizes():
    """Singular values land in the schedule's band around 1; the singular vectors are kept."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    s = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    x = (u * s) @ v.T
    y = ops.newton_schulz(x, "dion")
    sv = torch.linalg.svdvals(y)
    assert 0.6 < sv.min() and sv.max() < 1.25, sv
    # y = U f(S) V^T with f > 0: projecting back onto the input's singular vectors is diagonal
    core = u.T @ y @ v
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-10


def test_empty_and_zero_steps(backend, device):
    with use_backend(backend):
        assert ops.newton_schulz(torch.zeros(0, 5, device=device)).shape == (0, 5)
        x = torch.randn(3, 8, device=device)
        y = ops.newton_schulz(x, ())  # no iteration: the normalization alone
    assert torch.allclose(y, x / (x.norm() + 1e-7), atol=1e-7)


def test_list_form_is_bitwise_the_single_op(backend, device):
    torch.manual_seed(3)
    xs = [torch.randn(s, device=device) for s in [(5, 19), (23, 6), (5, 19)]]
    xs.append(torch.randn(19, 5, device=device).T)  # a transposed view
    with use_backend(backend):
        outs = ops.foreach_newton_schulz(xs, "dion")
        singles = [ops.newton_schulz(x, "dion") for x in xs]
        assert ops.foreach_newton_schulz([], "dion") == []
    for o, s in zip(outs, singles):
        assert torch.equal(o, s)


def test_bad_input_is_refused():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="newton_schulz: x must be 2-D"):
        ops.newton_schulz(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ops.newton_schulz(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="coefficients must be one of .muon., .dion."):
        ops.newton_schulz(x, "cubic")
    with pytest.raises(ValueError, match=r"coefficients\[1\] must be an \(a, b, c\) triple"):
        ops.newton_schulz(x, [(1.0, 2.0, 3.0), (1.0, 2.0)])
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        ops.newton_schulz(x, eps=-1.0)
    with pytest.raises(ValueError, match="coefficients must hold"):
        torch.ops.lowrank_kernels.orth_newton_schulz(x, [1.0, 2.0], 1e-7)
    with pytest.raises(ValueError, match=r"xs\[1\] must be 2-D"):
        ops.foreach_newton_schulz([x, torch.randn(3)])
