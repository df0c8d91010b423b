"""The DCT family on every backend: basis vs scipy, scores and top-k vs independent float64
math and vs the reference, deterministic ties, the low-rank gradient at a refresh,
gathered-basis projection vs dense projection, bad input that changes nothing."""

import numpy as np
import pytest
import scipy.fft
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import dct as dct_ops
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import dct as ref

from .._numerics import assert_change_close, assert_close_f32
from .._numerics import assert_change_close, assert_close_f32
from ..conftest import TOL, require_backend

SHAPES = [(123, 77), (64, 300), (33, 33), (5, 17)]
SIDES = ["right", "left"]


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("dct_scores", name)
    return name


@pytest.fixture(params=reg.BACKENDS)
def dev_backend(request, device):
    """Each backend that can run on the test device (CPU, or CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda)."""
    name = request.param
    require_backend("dct_scores", name, device)
    require_backend("projection_project_update_backproject", name, device)
    return name


def order(side, m, n):
    return n if side == "right" else m


def make_grad(m, n, dtype, transposed=False, device="cpu"):
    if transposed:
        return torch.randn(n, m, dtype=dtype).to(device).T
    return torch.randn(m, n, dtype=dtype).to(device)


# --------------------------------------------------------------------------- basis
@pytest.mark.parametrize("size", [1, 2, 7, 64, 301])
def test_basis_matches_scipy(size):
    c = ops.dct_basis(size, torch.float64)
    expect = scipy.fft.dct(np.eye(size), norm="ortho", axis=0)
    np.testing.assert_allclose(c.numpy(), expect, rtol=0, atol=1e-13)
    np.testing.assert_allclose(c.numpy() @ c.numpy().T, np.eye(size), rtol=0, atol=1e-12)


def test_basis_dtype_and_cache():
    c32 = ops.dct_basis(40)
    assert c32.dtype == torch.float32 and c32.shape == (40, 40) and c32.device.type == "cpu"
    assert ops.dct_basis(40) is c32 and ops.dct_basis(40, torch.float32, "cpu") is c32
    cb = ops.dct_basis(40, torch.bfloat16)
    assert cb.dtype == torch.bfloat16 and cb is not c32
    # Built in float64 then rounded once: equal to the rounded float64 basis.
    assert torch.equal(cb, ops.dct_basis(40, torch.float64).to(torch.bfloat16))
    assert torch.equal(c32, ops.dct_basis(40, torch.float64).float())


def test_basis_bad_input():
    with pytest.raises(ValueError, match="size must be a positive int"):
        ops.dct_basis(0)
    with pytest.raises(ValueError, match="size must be a positive int"):
        ops.dct_basis(3.0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ops.dct_basis(4, torch.int32)


# --------------------------------------------------------------------------- reference vs scipy float64
def numpy_scores(G, side, norm):
    # S = G C^T is the DCT of every row of G; C G the DCT of every column.
    S = scipy.fft.dct(G, norm="ortho", axis=1 if side == "right" else 0)
    A = np.abs(S) if norm == 1 else S * S
    sc = A.sum(axis=0 if side == "right" else 1)
    return S, (sc if norm == 1 else np.sqrt(sc))


def numpy_topk(scores, k):
    idx = np.arange(scores.shape[0])
    return np.lexsort((idx, -scores))[:k]  # descending score, then ascending index


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n", SHAPES[:2])
def test_reference_matches_scipy_float64(side, norm, m, n):
    G = np.random.default_rng(1).standard_normal((m, n))
    S, sc = numpy_scores(G, side, norm)
    g = torch.from_numpy(G)
    with use_backend("reference"):
        out = ops.dct_scores(g, side=side, norm=norm)
        k = order(side, m, n) // 3 + 1
        idx, R = ops.dct_score_topk(g, k, side=side, norm=norm, return_lowrank=True)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), sc, rtol=1e-12)
    np.testing.assert_array_equal(idx.numpy(), numpy_topk(sc, k))
    assert idx.dtype == torch.int32
    expect_R = S[:, idx.numpy()] if side == "right" else S[idx.numpy()]
    np.testing.assert_allclose(R.numpy(), expect_R, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- backends vs reference
def check_selection(idx, k, ref_scores, own_scores):
    """``idx`` is the stable top-k of the backend's own scores and a valid top-k of the reference's."""
    assert idx.dtype == torch.int32 and idx.shape == (k,)
    assert torch.equal(idx, ref.topk_indices(own_scores, k))
    # Against the reference: the chosen scores are the k largest up to rounding near-ties.
    rs = ref_scores.double()
    chosen = rs[idx.long()]
    kth = torch.sort(rs, descending=True).values[k - 1]
    assert (chosen >= kth * (1 - 1e-4) - 1e-6).all()
    assert len(set(idx.tolist())) == k


# float32 / bf16 on every shape; fp16 / float64 on the small ones (the interpreter is slow).
SCORE_CASES = [(m, n, d) for (m, n) in SHAPES for d in (torch.float32, torch.bfloat16)] + [
    (m, n, d) for (m, n) in SHAPES[2:] for d in (torch.float16, torch.float64)
]


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,dtype", SCORE_CASES)
def test_scores_and_topk_backend_vs_reference(dev_backend, device, dtype, norm, side, m, n):
    backend = dev_backend
    g = make_grad(m, n, dtype, transposed=(m == 123), device=device)
    s = order(side, m, n)
    with use_backend("reference"):
        r = ops.dct_scores(g, side=side, norm=norm)
    with use_backend(backend):
        o = ops.dct_scores(g, side=side, norm=norm)
        ks = sorted({1, s // 3 + 1})  # k = s: test_zero_gradient_gives_first_indices
        idxs = [ops.dct_score_topk(g, k, side=side, norm=norm) for k in ks]
    assert o.shape == (s,) and o.dtype == r.dtype
    # Same (rounded) inputs, float32 accumulation: only the summation order differs (elementwise).
    assert_close_f32(o, r, "scores")
    for k, idx in zip(ks, idxs):
        check_selection(idx, k, r, o)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side", SIDES)
def test_batched_scores_equal_per_matrix(dev_backend, device, side, norm):
    """A 3-D gradient (batch x m x n) is scored matrix by matrix, in one call."""
    backend = dev_backend
    for g in (torch.randn(3, 50, 31, device=device), torch.randn(3, 31, 50, device=device).transpose(1, 2),
              torch.randn(2, 9, 14, device=device).to(torch.bfloat16)):
        k = 5
        with use_backend("reference"):
            per = torch.stack([ops.dct_scores(g[b], side=side, norm=norm) for b in range(g.shape[0])])
            per_idx = torch.stack([ops.dct_score_topk(g[b], k, side=side, norm=norm) for b in range(g.shape[0])])
        with use_backend(backend):
            o = ops.dct_scores(g, side=side, norm=norm)
            idx = ops.dct_score_topk(g, k, side=side, norm=norm)
        assert o.shape == per.shape and idx.shape == (g.shape[0], k) and idx.dtype == torch.int32
        for b in range(g.shape[0]):
            assert_close_f32(o[b], per[b], f"batched scores, matrix {b}")
            check_selection(idx[b], k, per[b], o[b])
            if backend == "reference":
                assert torch.equal(idx[b], per_idx[b])
    with use_backend(backend):
        z = ops.dct_score_topk(torch.zeros(2, 6, 4, device=device), 3, side="left")
    assert torch.equal(z.cpu(), torch.arange(3, dtype=torch.int32).expand(2, 3))


@pytest.mark.parametrize("side", SIDES)
def test_scores_basis_argument(backend, side):
    """An explicit float32 basis for a bf16 gradient is used as given (rounded to bf16 on GPU only)."""
    g = torch.randn(40, 24, dtype=torch.bfloat16)
    b = ops.dct_basis(order(side, 40, 24), torch.float32)
    with use_backend("reference"):
        r = ops.dct_scores(g, side=side, basis=b)
    with use_backend(backend):
        o = ops.dct_scores(g, side=side, basis=b)
    exact = backend != "triton" or reg.triton_interpreting()  # compiled Triton rounds the basis to bf16
    assert_close_f32(o, r, "dct_scores with a float32 basis", rtol=1e-5 if exact else TOL[torch.bfloat16])


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side", SIDES)
def test_zero_gradient_gives_first_indices(backend, side, norm):
    for m, n in [(9, 14), (31, 6)]:
        s = order(side, m, n)
        for k in (1, s // 2 + 1, s):
            with use_backend(backend):
                idx = ops.dct_score_topk(torch.zeros(m, n), k, side=side, norm=norm)
            assert torch.equal(idx, torch.arange(k, dtype=torch.int32)), (m, n, k)


def test_exact_ties_go_to_lower_index(backend):
    # Every row of G is the same multiple of basis vectors 5 and 2 with equal weight:
    # S = G C^T has two equal nonzero columns (2 and 5) and zeros elsewhere.
    n = 16
    c = ops.dct_basis(n, torch.float64)
    row = (c[5] + c[2]).float()
    g = row.expand(7, n).contiguous()
    with use_backend(backend):
        sc = ops.dct_scores(g, side="right")
        idx = ops.dct_score_topk(g, 4, side="right")
    if sc[2] == sc[5]:
        assert idx[:2].tolist() == [2, 5]
    else:  # rounding broke the tie: the larger goes first
        assert sorted(idx[:2].tolist()) == [2, 5]
    # The remaining scores are rounding noise around zero; the top two are exact.
    assert sc[2] > 100 * sc[[i for i in range(n) if i not in (2, 5)]].max()


def test_nan_scores_sort_first(backend):
    g = torch.randn(12, 10)
    g[4, 3] = float("nan")  # left side: every row of C G sees the NaN column... all NaN
    g2 = torch.randn(12, 10)
    g2[:, 7] = float("nan")  # right side: rows of G with NaN -> every column NaN
    with use_backend(backend):
        a = ops.dct_score_topk(g, 3, side="left")
    assert torch.equal(a, torch.arange(3, dtype=torch.int32))  # all NaN: ties, lower index first
    with use_backend("reference"):
        b_ref = ops.dct_score_topk(g2, 5, side="right")
    with use_backend(backend):
        b = ops.dct_score_topk(g2, 5, side="right")
    assert torch.equal(b, b_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", SIDES)
def test_return_lowrank(backend, side, dtype):
    m, n = 45, 38
    g = make_grad(m, n, dtype, transposed=True)
    k = 7
    with use_backend(backend):
        idx, R = ops.dct_score_topk(g, k, side=side, norm=2, return_lowrank=True)
        idx2 = ops.dct_score_topk(g, k, side=side, norm=2)
    assert torch.equal(idx, idx2)
    basis = ops.dct_basis(order(side, m, n), dtype)
    S = ref.score_matrix(g, basis, side, torch.float64)
    expect = S[:, idx.long()] if side == "right" else S[idx.long()]
    assert R.dtype == torch.float32 and R.shape == expect.shape
    assert_close_f32(R, expect, "dct_score_topk return_lowrank R")


# --------------------------------------------------------------------------- projection with indices
def make_projector(m, n, rank, side, dtype, index_dtype=torch.int32, device="cpu"):
    s = order(side, m, n)
    idx = torch.randperm(s)[:rank].to(index_dtype)  # unsorted on purpose
    return ops.DCTProjector(ops.dct_basis(s, dtype, device), idx.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_gathered_projection_equals_dense(dev_backend, device, dtype, side, m, n):
    """DCTProjector through the public projection functions == the dense projector C[idx] on the
    reference: float32 moments, N and R elementwise at ~1e-5; weights by their change (float32)
    or within one bf16 rounding of the reference (both round the same float32 value)."""
    backend = dev_backend
    for rank in sorted({1, min(m, n) // 3 + 1, min(m, n)}):
        D = make_projector(m, n, rank, side, dtype, torch.int64 if rank == 1 else torch.int32, device=device)
        P = D.dense(side)
        g = make_grad(m, n, dtype, transposed=(rank == 1), device=device)
        lshape = ops.lowrank_shape(m, n, rank, side)
        ea0, eas0 = 0.1 * torch.randn(lshape, device=device), 0.1 * torch.rand(lshape, device=device)
        w0 = torch.randn(m, n, device=device).to(dtype)

        def run(proj, be):
            ea, eas, w = ea0.clone(), eas0.clone(), w0.clone()
            with use_backend(be):
                N = ops.project_adam_(g, proj, ea, eas, side=side, beta1=0.9, beta2=0.95, eps=1e-6)
                ops.backproject_apply_(w, N, proj, side=side, alpha=-0.3, decay=0.99)
                w1 = w.clone()
                ops.project_update_backproject_(
                    w, g, proj, ea, eas, side=side, lr=0.01, step=3, weight_decay=0.1, scale=0.25
                )
                R = ops.dct_project(g, proj, side=side) if not isinstance(proj, torch.Tensor) else None
            return N, ea, eas, w1, w, R

        dN, dea, deas, dw1, dw, _ = run(P, "reference")
        N, ea, eas, w1, w, R = run(D, backend)
        assert_close_f32(N, dN, f"N, rank {rank}", rtol=4e-5)
        assert_close_f32(ea, dea, f"exp_avg, rank {rank}")
        assert_close_f32(eas, deas, f"exp_avg_sq, rank {rank}")
        if dtype == torch.float32:
            assert_change_close(w1, w0, dw1, f"backproject_apply_ W, rank {rank}", rtol=4e-5)
            assert_change_close(w, w1, dw, f"fused W, rank {rank}", rtol=4e-5)
        else:
            ulp = torch.finfo(dtype).eps
            for ours, refw, what in ((w1, dw1, "backproject_apply_"), (w, dw, "fused")):
                diff = (ours.double() - refw.double()).abs()
                k = 1 if what == "backproject_apply_" else 2  # the fused step starts from W that may differ by 1
                assert bool((diff <= k * ulp * refw.double().abs() + 1e-6).all()), f"{what} W, rank {rank}"
        R_dense = g.double() @ P.double().T if side == "right" else P.double().T @ g.double()
        assert R.dtype == torch.float32
        assert_close_f32(R, R_dense, f"R, rank {rank}")


def test_dct_projection_float64_reference_and_cpp(backend):
    if backend == "triton":
        pytest.skip("the Triton projection kernels take float32/bf16/fp16 (float64 raises, tested below)")
    m, n, rank, side = 30, 20, 6, "left"
    D = make_projector(m, n, rank, side, torch.float64)
    g = torch.randn(m, n, dtype=torch.float64)
    ea, eas = torch.zeros(rank, n, dtype=torch.float64), torch.zeros(rank, n, dtype=torch.float64)
    with use_backend(backend):
        N = ops.project_adam_(g, D, ea, eas, side=side, beta1=0.0, beta2=0.0, eps=0.0)
    R = D.dense(side).T @ g
    torch.testing.assert_close(ea, R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(N, R / R.abs(), rtol=1e-12, atol=1e-12)


def test_triton_projection_rejects_float64():
    if reg.why_unavailable(reg.OPS["projection_project_adam"], "triton", torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable")
    D = make_projector(12, 8, 3, "right", torch.float64)
    ea, eas = torch.zeros(12, 3, dtype=torch.float64), torch.zeros(12, 3, dtype=torch.float64)
    before = ea.clone()
    with use_backend("triton"), pytest.raises(TypeError, match="float64"):
        ops.project_adam_(torch.randn(12, 8, dtype=torch.float64), D, ea, eas, side="right")
    assert torch.equal(ea, before)


# --------------------------------------------------------------------------- bad input
def test_score_bad_input(backend):
    g = torch.randn(12, 8)
    with use_backend(backend):
        with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
            ops.dct_score_topk(g, 3, side="up")
        with pytest.raises(ValueError, match="norm must be 1 or 2"):
            ops.dct_score_topk(g, 3, side="right", norm=3)
        with pytest.raises(ValueError, match="norm must be 1 or 2"):
            ops.dct_scores(g, side="right", norm=2.0)
        with pytest.raises(ValueError, match=r"k \(9\) must be between 1 and the basis order 8"):
            ops.dct_score_topk(g, 9, side="right")
        with pytest.raises(ValueError, match=r"k \(0\)"):
            ops.dct_score_topk(g, 0, side="left")
        with pytest.raises(TypeError, match="k must be an int"):
            ops.dct_score_topk(g, 2.0, side="left")
        with pytest.raises(ValueError, match=r"basis must have shape \(8, 8\)"):
            ops.dct_score_topk(g, 3, side="right", basis=ops.dct_basis(12))
        with pytest.raises(ValueError, match=r"grad must be 2-D \(m, n\) or 3-D"):
            ops.dct_scores(torch.randn(2, 3, 4, 5), side="right")
        with pytest.raises(ValueError, match="return_lowrank=True needs a 2-D grad"):
            ops.dct_score_topk(torch.randn(2, 12, 8), 3, side="right", return_lowrank=True)
        with pytest.raises(ValueError, match="grad must be 2-D"):
            ops.dct_project(torch.randn(2, 12, 8), ops.DCTProjector(ops.dct_basis(8), torch.tensor([1])), side="right")
        with pytest.raises(TypeError, match="grad must have a floating dtype"):
            ops.dct_scores(torch.ones(3, 4, dtype=torch.int64), side="right")
        with pytest.raises(TypeError, match="basis must have a floating dtype"):
            ops.dct_scores(g, side="right", basis=torch.ones(8, 8, dtype=torch.int32))
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ops.dct_scores(g, side="right", basis=ops.dct_basis(8).to("meta"))


def _bad_projection_cases():
    m, n, r = 12, 8, 3
    D = make_projector(m, n, r, "right", torch.float32)
    g = torch.randn(m, n)
    ea, eas = torch.randn(m, r), torch.rand(m, r)
    good = dict(grad=g, proj=D, exp_avg=ea, exp_avg_sq=eas, side="right")
    b = D.basis
    yield "index out of range", dict(good, proj=ops.DCTProjector(b, torch.tensor([0, 8, 1]))), ValueError, r"indices must lie in \[0, 8\)"
    yield "negative index", dict(good, proj=ops.DCTProjector(b, torch.tensor([0, -1, 1]))), ValueError, "indices must lie in"
    yield "float indices", dict(good, proj=ops.DCTProjector(b, torch.tensor([0.0, 1.0, 2.0]))), TypeError, "indices must be int32 or int64"
    yield "2-D indices", dict(good, proj=ops.DCTProjector(b, torch.tensor([[0, 1, 2]]))), ValueError, "indices must be 1-D"
    yield "rank too big", dict(good, proj=ops.DCTProjector(b, torch.arange(9) % 8), exp_avg=torch.zeros(m, 9), exp_avg_sq=torch.zeros(m, 9)), ValueError, r"number of indices \(9\) must be between 1 and 8"
    yield "basis wrong size", dict(good, proj=ops.DCTProjector(ops.dct_basis(12), D.indices)), ValueError, r"basis must have shape \(8, 8\)"
    yield "moment shape", dict(good, exp_avg=torch.zeros(m, 4)), ValueError, "exp_avg must have shape"
    yield "aliasing", dict(good, exp_avg_sq=ea), ValueError, "share memory"
    yield "bad beta", dict(good, beta2=1.5), ValueError, "beta2 must be in"
    yield "bad side", dict(good, side="top"), ValueError, "side must be"


@pytest.mark.parametrize("case", [c[0] for c in _bad_projection_cases()])
def test_projection_bad_input_changes_nothing(backend, case):
    _, kwargs, exc, msg = next(c for c in _bad_projection_cases() if c[0] == case)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with use_backend(backend), pytest.raises(exc, match=msg):
        ops.project_adam_(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"


def test_backproject_and_fused_bad_input_change_nothing(backend):
    D = make_projector(12, 8, 3, "left", torch.float32)  # left: basis of order 12
    w = torch.randn(12, 8)
    w0 = w.clone()
    ea, eas = torch.zeros(3, 8), torch.zeros(3, 8)
    with use_backend(backend):
        with pytest.raises(ValueError, match="update must have shape"):
            ops.backproject_apply_(w, torch.randn(12, 3), D, side="left", alpha=1.0)
        with pytest.raises(ValueError, match=r"basis must have shape \(8, 8\)"):
            ops.backproject_apply_(w, torch.randn(12, 3), D, side="right", alpha=1.0)
        with pytest.raises(ValueError, match="step must be >= 1"):
            ops.project_update_backproject_(w, torch.randn(12, 8), D, ea, eas, side="left", lr=0.1, step=0)
        w_small = torch.randn(6, 8)
        w_small0 = w_small.clone()
        with pytest.raises(ValueError, match="grad must have shape"):
            ops.project_update_backproject_(w_small, torch.randn(12, 8), D, ea, eas, side="left", lr=0.1, step=1)
        assert torch.equal(w_small, w_small0)
    assert torch.equal(w, w0) and not ea.any() and not eas.any()


def test_dct_project_wants_a_dct_projector():
    with pytest.raises(TypeError, match="proj must be a DCTProjector"):
        ops.dct_project(torch.randn(4, 4), torch.eye(4), side="right")


def test_state_of_projector_is_indices_only():
    """A DCTProjector holds the shared basis (one per size) and the int indices: nothing per layer is float."""
    D1 = make_projector(64, 40, 8, "right", torch.float32)
    D2 = make_projector(128, 40, 8, "right", torch.float32)
    assert D1.basis is D2.basis
    assert not D1.indices.is_floating_point() and D1.indices.numel() == 8
    assert dct_ops.basis_size(64, 40, "right") == 40 and dct_ops.basis_size(64, 40, "left") == 64


# --------------------------------------------------------------------------- Triton launch paths
def _triton_or_skip():
    reason = reg.why_unavailable(reg.OPS["dct_scores"], "triton", torch.device("cpu"))
    if reason is not None and not torch.cuda.is_available():
        pytest.skip(reason)


def test_triton_fixed_config_path(monkeypatch):
    """AUTOTUNE off (LOWRANK_KERNELS_TRITON_AUTOTUNE unset or 0) launches the table's config: same results."""
    _triton_or_skip()
    from lowrank_kernels.kernels import _launch

    monkeypatch.setattr(_launch, "AUTOTUNE", False)
    g = make_grad(70, 150, torch.float32, transposed=True)
    with use_backend("reference"):
        r = ops.dct_scores(g, side="left", norm=2)
        rr = ops.dct_project(g, ops.DCTProjector(ops.dct_basis(150), torch.tensor([3, 149, 0])), side="right")
    with use_backend("triton"):
        o = ops.dct_scores(g, side="left", norm=2)
        oo = ops.dct_project(g, ops.DCTProjector(ops.dct_basis(150), torch.tensor([3, 149, 0])), side="right")
    assert_close_f32(o, r, "dct_scores")
    assert_close_f32(oo, rr, "dct_project")


# --------------------------------------------------------------------------- CUDA (compiled kernels)
needs_compiled = pytest.mark.skipif(
    reg.triton_interpreting(), reason="compiled-kernel tests: run them with `TRITON_INTERPRET=0 pytest -m gpu`"
)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize(
    "dtype,side,norm,m,n", [(BF16, "right", 1, 300, 257), (BF16, "left", 2, 123, 77), (FP16, "left", 1, 257, 300),
                            (FP32, "right", 2, 123, 77)]
)
def test_gpu_scores_vs_reference(dtype, side, norm, m, n, monkeypatch):
    from lowrank_kernels.kernels import _launch

    monkeypatch.setattr(_launch, "AUTOTUNE", False)  # one compile per case
    g = torch.randn(n, m, device="cuda").to(dtype).T  # transposed view
    s = order(side, m, n)
    k = s // 3 + 1
    with use_backend("reference"):
        r = ops.dct_scores(g, side=side, norm=norm)
    with use_backend("triton"):
        o = ops.dct_scores(g, side=side, norm=norm)
        idx = ops.dct_score_topk(g, k, side=side, norm=norm)
    # Same rounded inputs (16-bit products are exact in fp32): only the summation order differs.
    assert_close_f32(o, r, "dct_scores")
    check_selection(idx.cpu(), k, r.cpu(), o.cpu())


@pytest.mark.gpu
@needs_compiled
def test_gpu_bf16_selection_vs_float64_autotuned():
    """At a realistic size, bf16 tensor-core scoring picks (almost) the float64 top-k."""
    g = torch.randn(1024, 2816, device="cuda", dtype=BF16)
    k = 256
    with use_backend("triton"):
        idx = ops.dct_score_topk(g, k, side="left")
    with use_backend("reference"):
        exact = ops.dct_score_topk(g.double(), k, side="left")  # float64 basis and math
    overlap = len(set(idx.tolist()) & set(exact.tolist())) / k
    assert overlap >= 0.97, overlap


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("side", SIDES)
def test_gpu_gathered_fused_step_vs_dense(side, monkeypatch):
    from lowrank_kernels.kernels import _launch

    monkeypatch.setattr(_launch, "AUTOTUNE", False)
    m, n, rank = 190, 130, 33
    s = order(side, m, n)
    D = ops.DCTProjector(ops.dct_basis(s, BF16, "cuda"), torch.randperm(s, device="cuda")[:rank].int())
    g = torch.randn(m, n, device="cuda", dtype=BF16)
    w0 = torch.randn(m, n, device="cuda", dtype=BF16)
    lshape = ops.lowrank_shape(m, n, rank, side)
    ea0, eas0 = 0.1 * torch.randn(lshape, device="cuda"), 0.1 * torch.rand(lshape, device="cuda")
    outs = []
    for proj, be in ((D.dense(side), "reference"), (D, "triton")):
        w, ea, eas = w0.clone(), ea0.clone(), eas0.clone()
        with use_backend(be):
            ops.project_update_backproject_(w, g, proj, ea, eas, side=side, lr=0.01, step=2, weight_decay=0.1)
        outs.append((w, ea))
    (rw, rea), (ow, oea) = outs
    assert_close_f32(oea, rea, "exp_avg")
    assert_change_close(ow, w0, rw, f"gathered fused step {side}")
