"""The C++ CPU kernels of the projection family (csrc/cpu/projection/), beyond the shared
backend tests of test_projection.py: float64 and mixed dtypes, shapes that span several
panels (on one and two threads), strided layouts that take the kernels' other loops, no
full-size temporary, and the private C++ ops' own checks when called directly."""

import pytest
import torch

from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.reference import projection as ref

from .._numerics import assert_change_close, assert_close_f32, assert_matches_backend, assert_within_roundings
from ..conftest import TOL, require_backend

OPS = torch.ops._lowrank_kernels  # the C++ kernels' private ops
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-6)
STEP_ARGS = (0.01, 0.9, 0.999, 1e-8, 5, 0.1, 0.25)  # lr, beta1, beta2, eps, step, weight_decay, scale

# A direct call of a C++ kernel's op with bad input fails a bare TORCH_CHECK (the op layer's
# validators, which run before every routed call, have the messages).
BARE_CHECK = "to be true, but got false"


@pytest.fixture(autouse=True)
def _need_cpp():
    require_backend("projection_project_adam", "cpp")


def _projector(m, n, rank, side, dtype):
    if side == "right":
        return torch.linalg.qr(torch.randn(n, rank, dtype=torch.float64))[0].T.to(dtype)
    return torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64))[0].to(dtype)


def _inputs(m, n, rank, side, gdtype, pdtype, mdtype, wdtype=None):
    lshape = (m, rank) if side == "right" else (rank, n)
    return dict(
        grad=torch.randn(m, n, dtype=gdtype),
        proj=_projector(m, n, rank, side, pdtype),
        exp_avg=(0.1 * torch.randn(lshape)).to(mdtype),
        exp_avg_sq=(0.1 * torch.rand(lshape)).to(mdtype),
        param=torch.randn(m, n, dtype=wdtype or gdtype),
    )


def _tol(*dtypes):
    return max(TOL[d] for d in dtypes)


def _check_all_three(t, side, tol):
    """The three _cpu ops on ``t`` (strides kept) against the reference on clones of it."""
    g, p, ea, eas, w = t["grad"], t["proj"], t["exp_avg"], t["exp_avg_sq"], t["param"]

    # project_adam
    ra, rb = ea.clone(), eas.clone()
    ca, cb = ea.clone(), eas.clone()
    n_ref = ref.projection_project_adam_ref(g, p, ra, rb, side, HYPER["beta1"], HYPER["beta2"], HYPER["eps"])
    n_cpp = OPS.projection_project_adam_cpu(g, p, ca, cb, side, HYPER["beta1"], HYPER["beta2"], HYPER["eps"])
    assert n_cpp.dtype == ea.dtype and n_cpp.shape == ea.shape
    assert_matches_backend(ca, ra, "exp_avg")
    assert_matches_backend(cb, rb, "exp_avg_sq")
    assert_matches_backend(n_cpp, n_ref, "N", rtol=4e-5)

    # backproject_apply (update: N in the moments' dtype, as an optimizer passes it)
    upd = n_ref.clone()
    rw, cw = w.clone(), w.clone()
    ref.projection_backproject_apply_ref(rw, upd, p, side, -0.7, 0.999)
    OPS.projection_backproject_apply_cpu(cw, upd, p, side, -0.7, 0.999)
    _check_weight(cw, w, rw, "backproject_apply W")

    # fused step
    ra, rb, rw = ea.clone(), eas.clone(), w.clone()
    ca, cb, cw = ea.clone(), eas.clone(), w.clone()
    ref.projection_project_update_backproject_ref(rw, g, p, ra, rb, side, *STEP_ARGS)
    OPS.projection_project_update_backproject_cpu(cw, g, p, ca, cb, side, *STEP_ARGS)
    assert_matches_backend(ca, ra, "fused exp_avg")
    assert_matches_backend(cb, rb, "fused exp_avg_sq")
    _check_weight(cw, w, rw, "fused W")


def _check_weight(cw, w, rw, what):
    """float32/float64 weights by their change, elementwise; 16-bit ones within one rounding."""
    if cw.dtype in (torch.float32, torch.float64):
        assert_change_close(cw, w, rw, what, rtol=4e-5 if cw.dtype == torch.float32 else 1e-10)
    else:
        assert_within_roundings(cw, rw, what)


# --------------------------------------------------------------------------- dtypes
DTYPE_CASES = [
    # grad/param, proj, moments
    (torch.float64, torch.float64, torch.float64),
    (torch.float64, torch.float64, torch.float32),  # float64 math, N rounded to float32 moments
    (torch.float32, torch.float64, torch.float32),  # a float64 projector makes the math float64
    (torch.bfloat16, torch.float32, torch.float32),  # projector dtype differs from the gradient's
    (torch.float16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("gd,pd,md", DTYPE_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_dtypes_vs_reference(gd, pd, md, side):
    for m, n in ((123, 77), (40, 97)):
        for rank in (1, 13):
            t = _inputs(m, n, rank, side, gd, pd, md)
            tol = _tol(gd, pd, md) if torch.float64 not in (gd, pd) else (1e-10 if md == torch.float64 else 1e-6)
            _check_all_three(t, side, tol)


# --------------------------------------------------------------------------- panels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_panels_vs_reference(dtype, side, threads):
    """Shapes whose rows (and K, for the left side's weight panels) span several panels,
    with last panels of odd length; rank = min(m, n) too."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, n, rank in ((600, 300, 3), (300, 600, 5), (300, 257, 257), (257, 300, 40)):
            t = _inputs(m, n, rank, side, dtype, dtype, torch.float32)
            _check_all_three(t, side, TOL[dtype])
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- layouts
def _layout(t, which):
    """``t`` with the same values in another memory layout."""
    if which == "contiguous":
        return t
    if which == "transposed":
        return t.T.contiguous().T
    if which == "strided":  # neither stride is 1
        base = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        v = base[:, ::2]
        v.copy_(t)
        return v
    raise ValueError(which)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("what", ["grad", "proj", "moments", "param", "all"])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_layouts_vs_reference(side, what, layout):
    """Non-contiguous inputs and in-place outputs take the other loops (moments'
    epilogue over the whole tensors, the weight update over K panels) and must match."""
    for dtype, mdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        t = _inputs(150, 90, 7, side, dtype, dtype, mdtype)
        for key in ("grad", "proj", "param"):
            if what in (key, "all"):
                t[key] = _layout(t[key], layout)
        if what in ("moments", "all"):
            t["exp_avg"] = _layout(t["exp_avg"], layout)
            t["exp_avg_sq"] = _layout(t["exp_avg_sq"], layout)
        _check_all_three(t, side, _tol(dtype, mdtype))


def test_moments_updated_in_place_through_views():
    """The moments are views into larger buffers: only their elements change."""
    t = _inputs(64, 48, 6, "right", torch.float32, torch.float32, torch.float32)
    big_a = torch.randn(64, 20)
    big_b = torch.rand(64, 20)
    a0, b0 = big_a.clone(), big_b.clone()
    ea, eas = big_a[:, 3:9], big_b[:, 10:16]
    ra, rb = ea.clone(), eas.clone()
    n_ref = ref.projection_project_adam_ref(t["grad"], t["proj"], ra, rb, "right", 0.9, 0.95, 1e-6)
    n_cpp = OPS.projection_project_adam_cpu(t["grad"], t["proj"], ea, eas, "right", 0.9, 0.95, 1e-6)
    assert_close_f32(n_cpp, n_ref, "N")
    assert_close_f32(ea, ra, "exp_avg", rtol=1e-6)
    assert_close_f32(eas, rb, "exp_avg_sq", rtol=1e-6)
    mask_a = torch.ones_like(big_a, dtype=torch.bool)
    mask_a[:, 3:9] = False
    mask_b = torch.ones_like(big_b, dtype=torch.bool)
    mask_b[:, 10:16] = False
    assert torch.equal(big_a[mask_a], a0[mask_a]) and torch.equal(big_b[mask_b], b0[mask_b])


# --------------------------------------------------------------------------- memory
def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(sizes, default=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_full_size_temporary(dtype, side):
    """No allocation of the weight's size (the reference makes several): panels only."""
    m, n, rank = 1024, 512, 8
    t = _inputs(m, n, rank, side, dtype, dtype, torch.float32)
    g, p, ea, eas, w = t["grad"], t["proj"], t["exp_avg"], t["exp_avg_sq"], t["param"]
    full = m * n * 4  # the weight in float32
    fused = _largest_allocation(lambda: OPS.projection_project_update_backproject_cpu(w, g, p, ea, eas, side, *STEP_ARGS))
    apply = _largest_allocation(lambda: OPS.projection_backproject_apply_cpu(w, ea, p, side, -0.1, 0.99))
    project = _largest_allocation(lambda: OPS.projection_project_adam_cpu(g, p, ea, eas, side, 0.9, 0.99, 1e-8))
    # The check can fail: the reference allocates full-size float32 temporaries.
    reference = _largest_allocation(lambda: ref.projection_project_update_backproject_ref(w, g, p, ea, eas, side, *STEP_ARGS))
    assert reference >= full
    assert max(fused, apply, project) <= full // 4, (fused, apply, project)


# --------------------------------------------------------------------------- direct calls
def test_direct_call_checks_and_changes_nothing():
    t = _inputs(12, 8, 3, "right", torch.float32, torch.float32, torch.float32)
    g, p, ea, eas, w = t["grad"], t["proj"], t["exp_avg"], t["exp_avg_sq"], t["param"]
    snap = [x.clone() for x in (ea, eas, w)]
    cases = [
        (lambda: OPS.projection_project_adam_cpu(g, p, ea, eas, "up", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g, torch.randn(3, 9), ea, eas, "right", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g, p, torch.zeros(12, 4), eas, "right", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g.long(), p, ea, eas, "right", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g, p, ea, eas.double(), "right", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_project_adam_cpu(g, torch.randn(9, 8), torch.zeros(12, 9), torch.zeros(12, 9), "right", 0.9, 0.9, 1e-8), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, torch.randn(3, 12), p, "right", 1.0, 1.0), BARE_CHECK),
        (lambda: OPS.projection_backproject_apply_cpu(w, ea, p, "left", 1.0, 1.0), BARE_CHECK),
        (lambda: OPS.projection_project_update_backproject_cpu(w[:6], g, p, ea, eas, "right", *STEP_ARGS), BARE_CHECK),
        (lambda: OPS.projection_project_update_backproject_cpu(w, g, p, ea, eas, "right", 0.01, 0.9, 0.999, 1e-8, 0, 0.0, 1.0), BARE_CHECK),
        (lambda: OPS.projection_project_update_backproject_cpu(w, g.unsqueeze(0), p, ea, eas, "right", *STEP_ARGS), BARE_CHECK),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
    for a, b in zip((ea, eas, w), snap):
        assert torch.equal(a, b)
