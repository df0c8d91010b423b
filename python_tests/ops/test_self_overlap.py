"""In-place outputs that overlap themselves are rejected, for every in-place op and projector.

A stride-0 output (``torch.zeros(4, 1).expand(4, 8)``) or any other layout where two
elements share memory would get racing writes on a GPU and order-dependent results on a
CPU. Each in-place op (project_adam_, backproject_apply_, project_update_backproject_
with dense, DCT and INT4 projectors, int8_update_sr_) must raise a ValueError naming the
argument before any backend runs, leaving every argument unchanged; non-contiguous
outputs whose elements are distinct (a transposed view) stay accepted.
"""
import itertools

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops._checks import check_no_self_overlap

M, N, R = 24, 40, 4


def _stride0(shape, device, dtype=torch.float32):
    """A stride-0 tensor of ``shape``: one column expanded across the last dim."""
    return torch.rand(shape[0], 1, device=device).to(dtype).expand(*shape)


def _interleaved(shape, device, dtype=torch.float32):
    """Rows that overlap by one element (stride (n - 1, 1)): no stride 0, yet overlapping."""
    m, n = shape
    base = torch.rand(m * n, device=device).to(dtype)
    return base.as_strided((m, n), (n - 1, 1))


BAD = {"stride0": _stride0, "interleaved": _interleaved}


def _projector(kind, side, device):
    if kind == "dense":
        q = torch.linalg.qr(torch.randn(N if side == "right" else M, R, device=device))[0]
        return q.T.contiguous() if side == "right" else q.contiguous()
    if kind == "dct":
        size = N if side == "right" else M
        return ops.DCTProjector(ops.dct_basis(size, torch.float32, device),
                                torch.randperm(size, device=device)[:R].to(torch.int32))
    q = torch.linalg.qr(torch.randn(N if side == "right" else M, R, device=device))[0]
    dense = q.T.contiguous() if side == "right" else q.contiguous()
    return ops.Int4Projector.quantize(dense, 16)


def _lowrank(side):
    return ops.lowrank_shape(M, N, R, side)


def _snapshot(*ts):
    return [t.clone() for t in ts]


def _unchanged(before, after):
    for b, a in zip(before, after):
        assert torch.equal(b, a) or (b.isnan().all() and a.isnan().all())


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("which", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_project_adam_rejects_self_overlapping_moment(side, kind, which, bad, device):
    proj = _projector(kind, side, device)
    grad = torch.randn(M, N, device=device)
    moments = {"exp_avg": torch.randn(_lowrank(side), device=device),
               "exp_avg_sq": torch.rand(_lowrank(side), device=device)}
    moments[which] = BAD[bad](_lowrank(side), device)
    before = _snapshot(grad, *moments.values())
    with pytest.raises(ValueError, match=rf"{which} overlaps itself"):
        ops.project_adam_(grad, proj, moments["exp_avg"], moments["exp_avg_sq"], side=side)
    _unchanged(before, [grad, *moments.values()])


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_backproject_apply_rejects_self_overlapping_param(side, kind, bad, device):
    proj = _projector(kind, side, device)
    param = BAD[bad]((M, N), device)
    update = torch.randn(_lowrank(side), device=device)
    before = _snapshot(param, update)
    with pytest.raises(ValueError, match=r"param overlaps itself"):
        ops.backproject_apply_(param, update, proj, side=side, alpha=-0.1, decay=0.9)
    _unchanged(before, [param, update])


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("which", ["param", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_project_update_backproject_rejects_self_overlap(side, kind, which, bad, device):
    proj = _projector(kind, side, device)
    args = {"param": torch.randn(M, N, device=device),
            "exp_avg": torch.randn(_lowrank(side), device=device),
            "exp_avg_sq": torch.rand(_lowrank(side), device=device)}
    shape = (M, N) if which == "param" else _lowrank(side)
    args[which] = BAD[bad](shape, device)
    grad = torch.randn(M, N, device=device)
    before = _snapshot(grad, *args.values())
    with pytest.raises(ValueError, match=rf"{which} overlaps itself"):
        ops.project_update_backproject_(
            args["param"], grad, proj, args["exp_avg"], args["exp_avg_sq"], side=side, lr=1e-2, beta1=0.9,
            beta2=0.999, eps=1e-8, step=1, weight_decay=0.1, scale=0.25,
        )
    _unchanged(before, [grad, *args.values()])


@pytest.mark.parametrize("which", ["q", "scale", "minimum"])
def test_int8_update_sr_rejects_self_overlap(which, device):
    gs = 32
    w = torch.randn(8, 64, device=device)
    q, scale, minimum = ops.int8_quantize(w, gs)
    args = {"q": q, "scale": scale, "minimum": minimum}
    t = args[which]
    if t.dim() == 2:
        args[which] = t[:, :1].expand(*t.shape)
    else:
        args[which] = t[:1].expand(t.shape[0])
    update = torch.randn(8, 64, device=device)
    before = _snapshot(*args.values(), update)
    # int8_update_sr_ takes contiguous storage only, which already excludes self-overlap.
    with pytest.raises(ValueError, match=rf"{which} (must be contiguous|overlaps itself)"):
        ops.int8_update_sr_(args["q"], args["scale"], args["minimum"], update, decay=1.0, alpha=0.1, seed=3,
                            group_size=gs)
    _unchanged(before, [*args.values(), update])


@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
def test_non_contiguous_distinct_outputs_still_accepted(kind, device):
    """A transposed param and moments (distinct elements) are valid outputs; the result equals
    the same op on contiguous copies."""
    side = "right"
    proj = _projector(kind, side, device)
    grad = torch.randn(M, N, device=device)
    p_t = torch.randn(N, M, device=device).T
    ea_t = torch.randn(R, M, device=device).T
    eas_t = torch.rand(R, M, device=device).T
    p_c, ea_c, eas_c = p_t.contiguous(), ea_t.contiguous(), eas_t.contiguous()
    kw = dict(side=side, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=2, weight_decay=0.1, scale=0.25)
    ops.project_update_backproject_(p_t, grad, proj, ea_t, eas_t, **kw)
    ops.project_update_backproject_(p_c, grad, proj, ea_c, eas_c, **kw)
    for a, b in ((p_t, p_c), (ea_t, ea_c), (eas_t, eas_c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, overlaps",
    [
        (lambda: torch.zeros(4, 1).expand(4, 8), True),
        (lambda: torch.zeros(3, 4)[:, :1].expand(3, 2), True),
        (lambda: torch.zeros(10).as_strided((3, 3), (2, 1)), True),
        (lambda: torch.zeros(20).as_strided((3, 2), (1, 2)), True),
        (lambda: torch.zeros(10).as_strided((3, 2), (2, 3)), False),  # interleaved, distinct: 0 3 2 5 4 7
        (lambda: torch.zeros(5, 6).T, False),
        (lambda: torch.zeros(5, 6)[:, ::2], False),
        (lambda: torch.zeros(1, 5).expand(1, 5), False),
        (lambda: torch.zeros(2, 1, 3).expand(2, 1, 3).transpose(0, 2), False),
    ],
)
def test_check_no_self_overlap_is_exact(make, overlaps):
    t = make()
    offsets = {sum(i * s for i, s in zip(idx, t.stride())) for idx in itertools.product(*map(range, t.shape))}
    assert (len(offsets) != t.numel()) == overlaps  # the truth, by enumeration
    if overlaps:
        with pytest.raises(ValueError, match="x overlaps itself"):
            check_no_self_overlap(t, "x", "op")
    else:
        check_no_self_overlap(t, "x", "op")


def test_meta_views_never_overlap():
    """Meta tensors have no memory: two slices of one meta buffer (whose data_ptr() is their
    byte offset) must pass, as the memory planner steps Q-GaLore's row panels on meta."""
    from lowrank_kernels.ops import _checks as C

    buf = torch.empty(100, device="meta")
    C.check_no_overlap("op", [("scale", buf[10:20])], [("minimum", buf[15:30])])
    real = torch.empty(100)
    with pytest.raises(ValueError, match="share memory"):
        C.check_no_overlap("op", [("scale", real[10:20])], [("minimum", real[15:30])])


@pytest.mark.parametrize("seed", range(40))
def test_sweep_agrees_with_pairwise_scan(seed):
    """check_no_overlap's sort-and-sweep (long lists) decides exactly as the pairwise scan."""
    from lowrank_kernels.ops import _checks as C

    gen = torch.Generator().manual_seed(seed)
    buf = torch.empty(400)

    def pick(k, prefix):
        out = []
        for i in range(k):
            lo = int(torch.randint(0, 390, (1,), generator=gen))
            ln = int(torch.randint(1, 8, (1,), generator=gen))
            out.append((f"{prefix}{i}", buf[lo:lo + ln]))
        return out
    written, read = pick(6, "w"), pick(14, "r")
    ws, rs = C._spans_of(written, None), C._spans_of(read, None)
    everyone = ws + rs
    pairwise = any(
        sw[1] < sr[2] and sr[1] < sw[2] for wn, sw in ws for rn, sr in everyone if rn != wn
    )
    assert C._any_overlap(ws, rs) == pairwise
    if pairwise:
        with pytest.raises(ValueError, match="share memory"):
            C.check_no_overlap("op", written, read)
    else:
        C.check_no_overlap("op", written, read)
