"""One projection op family for every projector kind: dense, DCT (basis + indices) and
packed INT4 (codes + group scale + minimum + rank + group size).

Each op (``projection_project``, ``projection_project_adam``, ``projection_backproject_apply``,
``projection_project_update_backproject``) on every backend, for every kind, equals the
reference run on the dense projector the kind stands for; one validator per op checks
every kind before anything is written."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import projection as pref

from .._numerics import assert_change_close, assert_close_f32
from ..conftest import require_backend

KINDS = ("dense", "dct", "int4")
SHAPES = [(37, 23, 5), (19, 41, 1), (16, 16, 16)]

# A direct call of a C++ kernel's op with bad input fails a bare TORCH_CHECK (the op layer's
# validators, which run before every routed call, have the messages).
BARE_CHECK = "to be true, but got false"


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("projection_project", name)
    return name


def make_projector(kind, m, n, rank, side, dtype=torch.float32, group_size=16):
    """(the projector as passed to the public API, its dense P in float32/its dtype)."""
    k = n if side == "right" else m
    if kind == "dct":
        idx = torch.randperm(k)[:rank].to(torch.int32)
        D = ops.DCTProjector(ops.dct_basis(k, dtype), idx)
        return D, D.dense(side)
    q = torch.linalg.qr(torch.randn(k, rank, dtype=torch.float64))[0]
    dense = (q.T if side == "right" else q).to(dtype).contiguous()
    if kind == "dense":
        return dense, dense
    Q = ops.Int4Projector.quantize(dense, group_size)
    return Q, Q.dequantize(torch.float32)


def _state(m, n, rank, side, dtype):
    ls = ops.lowrank_shape(m, n, rank, side)
    return (torch.randn(m, n, dtype=dtype), torch.randn(n, m, dtype=dtype).T,  # param, a transposed grad
            0.1 * torch.randn(ls), 0.1 * torch.rand(ls))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_op_every_kind_vs_dense_reference(backend, kind, m, n, rank, side, dtype):
    proj, dense = make_projector(kind, m, n, rank, side, dtype)
    w0, g, ea0, eas0 = _state(m, n, rank, side, dtype)
    outs = {}
    for be, p in (("reference", dense), (backend, proj)):
        ea, eas, w = ea0.clone(), eas0.clone(), w0.clone()
        with use_backend(be):
            R = ops.project(g, p, side=side)
            N = ops.project_adam_(g, p, ea, eas, side=side, beta1=0.8, beta2=0.9, eps=1e-6)
            ops.backproject_apply_(w, N, p, side=side, alpha=-0.3, decay=0.98)
            w1 = w.clone()
            ops.project_update_backproject_(w, g, p, ea, eas, side=side, lr=0.02, step=3, weight_decay=0.1, scale=0.5)
        outs[be] = (R, N, ea, eas, w1, w)
    (rR, rN, rea, reas, rw1, rw), (R, N, ea, eas, w1, w) = outs["reference"], outs[backend]
    assert R.dtype == torch.float32 and R.shape == ops.lowrank_shape(m, n, rank, side)
    assert_close_f32(R, rR, "project R")
    assert_close_f32(N, rN, "project_adam_ N")
    assert_close_f32(ea, rea, "exp_avg")
    assert_close_f32(eas, reas, "exp_avg_sq")
    # the change each in-place op made, not W
    assert_change_close(w1, w0, rw1, "backproject_apply_")
    assert_change_close(w, w1, rw + (w1.double() - rw1.double()), "project_update_backproject_")


def test_reference_kinds_are_the_dense_formula_float64():
    """The reference of every kind in float64: R = G P^T with P from the kind's own spec."""
    m, n, r = 14, 9, 3
    g = torch.randn(m, n, dtype=torch.float64)
    basis = ops.dct_basis(n, torch.float64)
    idx = torch.tensor([7, 0, 4])
    R = pref.projection_project_ref(g, basis, "right", idx)
    torch.testing.assert_close(R, g @ basis[[7, 0, 4]].T, rtol=1e-13, atol=1e-13)
    dense = torch.randn(r, n)
    Q = ops.Int4Projector.quantize(dense, 6)
    R4 = pref.projection_project_ref(g, Q.packed, "right", None, Q.scale, Q.minimum, r, 6)
    P4 = Q.dequantize(torch.float64)
    assert (P4 - dense.double()).abs().max() <= (Q.scale.max() / 2 + 1e-7)  # within half a step
    torch.testing.assert_close(R4, g @ P4.T, rtol=1e-13, atol=1e-13)


def test_plain_projection_takes_any_rank_up_to_the_dimension(backend):
    """projection_project has no Adam step: a DCT rank may exceed min(m, n) (dct_score_topk's R)."""
    g = torch.randn(5, 12)
    D = ops.DCTProjector(ops.dct_basis(12), torch.arange(12).flip(0).int())
    with use_backend(backend):
        R = ops.dct_project(g, D, side="right")
    torch.testing.assert_close(R, g @ D.dense("right").T, rtol=1e-5, atol=1e-5)
    with use_backend(backend), pytest.raises(ValueError, match=r"number of indices \(12\) must be between 1 and 5"):
        ops.project_adam_(g, D, torch.zeros(5, 12), torch.zeros(5, 12), side="right")


# --------------------------------------------------------------------------- validation
def _kind_cases():
    m, n, r = 12, 8, 3
    g = torch.randn(m, n)
    p = torch.randn(r, n)
    b, idx = ops.dct_basis(n), torch.tensor([1, 5, 2])
    Q = ops.Int4Projector.quantize(p, 8)
    ea, eas = torch.zeros(m, r), torch.zeros(m, r)
    adam = (0.9, 0.999, 1e-8)
    yield "indices and q_scale", (g, b, ea, eas, "right", *adam, idx, Q.scale, Q.minimum, r, 8), ValueError, "a projector is dense"
    yield "q_scale without q_min", (g, Q.packed, ea, eas, "right", *adam, None, Q.scale, None, r, 8), ValueError, "a projector is dense"
    yield "dense rank mismatch", (g, p, ea, eas, "right", *adam, None, None, None, 2, 0), ValueError, r"rank must be 0 or the projector's rank 3"
    yield "dense group_size", (g, p, ea, eas, "right", *adam, None, None, None, 0, 8), ValueError, "group_size is for packed INT4"
    yield "dct group_size", (g, b, ea, eas, "right", *adam, idx, None, None, 0, 4), ValueError, "group_size is for packed INT4"
    yield "int4 odd group", (g, Q.packed, ea, eas, "right", *adam, None, Q.scale, Q.minimum, r, 7), ValueError, "group_size must be a positive even int"
    yield "int4 rank 0", (g, Q.packed, ea, eas, "right", *adam, None, Q.scale, Q.minimum, 0, 8), ValueError, "rank of proj"
    yield "int4 wrong rank", (g, Q.packed, torch.zeros(m, 2), torch.zeros(m, 2), "right", *adam, None, Q.scale, Q.minimum, 2, 8), ValueError, "packed must have shape"
    yield "int4 float codes", (g, Q.packed.float(), ea, eas, "right", *adam, None, Q.scale, Q.minimum, r, 8), TypeError, "packed must be uint8"
    yield "dct float indices", (g, b, ea, eas, "right", *adam, idx.float(), None, None, 0, 0), TypeError, "indices must be int32 or int64"
    yield "dct basis shape", (g, ops.dct_basis(12), ea, eas, "right", *adam, idx, None, None, 0, 0), ValueError, r"basis must have shape \(8, 8\)"
    yield "dct index range", (g, b, ea, eas, "right", *adam, torch.tensor([1, 8, 0]), None, None, 0, 0), ValueError, r"indices must lie in \[0, 8\)"
    buf = torch.zeros(m * r)
    yield "int4 aliasing", (g, Q.packed, buf.view(m, r), eas, "right", *adam, None, Q.scale, buf[:3], r, 8), ValueError, "exp_avg and minimum share memory"


@pytest.mark.parametrize("case", [c[0] for c in _kind_cases()])
def test_op_validator_covers_every_kind_before_any_write(backend, case):
    _, args, exc, msg = next(c for c in _kind_cases() if c[0] == case)
    snap = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with use_backend(backend), pytest.raises(exc, match=msg):
        torch.ops.lowrank_kernels.projection_project_adam.default(*args)
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], snap))


def test_cpp_ops_check_every_kind_directly():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    OPS = torch.ops._lowrank_kernels
    m, n, r = 12, 8, 3
    g, w = torch.randn(m, n), torch.randn(m, n)
    ea, eas = torch.zeros(m, r), torch.zeros(m, r)
    b = ops.dct_basis(n)
    Q = ops.Int4Projector.quantize(torch.randn(r, n), 8)
    w0 = w.clone()
    cases = [
        (lambda: OPS.projection_project_adam_cpu(g, b, ea, eas, "right", 0.9, 0.9, 1e-8, torch.tensor([0, 8, 1])), r"indices must lie in \[0, 8\)"),
        (lambda: OPS.projection_project_adam_cpu(g, b, ea, eas, "right", 0.9, 0.9, 1e-8, torch.tensor([0.0, 1.0, 2.0])), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g, ops.dct_basis(12), ea, eas, "right", 0.9, 0.9, 1e-8, torch.tensor([0, 1, 2])), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, ea, Q.packed[:-1], "right", 1.0, 1.0, None, Q.scale, Q.minimum, r, 8), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, ea, Q.packed, "right", 1.0, 1.0, None, Q.scale.double(), Q.minimum, r, 8), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, ea, Q.packed, "right", 1.0, 1.0, None, Q.scale, Q.minimum, r, 5), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, ea, Q.packed, "right", 1.0, 1.0, torch.tensor([0, 1, 2]), Q.scale, Q.minimum, r, 8), BARE_CHECK),
        (lambda: OPS.projection_project_cpu(g, torch.randn(r, n), "right", None, None, None, 0, 4), BARE_CHECK),
        (lambda: OPS.projection_project_cpu(g, torch.randn(r, n), "right", None, None, None, 2, 0), BARE_CHECK),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
    assert torch.equal(w, w0) and not ea.any() and not eas.any()


def test_legacy_projector_type_registration_still_works():
    """register_projector_type with the three callables (a kind the ops do not know) still routes."""
    from lowrank_kernels.ops import projection as P

    class Scaled:
        def __init__(self, p, s):
            self.p, self.s = p, s

    calls = []

    def pa(grad, proj, exp_avg, exp_avg_sq, *, side, beta1, beta2, eps):
        calls.append("pa")
        return ops.project_adam_(grad, proj.p * proj.s, exp_avg, exp_avg_sq, side=side, beta1=beta1, beta2=beta2, eps=eps)

    def ba(param, update, proj, *, side, alpha, decay):
        calls.append("ba")
        ops.backproject_apply_(param, update, proj.p * proj.s, side=side, alpha=alpha, decay=decay)

    def pub(param, grad, proj, exp_avg, exp_avg_sq, **kw):
        calls.append("pub")
        ops.project_update_backproject_(param, grad, proj.p * proj.s, exp_avg, exp_avg_sq, **kw)

    with pytest.raises(TypeError, match="give op_args"):
        P.register_projector_type(Scaled, project_adam_=pa)
    P.register_projector_type(Scaled, project_adam_=pa, backproject_apply_=ba, project_update_backproject_=pub)
    try:
        g, p = torch.randn(6, 5), torch.randn(2, 5)
        ea, eas, w = torch.zeros(6, 2), torch.zeros(6, 2), torch.randn(6, 5)
        n = ops.project_adam_(g, Scaled(p, 2.0), ea, eas, side="right")
        ops.backproject_apply_(w, n, Scaled(p, 2.0), side="right", alpha=0.1)
        ops.project_update_backproject_(w, g, Scaled(p, 2.0), ea, eas, side="right", lr=0.1, step=1)
        assert calls == ["pa", "ba", "pub"]
        with pytest.raises(TypeError, match="does not map onto"):
            ops.project(g, Scaled(p, 2.0), side="right")
    finally:
        P._STRUCTURED.pop(Scaled)
