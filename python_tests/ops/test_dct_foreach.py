"""``dct_foreach_score_topk``: the list form of DCT scoring + top-k (one call per bucket of
same-shape gradients, DCTAdamW's batched refresh).

Every row must be bitwise what ``dct_score_topk`` returns for that gradient alone, on every
backend (the optimizer's batched refresh relies on it), and a valid top-k of the reference's
scores; the Triton launcher's address table, stride groups and unaligned views are all
exercised; bad input raises before anything runs."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import dct as ref

from ..conftest import require_backend

OP = "dct_foreach_score_topk"


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    require_backend(OP, request.param)
    return request.param


@pytest.fixture(params=reg.BACKENDS)
def dev_backend(request, device):
    require_backend(OP, request.param, device)
    return request.param


def _grads(m, n, dtype, device, count=4):
    """Same-shape gradients of several layouts: contiguous, a transposed view (other strides)
    and a view at an odd element offset (an address the Triton table path must not take)."""
    gs = [torch.randn(m, n, dtype=torch.float32).to(dtype).to(device) for _ in range(count)]
    gs.insert(1, torch.randn(n, m).to(dtype).to(device).T)
    flat = torch.randn(m * n + 1).to(dtype).to(device)
    gs.append(flat[1:].view(m, n))
    return gs


def _check_topk(idx, scores_ref, k):
    """``idx`` holds k distinct indices whose reference scores are the k largest up to rounding."""
    assert len(set(idx.tolist())) == k
    rs = scores_ref.double()
    kth = torch.sort(rs, descending=True).values[k - 1]
    assert (rs[idx.long()] >= kth * (1 - 1e-4) - 1e-6).all()


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,dtype", [(70, 45, torch.float32), (45, 70, torch.bfloat16), (33, 17, torch.float16),
                                       (9, 14, torch.float64)])
def test_rows_equal_single_gradient_calls(dev_backend, device, m, n, dtype, side, norm):
    gs = _grads(m, n, dtype, device)
    s = n if side == "right" else m
    k = s // 3 + 1
    with use_backend(dev_backend):
        out = ops.foreach_dct_score_topk(gs, k, side=side, norm=norm)
        single = [ops.dct_score_topk(g, k, side=side, norm=norm) for g in gs]
    assert out.shape == (len(gs), k) and out.dtype == torch.int32 and out.device == gs[0].device
    for i, g in enumerate(gs):
        assert torch.equal(out[i], single[i]), f"row {i} differs from dct_score_topk of that gradient alone"
        with use_backend("reference"):
            r = ops.dct_scores(g, side=side, norm=norm)
        _check_topk(out[i].cpu(), r.cpu(), k)
    if dev_backend == "reference":  # the specification: the single-gradient reference, row by row
        for i, g in enumerate(gs):
            assert torch.equal(out[i], ref.dct_score_topk_ref(g, ops.dct_basis(s, dtype, device), k, side, norm))


def test_rows_are_not_mixed_up(backend):
    """Each gradient is a multiple of one basis vector: row i must find exactly that vector."""
    n = 24
    c = ops.dct_basis(n, torch.float64)
    picks = [5, 0, 17, 11, 23]
    gs = [(torch.randn(31, 1, dtype=torch.float64) * c[j]).float() for j in picks]
    with use_backend(backend):
        out = ops.foreach_dct_score_topk(gs, 1, side="right", norm=1)
    assert out[:, 0].tolist() == picks


def test_explicit_basis_and_empty_list(backend):
    gs = [torch.randn(20, 13) for _ in range(3)]
    b = ops.dct_basis(13, torch.float32)
    with use_backend(backend):
        out = ops.foreach_dct_score_topk(gs, 4, side="right", basis=b)
        default = ops.foreach_dct_score_topk(gs, 4, side="right")
        empty = ops.foreach_dct_score_topk([], 4, side="right", basis=b)
    assert torch.equal(out, default)
    assert empty.shape == (0, 4) and empty.dtype == torch.int32


def test_zero_gradients_give_first_indices(backend):
    with use_backend(backend):
        out = ops.foreach_dct_score_topk([torch.zeros(6, 9), torch.zeros(6, 9)], 3, side="left", norm=2)
    assert torch.equal(out, torch.arange(3, dtype=torch.int32).expand(2, 3))


def test_triton_one_scoring_launch_for_a_list():
    """The Triton backend scores a list of same-layout gradients in one GEMM launch (plus one
    reduction), however long the list: captured, not run."""
    require_backend(OP, "triton")
    from lowrank_kernels.kernels import _launch
    from lowrank_kernels.kernels import dct as kd

    meta = torch.device("meta")
    for count in (1, 5):
        gs = [torch.empty(300, 200, dtype=torch.bfloat16, device=meta) for _ in range(count)]
        with _launch.capture() as launches:
            kd.dct_foreach_scores_triton(gs, torch.empty(200, 200, dtype=torch.bfloat16, device=meta), "right", 1)
        names = [ln.kernel.fn.__name__ for ln in launches]
        assert names == ["_dct_gemm_kernel", "_dct_partial_sum_kernel"], names
        assert launches[0].meta["TABLE"] == 1


def test_bad_input(backend):
    g = torch.randn(12, 8)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"grads\[1\] must have shape \(12, 8\)"):
            ops.foreach_dct_score_topk([g, torch.randn(12, 9)], 3, side="right")
        with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.bfloat16 but grads\[0\] torch.float32"):
            ops.foreach_dct_score_topk([g, g.to(torch.bfloat16)], 3, side="right")
        with pytest.raises(ValueError, match=r"grads\[0\] must be 2-D"):
            ops.foreach_dct_score_topk([torch.randn(2, 12, 8)], 3, side="right")
        with pytest.raises(TypeError, match=r"grads\[1\] must have a floating dtype"):
            ops.foreach_dct_score_topk([g, torch.ones(12, 8, dtype=torch.int32)], 3, side="right")
        with pytest.raises(ValueError, match=r"k \(9\) must be between 1 and the basis order 8"):
            ops.foreach_dct_score_topk([g], 9, side="right")
        with pytest.raises(ValueError, match=r"basis must have shape \(12, 12\)"):
            ops.foreach_dct_score_topk([g], 3, side="left", basis=ops.dct_basis(8))
        with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
            ops.foreach_dct_score_topk([g], 3, side="up")
        with pytest.raises(ValueError, match="norm must be 1 or 2"):
            ops.foreach_dct_score_topk([g], 3, side="right", norm=0)
        with pytest.raises(TypeError, match="k must be an int"):
            ops.foreach_dct_score_topk([g], 3.0, side="right")
        with pytest.raises(TypeError, match="grads must be a list"):
            ops.foreach_dct_score_topk(g, 3, side="right")
        with pytest.raises(ValueError, match="an empty grads list needs an explicit basis"):
            ops.foreach_dct_score_topk([], 3, side="right")
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ops.foreach_dct_score_topk([g], 3, side="right", basis=ops.dct_basis(8).to("meta"))
