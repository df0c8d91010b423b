"""The router's validation cache (``define_op(cache_key=..., recheck=...)``) on the
multi-tensor projection op: a call whose tensors (pointers, shapes, strides, dtypes,
devices) and structural scalars were validated before skips the structural checks, yet
every bad input is still refused with the same error before anything is written: bad
scalars, DCT indices changed in place, aliasing tensors, other shapes."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowrank_kernels import ops
from lowrank_kernels.ops import _checks as C
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import projection as P
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend
from .test_projection_kinds import make_projector

SHAPES = [(37, 23, 5), (19, 41, 3), (16, 16, 16)]
OP = "foreach_project_update_backproject_"


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    require_backend("projection_foreach_project_update_backproject", request.param)
    return request.param


def _bucket(kind, side="right", seed=0):
    torch.manual_seed(seed)
    params, grads, projs, eas, easqs = [], [], [], [], []
    for m, n, r in SHAPES:
        proj, _ = make_projector(kind, m, n, r, side)
        ls = ops.lowrank_shape(m, n, r, side)
        params.append(torch.randn(m, n))
        grads.append(torch.randn(m, n))
        projs.append(proj)
        eas.append(0.1 * torch.randn(ls))
        easqs.append(0.1 * torch.rand(ls))
    return params, grads, projs, eas, easqs


def _call(bucket, side="right", **kw):
    params, grads, projs, eas, easqs = bucket
    hyper = dict(lr=[0.01, 0.02, 0.03], beta1=0.9, beta2=0.99, eps=1e-8, step=[2, 3, 4], weight_decay=0.1, scale=0.5)
    hyper.update(kw)
    ops.foreach_project_update_backproject_(params, grads, projs, eas, easqs, side=side, **hyper)


def _snapshot(bucket):
    params, _, _, eas, easqs = bucket
    return [t.clone() for t in params + eas + easqs]


def _unchanged(bucket, snap):
    params, _, _, eas, easqs = bucket
    return all(torch.equal(a, b) for a, b in zip(params + eas + easqs, snap))


class _CountStructural:
    """Counts calls of the structural overlap check (run by the full validator only)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = C.check_no_overlap

        def counted(*a, **k):
            self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(C, "check_no_overlap", counted)


@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
def test_second_call_skips_structural_checks(backend, kind, monkeypatch):
    bucket = _bucket(kind)
    count = _CountStructural(monkeypatch)
    with use_backend(backend):
        _call(bucket)
        first = count.n
        _call(bucket, lr=[0.5, 0.5, 0.5], step=[7, 8, 9])  # other scalars: same key
        assert first > 0 and count.n == first
        moved = [p.clone() for p in bucket[0]]
        # New gradient tensors (as after zero_grad(set_to_none=True) and backward): the same key
        # (their memory is checked against the outputs' on every call instead).
        bucket[1][:] = [torch.randn_like(g) for g in bucket[1]]
        _call(bucket)
        assert count.n == first
        bucket[3][0] = bucket[3][0].clone()  # a new moment tensor: a new key, validated in full
        _call(bucket)
        assert count.n > first
    assert not all(torch.equal(a, b) for a, b in zip(moved, bucket[0]))


def test_gradient_in_an_outputs_memory_is_refused_after_a_cached_call(backend, monkeypatch):
    """Gradients' pointers are not in the key: a new gradient with the usual layout (so the
    same key) that reads the memory of a weight or a moment is refused all the same; with
    another layout (a stride-0 view) it is a new key, validated in full."""
    bucket = _bucket("dense")
    params, grads, projs, eas, easqs = bucket
    m, n, _ = SHAPES[0]
    big = torch.zeros(4 * m * n)
    params[1] = big[: params[1].numel()].view_as(params[1]).copy_(params[1])  # a weight inside a buffer
    moments = torch.zeros(2 * m * n)
    easqs[2] = moments[: easqs[2].numel()].view_as(easqs[2]).copy_(easqs[2])
    count = _CountStructural(monkeypatch)
    with use_backend(backend):
        _call(bucket)
        first = count.n
        for alias in (big[params[1].numel() - 5:][: m * n].view(m, n),  # overlaps the weight's last 5 values
                      moments[: m * n].view(m, n),  # overlaps a moment
                      easqs[1].reshape(-1)[3:4].expand(m, n)):  # another layout
            grads[0] = alias
            snap = _snapshot(bucket)
            with pytest.raises(ValueError, match="share memory"):
                _call(bucket)
            assert _unchanged(bucket, snap)
        grads[0] = big[params[1].numel():][: m * n].view(m, n)  # right after the weight: no overlap
        before = count.n
        _call(bucket)
        assert count.n == before  # the cached key: no full validation
    assert count.n > first  # the refused calls ran the full validator (for its exact error)


def test_span_index():
    buf = torch.zeros(100)
    idx = C.SpanIndex([buf[10:20], buf[15:30], buf[50:60], torch.zeros(0)])
    assert idx.overlaps(buf[29:31]) and idx.overlaps(buf[0:11]) and idx.overlaps(buf[55:56])
    assert idx.overlaps(buf[5:70]) and idx.overlaps(buf[::7])  # strided: its span counts
    assert not idx.overlaps(buf[30:50]) and not idx.overlaps(buf[60:]) and not idx.overlaps(buf[:10])
    assert not idx.overlaps(torch.zeros(5)) and not idx.overlaps(torch.zeros(0))
    assert not C.SpanIndex([]).overlaps(buf)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\), got 1.0"),
        (dict(beta2=-0.1), ValueError, r"beta2 must be in \[0, 1\)"),
        (dict(eps=-1e-8), ValueError, r"eps must be >= 0"),
        (dict(step=[2, 0, 4]), ValueError, r"\(parameter 1\): step must be >= 1"),
        (dict(lr=[0.01, 0.02, -0.03]), ValueError, r"\(parameter 2\): lr must be >= 0"),
        (dict(lr=[0.01, float("nan"), 0.03]), ValueError, r"\(parameter 1\): lr must be >= 0"),
    ],
)
def test_bad_scalars_after_a_cached_call(backend, kw, exc, match):
    bucket = _bucket("dense")
    with use_backend(backend):
        _call(bucket)
        snap = _snapshot(bucket)
        with pytest.raises(exc, match=match) as cached:
            _call(bucket, **kw)
        assert _unchanged(bucket, snap)
    # The same message as a validation without any cache.
    with pytest.raises(exc) as direct:
        params, grads, projs, eas, easqs = bucket
        hyper = dict(lr=[0.01, 0.02, 0.03], beta1=0.9, beta2=0.99, eps=1e-8, step=[2, 3, 4])
        hyper.update(kw)
        P.validate_foreach_project_update_backproject(
            params, grads, projs, eas, easqs, "right", hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
            hyper["step"], [0.1] * 3, [0.5] * 3,
        )
    assert str(cached.value) == str(direct.value)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("bad", [-1, "size"])
def test_dct_indices_changed_in_place_are_rechecked(backend, side, bad):
    bucket = _bucket("dct", side)
    with use_backend(backend):
        _call(bucket, side=side)
        snap = _snapshot(bucket)
        idx = bucket[2][1].indices
        size = SHAPES[1][1] if side == "right" else SHAPES[1][0]
        idx[0] = -1 if bad == -1 else size
        with pytest.raises(ValueError, match=r"\(parameter 1\): indices must lie in \[0, "):
            _call(bucket, side=side)
        assert _unchanged(bucket, snap)


def test_dct_indices_between_orders_pass():
    """An index valid for its own parameter but beyond a smaller parameter's basis order
    passes (the one-pass range check defers to the exact per-parameter check)."""
    bucket = _bucket("dct", "right")
    _call(bucket)
    big = max(range(len(SHAPES)), key=lambda i: SHAPES[i][1])
    n_small = min(n for _, n, _ in SHAPES)
    idx = bucket[2][big].indices
    if n_small not in idx.tolist():
        idx[0] = n_small
    _call(bucket)


def test_aliasing_tensors_are_refused_after_a_cached_call(backend):
    bucket = _bucket("dense")
    with use_backend(backend):
        _call(bucket)
        params, grads, projs, eas, easqs = bucket
        grads[2] = params[2]  # the gradient is the weight itself: a new key, checked in full
        snap = _snapshot(bucket)
        with pytest.raises(ValueError, match="share memory"):
            _call(bucket)
        assert _unchanged(bucket, snap)
        grads[2] = torch.randn(SHAPES[2][:2])
        easqs[0] = eas[0]  # two moments in one tensor
        snap = _snapshot(bucket)
        with pytest.raises(ValueError, match="share memory"):
            _call(bucket)
        assert _unchanged(bucket, snap)


def test_reshaped_tensor_at_the_same_address_is_checked_again(backend):
    """Same pointers, other shape (a view of the same storage): a different key."""
    bucket = _bucket("dense")
    with use_backend(backend):
        _call(bucket)
        eas = bucket[3]
        eas[0] = eas[0].reshape(-1)[: eas[0].numel() - 1].reshape(1, -1)
        with pytest.raises(ValueError, match=r"exp_avg must have shape"):
            _call(bucket)


def test_layout_signature():
    a = torch.zeros(3, 4)
    assert C.layout_signature([a]) == C.layout_signature([torch.ones(3, 4)])  # pointers left out
    assert C.layout_signature([a]) != C.layout_signature([a.T.contiguous().T])
    assert C.layout_signature([a]) != C.layout_signature([a.double()])
    assert C.layout_signature([a.to_sparse()]) is None


def test_tensor_signature():
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    assert C.tensor_signature([a, b]) == C.tensor_signature([a, b])
    assert C.tensor_signature([a]) != C.tensor_signature([b])  # other memory
    assert C.tensor_signature([a]) != C.tensor_signature([a.T])  # same memory, other layout
    assert C.tensor_signature([a]) != C.tensor_signature([a.view(4, 3)])
    assert C.tensor_signature([a]) != C.tensor_signature([a.view(torch.int32)])
    assert C.tensor_signature([a], [torch.nn.Parameter(b)]) is not None
    assert C.tensor_signature([a.to_sparse()]) is None
    with FakeTensorMode():
        fake = torch.zeros(3, 4)
    assert C.tensor_signature([a, fake]) is None


def test_cache_key_needs_validate():
    with pytest.raises(TypeError, match="cache_key needs validate"):
        reg.define_op("never_defined_op", "(Tensor x) -> ()", family="x", reference=lambda x: None,
                      fake=reg.fake_no_output, cache_key=lambda x: None)
    assert "never_defined_op" not in reg.OPS  # the refused definition left nothing behind


def test_tensor_signature_keeps_lists_apart():
    a, b, c = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    assert C.tensor_signature([a, b], [c]) != C.tensor_signature([a], [b, c])


def test_moment_seed_sign_is_part_of_the_key(backend):
    """A seed >= 0 (stochastic rounding) needs bfloat16 moments: after a cached call with
    float32 moments and no seeds, seeds >= 0 are refused, not skipped."""
    bucket = _bucket("dense")
    with use_backend(backend):
        _call(bucket)
        snap = _snapshot(bucket)
        with pytest.raises(ValueError, match="moment_seed >= 0 .* needs bfloat16 moments"):
            _call(bucket, moment_seed=[1, 2, 3])
        assert _unchanged(bucket, snap)
