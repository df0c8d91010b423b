"""The host-side helpers of a step (csrc/python/host.cpp, exported by ``lowrank_kernels._C``)
against their Python versions: the validation cache's signatures and overlap queries
(ops/_checks.py), the eager caller's plain-tensor test (ops/_registry.py) and the non-finite
gradient probe (optim/base.py). Each must answer exactly as the Python version does."""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowrank_kernels import ops
from lowrank_kernels.ops import _checks as C
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.optim import GaLoreAdamW
from lowrank_kernels.optim import base

from ._opcount import CountOps

EXPECT_EXT = os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") == "1"


def _native():
    native = C._native_helpers()
    if native is None:
        assert not EXPECT_EXT, "the extension is built but exports no host helpers"
        pytest.skip("the C++ extension is not built")
    return native


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    """Run a test with the C++ helpers, then with the Python versions."""
    if request.param == "native":
        _native()
    else:
        monkeypatch.setattr(C, "_native", None)
    return request.param


class _Sub(torch.Tensor):
    pass


def test_signatures_equal_exactly_when_the_fields_are(impl):
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    sig, lay = C.tensor_signature, C.layout_signature
    assert sig([a, b]) == sig([a, b]) and hash(sig([a, b])) == hash(sig([a, b]))
    assert sig([a]) != sig([b])  # other memory
    assert sig([a]) != sig([a.T]) and sig([a]) != sig([a.view(4, 3)]) and sig([a]) != sig([a.view(torch.int32)])
    assert sig([a]) != sig([a[1:]]) and sig([a]) != sig([a.unsqueeze(0)])
    assert sig([a, b], [a]) != sig([a], [b, a])  # lists kept apart
    assert sig([], [a]) != sig([a], [])
    assert sig([a], [torch.nn.Parameter(b)]) is not None
    assert lay([a]) == lay([torch.ones(3, 4)]) and lay([a]) != lay([a.T.contiguous().T])
    assert lay([a]) != lay([a.double()]) and lay([a]) != lay([torch.zeros(3, 4, device="meta")])
    for bad in (a.to_sparse(), torch.zeros(2).as_subclass(_Sub)):
        assert sig([a, bad]) is None and lay([bad]) is None
    with FakeTensorMode():
        fake = torch.zeros(3, 4)
    assert sig([a, fake]) is None and lay([fake]) is None


def test_native_and_python_signatures_agree_on_equality():
    native = _native()
    gen = torch.Generator().manual_seed(0)
    base_t = torch.zeros(64)
    views = [base_t[:12].view(3, 4), base_t[:12].view(4, 3), base_t[4:16].view(3, 4), base_t[:12].view(3, 4).T,
             torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), base_t[::2][:6]]
    lists = []
    for _ in range(40):
        k = int(torch.randint(0, 3, (1,), generator=gen))
        lists.append(tuple([views[int(i)] for i in torch.randint(0, len(views), (k,), generator=gen)]
                           for _ in range(2)))
    for with_ptr in (True, False):
        py = [C._py_signature(ls, with_ptr) for ls in lists]
        cc = [native.tensor_signature(ls, with_ptr) for ls in lists]
        for i in range(len(lists)):
            for j in range(len(lists)):
                assert (py[i] == py[j]) == (cc[i] == cc[j]), (i, j, with_ptr)


def test_any_overlap_matches_the_python_span_test():
    _native()
    gen = torch.Generator().manual_seed(1)
    buf = torch.zeros(400)
    for trial in range(60):
        written = []
        for _ in range(int(torch.randint(0, 6, (1,), generator=gen))):
            lo = int(torch.randint(0, 380, (1,), generator=gen))
            n = int(torch.randint(0, 20, (1,), generator=gen))
            written.append(buf[lo:lo + n])
        written.append(buf[300:340].view(5, 8)[:, :3])  # a strided view: its whole span counts
        idx = C.SpanIndex(written)
        for _ in range(10):
            lo = int(torch.randint(0, 390, (1,), generator=gen))
            step = int(torch.randint(1, 4, (1,), generator=gen))
            t = buf[lo:lo + 10:step]
            others = [torch.zeros(3), None, buf[0:0], t]
            want = any(idx.overlaps(x) for x in others if x is not None)
            assert idx.any_overlap(others) is want, (trial, lo, step)
    # other devices / subclasses: answered by the Python test
    idx = C.SpanIndex([buf])
    assert idx.any_overlap([torch.zeros(2, device="meta"), buf[3:4].as_subclass(_Sub)])
    assert not C.SpanIndex([]).any_overlap([buf]) and not idx.any_overlap([]) and not idx.any_overlap([None])


def test_all_plain():
    native = _native()
    a, p = torch.zeros(2), torch.nn.Parameter(torch.zeros(2))
    sub = torch.zeros(2).as_subclass(_Sub)
    for args, want in [((a, [p, a], 1.0, "x", None, [1, 2]), True), ((a, [a, sub]), False), ((sub,), False),
                       (((a, sub),), False), (((a, p), [], ()), True)]:
        assert native.all_plain(args) is want
        assert reg._plain_args(args) is want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nonfinite_flags_per_dtype_and_position(dtype):
    native = _native()
    n = 3 * 8192 + 37  # several chunks, a lane tail
    for pos in (0, 31, 32, 8191, 8192, n - 1):
        for value in (float("inf"), -float("inf"), float("nan")):
            xs = [torch.randn(5, dtype=dtype), torch.randn(n, dtype=dtype), torch.zeros(0, dtype=dtype)]
            xs[1][pos] = value
            assert native.nonfinite_flags(xs) == [True, False, True], (pos, value)
    big = torch.finfo(dtype).max
    xs = [torch.full((100,), big, dtype=dtype), torch.full((3, 3), -big, dtype=dtype), torch.randn(0, dtype=dtype)]
    assert native.nonfinite_flags(xs) is None  # the largest finite values are finite


def test_nonfinite_flags_refuses_what_it_cannot_read():
    native = _native()
    for bad in (torch.randn(4, 6).T, torch.arange(3), torch.zeros(2).as_subclass(_Sub)):
        with pytest.raises(ValueError):
            native.nonfinite_flags([torch.zeros(2), bad])
    assert base._native_nonfinite_flags([torch.randn(4, 6).T]) is None  # -> the ATen probe


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_step_skips_exactly_the_nonfinite_gradients(layout):
    """The optimizer's probe (native bit test, or the ATen probe for a transposed gradient)
    skips the parameters whose gradient has a NaN / inf and steps the others."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(3)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": 50}], lr=0.1)
    for w in ws:
        w.grad = torch.randn(12, 10)
    opt.step()
    before = [w.detach().clone() for w in ws]
    grads = [torch.randn(12, 10) if layout == "contiguous" else torch.randn(10, 12).T for _ in ws]
    grads[1][3, 4] = float("nan")
    for w, g in zip(ws, grads):
        w.grad = g
    opt.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(ws[1].detach(), before[1])
    assert not torch.equal(ws[0].detach(), before[0]) and not torch.equal(ws[2].detach(), before[2])


def _adam_case():
    torch.manual_seed(3)
    g, p = torch.randn(9, 7), torch.linalg.qr(torch.randn(7, 3))[0].T.contiguous()
    return g, p, 0.1 * torch.randn(9, 3), 0.1 * torch.rand(9, 3)


def test_eager_caller_same_result_as_the_dispatcher():
    """In eager mode under no_grad the public op runs its router directly (omitted trailing
    arguments filled from the schema's defaults); the result is bitwise the dispatcher's."""
    g, p, m, v = _adam_case()
    with torch.no_grad():
        m1, v1 = m.clone(), v.clone()
        n1 = ops.project_adam_(g, p, m1, v1, side="right", beta1=0.9, beta2=0.99, eps=1e-8)
        m2, v2 = m.clone(), v.clone()
        n2 = torch.ops.lowrank_kernels.projection_project_adam.default(g, p, m2, v2, "right", 0.9, 0.99, 1e-8)
    assert torch.equal(n1, n2) and torch.equal(m1, m2) and torch.equal(v1, v2)


def test_eager_caller_takes_the_dispatcher_under_a_mode_or_grad_mode():
    g, p, m, v = _adam_case()
    for no_grad in (True, False):
        with torch.set_grad_enabled(not no_grad), CountOps() as mode:
            ops.project_adam_(g, p, m.clone(), v.clone(), side="right", beta1=0.9, beta2=0.99, eps=1e-8)
        assert "lowrank_kernels.projection_project_adam" in mode.names  # a mode always sees the op
    calls = []
    real = reg._ROUTERS["projection_project_adam"]
    reg._ROUTERS["projection_project_adam"] = lambda *a: calls.append(len(a)) or real(*a)
    try:
        caller2 = reg.eager_caller(torch.ops.lowrank_kernels.projection_project_adam.default)
        with torch.no_grad():
            caller2(g, p, m.clone(), v.clone(), "right", 0.9, 0.99, 1e-8)  # direct: defaults filled
            with torch.enable_grad():
                caller2(g, p, m.clone(), v.clone(), "right", 0.9, 0.99, 1e-8)  # via the dispatcher
    finally:
        reg._ROUTERS["projection_project_adam"] = real
    n_args = len(torch.ops.lowrank_kernels.projection_project_adam.default._schema.arguments)
    assert calls == [n_args]  # only the no_grad call ran the router directly, with every argument


def test_add_one_matches_foreach_add():
    native = _native()
    steps = [torch.tensor(float(k)) for k in (0, 7, 2 ** 24 - 2)]
    want = [t.clone() for t in steps]
    torch._foreach_add_(want, 1.0)
    versions = [t._version for t in steps]
    assert native.add_one_(steps) is True
    assert all(torch.equal(a, b) for a, b in zip(steps, want))
    assert [t._version for t in steps] == [v + 1 for v in versions]  # as an in-place op
    # all or nothing: one entry it cannot take -> nothing written
    for bad in (torch.tensor(1.0, dtype=torch.float64), torch.zeros(2), torch.tensor(1.0, requires_grad=True),
                torch.tensor(1.0).as_subclass(_Sub)):
        before = [t.clone() for t in steps]
        assert native.add_one_(steps + [bad]) is False
        assert all(torch.equal(a, b) for a, b in zip(steps, before))
    with torch.inference_mode():
        inf_t = torch.tensor(3.0)
    assert native.add_one_([inf_t]) is False


def test_step_counts_under_a_dispatch_mode_take_the_aten_op():
    """Under a dispatch mode the step counts are incremented by the ATen op the mode sees."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(2)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": 50}], lr=0.1)
    for _ in range(2):
        for w in ws:
            w.grad = torch.randn(12, 10)
        opt.step()
    for w in ws:
        w.grad = torch.randn(12, 10)
    with CountOps() as mode:
        opt.step()
    assert "aten._foreach_add_" in mode.names
    assert [float(opt.state[w]["step"]) for w in ws] == [3.0, 3.0]


def test_public_ops_compile_fullgraph_under_no_grad():
    """torch.compile traces the public ops under no_grad (as in an optimizer step) without a
    graph break: the eager caller's checks fold away when compiling."""
    torch.manual_seed(0)
    w, g = torch.randn(9, 7), torch.randn(9, 7)
    p = torch.linalg.qr(torch.randn(7, 3))[0].T.contiguous()

    def step(w, g, p, ea, eas):
        with torch.no_grad():
            ops.project_update_backproject_(w, g, p, ea, eas, side="right", lr=0.01, step=1, weight_decay=0.1)
            ops.foreach_project_update_backproject_([w], [g], [p], [ea], [eas], side="right", lr=0.01, step=2)
        return w

    args = [w.clone(), g, p, torch.zeros(9, 3), torch.zeros(9, 3)]
    want = [w.clone(), g, p, torch.zeros(9, 3), torch.zeros(9, 3)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    step(*want)
    for a, b in zip(args, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
