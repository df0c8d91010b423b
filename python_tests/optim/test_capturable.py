"""Device-side non-finite flags and ``capturable=True``.

- the multi-tensor projection op's ``skip`` / ``coeffs`` device tensors on every backend
  (a skipped parameter, its moments and its 8-bit absmax stay bit-for-bit unchanged; the
  device coefficients give the host-list result), their validation (opcheck: python_tests/ops/test_opcheck.py);
- GaLoreAdamW / DCTAdamW with ``capturable=True``: a non-refresh step under a dispatch mode
  that fails on any host read of a tensor value equals ``capturable=False``; non-finite
  gradients are skipped on the device; checkpoints move between the two modes;
- the refusals (optimizers without support, compat, layer-wise);
- a ``gpu`` test capturing a non-refresh step in a CUDA graph and replaying it.
"""
import math
import warnings

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

from ..conftest import available_backends
from .._opcount import no_host_reads
from ._helpers import roundtrip

SHAPES = [(37, 23), (19, 41), (30, 30)]
RANK = 5


# --------------------------------------------------------------------------- the op
def _bucket(device, side, kind, bits=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, grads, projs, eas, easqs, ma, va = [], [], [], [], [], [], []
    for m, n in SHAPES:
        params.append(torch.randn(m, n, generator=gen).to(device))
        grads.append(torch.randn(m, n, generator=gen).to(device))
        if kind == "dense":
            q = torch.linalg.qr(torch.randn(n if side == "right" else m, RANK, generator=gen)).Q
            projs.append((q.T.contiguous() if side == "right" else q.contiguous()).to(device))
        else:
            s = n if side == "right" else m
            idx = torch.randperm(s, generator=gen)[:RANK].to(torch.int32)
            projs.append(ops.DCTProjector(ops.dct_basis(s, torch.float32, device), idx.to(device)))
        shape = ops.lowrank_shape(m, n, RANK, side)
        if bits == 8:
            st = ops.moments8_zeros(shape, device, block_size=4)
            # a few steps of history so the codes and absmax are not zero
            eas.append(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device))
            easqs.append(torch.randint(128, 256, shape, generator=gen, dtype=torch.uint8).to(device))
            ma.append(torch.rand(st["m_absmax"].shape, generator=gen).to(device))
            va.append(torch.rand(st["v_absmax"].shape, generator=gen).to(device))
        else:
            eas.append((0.1 * torch.randn(shape, generator=gen)).to(device))
            easqs.append((0.01 * torch.rand(shape, generator=gen)).to(device))
    return params, grads, projs, eas, easqs, ma, va


HYPER = dict(lr=[1e-2, 2e-2, 3e-3], beta1=0.9, beta2=0.999, eps=1e-8, step=[3, 7, 1],
             weight_decay=[0.1, 0.0, 0.3], scale=[0.25, 1.0, 0.5])


def _coeffs(device, dtype=torch.float64):
    a = [lr * math.sqrt(1 - HYPER["beta2"] ** t) / (1 - HYPER["beta1"] ** t) * sc
         for lr, t, sc in zip(HYPER["lr"], HYPER["step"], HYPER["scale"])]
    d = [1.0 - lr * wd for lr, wd in zip(HYPER["lr"], HYPER["weight_decay"])]
    return torch.tensor(list(zip(a, d)), dtype=dtype, device=device)


def _call(b, side, **kw):
    params, grads, projs, eas, easqs, ma, va = b
    extra = dict(m_absmax=ma, v_absmax=va, block_size=4) if ma else {}
    ops.foreach_project_update_backproject_(params, grads, projs, eas, easqs, side=side, **HYPER, **extra, **kw)


def _clone(b):
    out = []
    for xs in b:
        out.append([x.clone() if isinstance(x, torch.Tensor) else x for x in xs])
    return out


def _written(b):
    params, _, _, eas, easqs, ma, va = b
    return [params, eas, easqs, ma, va]


def _backends(device):
    return available_backends(device)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct"])
@pytest.mark.parametrize("bits", [32, 8])
def test_skip_and_coeffs_match_the_host_lists(device, side, kind, bits):
    """skip: the flagged parameter (here with a NaN gradient) keeps weight, moments and absmax
    bit-for-bit; the others equal the call without flags. coeffs: equal the host lists
    (bit-for-bit on C++ and Triton, which round the float64 coefficient as the host double)."""
    for backend in _backends(device):
        with reg.use_backend(backend):
            base = _bucket(device, side, kind, bits)
            plain = _clone(base)
            _call(plain, side)
            flagged = _clone(base)
            flagged[1][1] = flagged[1][1].clone()
            flagged[1][1][2, 3] = float("nan")
            skip = torch.tensor([False, True, False], device=device)
            _call(flagged, side, skip=skip, coeffs=_coeffs(device))
            for got_l, want_l, before_l in zip(_written(flagged), _written(plain), _written(base)):
                for i, (got, want, before) in enumerate(zip(got_l, want_l, before_l)):
                    if i == 1:
                        assert torch.equal(got, before), (backend, "skipped entry changed")
                    elif backend == "reference" or got.dtype == torch.uint8:
                        # uint8 codes: a coefficient rounding differently never reaches them (N
                        # does not depend on the coefficients), so they must match exactly
                        if got.dtype == torch.uint8:
                            assert torch.equal(got, want), backend
                        else:
                            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
                    else:
                        assert torch.equal(got, want), (backend, i)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_skip_all_and_none(device, dtype):
    for backend in _backends(device):
        with reg.use_backend(backend):
            base = _bucket(device, "right", "dense")
            b = _clone(base)
            _call(b, "right", skip=torch.ones(3, dtype=dtype, device=device))
            for got_l, before_l in zip(_written(b), _written(base)):
                assert all(torch.equal(x, y) for x, y in zip(got_l, before_l)), backend
            b2, want = _clone(base), _clone(base)
            _call(b2, "right", skip=torch.zeros(3, dtype=dtype, device=device))
            _call(want, "right")
            for got_l, want_l in zip(_written(b2), _written(want)):
                assert all(torch.equal(x, y) for x, y in zip(got_l, want_l)), backend


@pytest.mark.parametrize("bad, exc, msg", [
    (dict(skip=torch.zeros(3, dtype=torch.float32)), TypeError, "skip must have dtype"),
    (dict(skip=torch.zeros(2, dtype=torch.bool)), ValueError, r"skip must have shape \(3,\)"),
    (dict(skip=torch.zeros(6, dtype=torch.bool)[::2]), ValueError, "skip must be contiguous"),
    (dict(coeffs=torch.zeros(3, 2, dtype=torch.int32)), TypeError, "coeffs must have dtype"),
    (dict(coeffs=torch.zeros(3, 3, dtype=torch.float32)), ValueError, r"coeffs must have shape \(3, 2\)"),
    (dict(coeffs=torch.zeros(3, dtype=torch.float32)), ValueError, "coeffs must have shape"),
])
def test_bad_flags_raise_and_change_nothing(bad, exc, msg):
    for backend in _backends("cpu"):
        with reg.use_backend(backend):
            base = _bucket("cpu", "right", "dense")
            b = _clone(base)
            with pytest.raises(exc, match=msg):
                _call(b, "right", **bad)
            for got_l, before_l in zip(_written(b), _written(base)):
                assert all(torch.equal(x, y) for x, y in zip(got_l, before_l))


def test_flags_aliasing_a_written_tensor_are_refused():
    b = _bucket("cpu", "right", "dense")
    flat = b[3][0].view(-1)  # exp_avgs[0]
    coeffs = flat[:6].view(3, 2)
    with pytest.raises(ValueError, match="coeffs"):
        _call(b, "right", coeffs=coeffs)


# --------------------------------------------------------------------------- the optimizers
def _model(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(m, n, generator=gen).to(device, dtype)) for m, n in SHAPES]
    bias = torch.nn.Parameter(torch.randn(11, generator=gen).to(device, dtype))
    return ws, bias


def _make(cls, ws, bias, capturable, **kw):
    groups = [{"params": ws, "rank": RANK, "update_proj_gap": 4}, {"params": [bias]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(groups, lr=1e-2, weight_decay=0.05, capturable=capturable, **kw)


def _grads(device, t, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + t)
    out = [torch.randn(m, n, generator=gen) for m, n in SHAPES] + [torch.randn(11, generator=gen)]
    return [g.to(device, dtype) for g in out]


def _exact(device) -> bool:
    """C++ and Triton read the float64 device coefficients and round them as the host's double:
    bit-for-bit. The reference composes the update in another order with the coefficients as
    tensors (last-bit differences)."""
    op = reg.OPS["projection_foreach_project_update_backproject"]
    return reg.resolve_backend(op, torch.device(device)) != "reference"


def _same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _set_grads(ws, bias, grads):
    for p, g in zip(ws + [bias], grads):
        p.grad = g.clone()


OPTS = [(GaLoreAdamW, {}), (DCTAdamW, {}), (GaLoreAdamW, dict(moment_transport=True)),
        (DCTAdamW, dict(moment_transport=True))]


@pytest.mark.parametrize("cls, kw", OPTS, ids=["galore", "dct", "galore-transport", "dct-transport"])
def test_capturable_equals_default_and_reads_no_host_value(device, cls, kw):
    """8 steps (refreshes at 1 and 5): the non-refresh steps run under no_host_reads(). Projected
    weights and moments bit-for-bit equal to capturable=False (same kernels; the float64
    device coefficients round like the host's double); the plain (bias) group to 1e-6
    (torch's foreach AdamW vs the masked capturable AdamW: another order of operations)."""
    ws0, b0 = _model(device)
    ws1, b1 = _model(device)
    ref = _make(cls, ws0, b0, False, **kw)
    cap = _make(cls, ws1, b1, True, **kw)
    for t in range(1, 9):
        g = _grads(device, t)
        _set_grads(ws0, b0, g)
        ref.step()
        _set_grads(ws1, b1, g)
        if (t - 1) % 4 == 0:
            cap.step()  # refresh: may synchronize
        else:
            with no_host_reads() as mode:
                cap.step()
            names = set(mode.counts)
            assert any("projection_foreach_project_update_backproject" in n for n in names), names
    exact = _exact(device)
    for a, b in zip(ws0, ws1):
        _same(a, b, exact)
        _same(ref.state[a]["exp_avg"], cap.state[b]["exp_avg"], exact)
        _same(ref.state[a]["exp_avg_sq"], cap.state[b]["exp_avg_sq"], exact)
        assert cap.state[b]["step"].device == b.device and cap.state[b]["step"].dtype == torch.float32
        assert float(cap.state[b]["step"]) == float(ref.state[a]["step"]) == 8.0
        assert ref.state[a]["step"].device.type == "cpu"
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-7)
    assert cap.state[b1]["step"].device == b1.device


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW], ids=["galore", "dct"])
def test_capturable_skips_nonfinite_on_the_device(device, cls):
    """A NaN / inf gradient at a non-refresh step: that parameter (weight, moments, step) stays
    bit-for-bit as it was, with no host read; the others step as with capturable=False."""
    ws0, b0 = _model(device)
    ws1, b1 = _model(device)
    ref = _make(cls, ws0, b0, False)
    cap = _make(cls, ws1, b1, True)
    for t in range(1, 4):
        g = _grads(device, t)
        if t == 3:
            g[1][0, 0] = float("nan")
            g[3][2] = float("inf")  # the bias (plain group)
        _set_grads(ws0, b0, g)
        ref.step()
        _set_grads(ws1, b1, g)
        if t == 3:
            before = {id(p): (p.clone(), {k: v.clone() for k, v in cap.state[p].items()}) for p in ws1 + [b1]}
            with no_host_reads():
                cap.step()
        else:
            cap.step()
    for i in (1, 3):
        p = (ws1 + [b1])[i]
        w, st = before[id(p)]
        assert torch.equal(p, w)
        for k, v in st.items():
            assert torch.equal(cap.state[p][k], v), k
    for a, b in zip(ws0, ws1):
        _same(a, b, _exact(device))
        assert float(cap.state[b]["step"]) == float(ref.state[a]["step"])
    assert float(cap.state[ws1[1]]["step"]) == 2.0
    assert ref.nonfinite_skips == 2 and cap.nonfinite_skips == 0
    assert cap.nonfinite_skip_count() == 2


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW], ids=["galore", "dct"])
def test_checkpoints_move_between_capturable_and_not(device, cls):
    """An old (capturable=False, CPU step) state_dict loads into capturable=True (steps on the
    parameter's device) and back, through torch.save / weights_only load; the next steps equal
    an uninterrupted capturable=False run."""
    ws0, b0 = _model(device)
    ref = _make(cls, ws0, b0, False)
    ws1, b1 = _model(device)
    first = _make(cls, ws1, b1, False)
    for t in range(1, 4):
        g = _grads(device, t)
        _set_grads(ws0, b0, g)
        ref.step()
        _set_grads(ws1, b1, g)
        first.step()
    sd = roundtrip(first.state_dict())
    assert all(v["step"].device.type == "cpu" for v in sd["state"].values())
    cap = _make(cls, ws1, b1, True)
    cap.load_state_dict(sd)
    assert all(g["capturable"] for g in cap.param_groups)
    for p in ws1 + [b1]:
        assert cap.state[p]["step"].device == p.device and cap.state[p]["step"].dtype == torch.float32
    for t in range(4, 6):  # 4: non-refresh, no host read even right after loading; 5: a refresh
        g = _grads(device, t)
        _set_grads(ws0, b0, g)
        ref.step()
        _set_grads(ws1, b1, g)
        if t == 4:
            with no_host_reads():
                cap.step()
        else:
            cap.step()
    sd2 = roundtrip(cap.state_dict())
    back = _make(cls, ws1, b1, False)
    back.load_state_dict(sd2)
    assert not any(g["capturable"] for g in back.param_groups)
    for p in ws1 + [b1]:
        assert back.state[p]["step"].device.type == "cpu"
    for t in range(6, 8):
        g = _grads(device, t)
        _set_grads(ws0, b0, g)
        ref.step()
        _set_grads(ws1, b1, g)
        back.step()
    for a, b in zip(ws0, ws1):
        _same(a, b, _exact(device))
        assert float(back.state[b]["step"]) == float(ref.state[a]["step"]) == 7.0
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-7)


def test_sync_step_counts_after_replays():
    """Graph replays advance the device step counts behind the host's back (simulated here by
    writes through ``.data``, which do not bump the version counter): the next eager step then
    misses the refresh unless :meth:`sync_step_counts` re-reads the counts first."""
    results = {}
    for sync in (False, True):
        ws, b = _model("cpu")
        opt = _make(GaLoreAdamW, ws, b, True)
        for t in (1, 2):
            _set_grads(ws, b, _grads("cpu", t))
            opt.step()
        for p in ws + [b]:
            opt.state[p]["step"].data.add_(2.0)  # two "replays"
        proj = [opt.state[p]["projector"].clone() for p in ws]
        if sync:
            opt.sync_step_counts()
        _set_grads(ws, b, _grads("cpu", 5))
        opt.step()  # step 5: a refresh (update_proj_gap=4)
        results[sync] = [not torch.equal(opt.state[p]["projector"], q) for p, q in zip(ws, proj)]
        assert all(float(opt.state[p]["step"]) == 5.0 for p in ws + [b])
    assert results == {False: [False] * 3, True: [True] * 3}


def test_tensor_lr_with_capturable(device):
    """A 0-dim device lr: changed in place between steps (as LR schedulers do with tensor lrs),
    with no host read, it gives the float-lr result."""
    ws0, b0 = _model(device)
    ws1, b1 = _model(device)
    ref = _make(GaLoreAdamW, ws0, b0, False)
    lr_t = torch.tensor(1e-2, device=device)
    groups = [{"params": ws1, "rank": RANK, "update_proj_gap": 4, "lr": lr_t}, {"params": [b1], "lr": lr_t}]
    cap = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.05, capturable=True)
    for t in range(1, 4):
        lr = 1e-2 / t
        for g in ref.param_groups:
            g["lr"] = lr
        lr_t.fill_(lr)
        gr = _grads(device, t)
        _set_grads(ws0, b0, gr)
        ref.step()
        _set_grads(ws1, b1, gr)
        if t == 1:
            cap.step()
        else:
            with no_host_reads():
                cap.step()
    for a, b in zip(ws0, ws1):
        # lr is float32 on the device: the coefficients differ from the double lr in the last bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-7)


def test_refusals():
    from lowrank_kernels.optim import APOLLOAdamW, QGaLoreAdamW, layerwise

    ws, bias = _model("cpu")
    with pytest.raises(ValueError, match="capturable=True is not supported by QGaLoreAdamW"):
        QGaLoreAdamW([{"params": ws, "rank": RANK, "capturable": True}])
    with pytest.raises(ValueError, match="capturable=True is not supported by APOLLOAdamW"):
        APOLLOAdamW([{"params": ws, "rank": RANK, "capturable": True}])
    with pytest.raises(ValueError, match="cannot be combined with compat='galore-torch'"):
        GaLoreAdamW([{"params": ws, "rank": RANK}], capturable=True, compat="galore-torch")
    with pytest.raises(TypeError, match="capturable must be a bool"):
        GaLoreAdamW([{"params": ws, "rank": RANK}], capturable=1)
    with pytest.raises(TypeError, match="Tensor lr is supported only with capturable=True"):
        GaLoreAdamW([{"params": ws, "rank": RANK}], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="0-dim floating tensor"):
        GaLoreAdamW([{"params": ws, "rank": RANK}], lr=torch.tensor([1e-3]), capturable=True)
    model = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match="layerwise: capturable=True is not supported"):
        layerwise(model, lambda g: GaLoreAdamW(g, rank=2, capturable=True))


# --------------------------------------------------------------------------- CUDA graph
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW], ids=["galore", "dct"])
def test_cuda_graph_replay_equals_eager(cls):
    """Capture one non-refresh step in torch.cuda.graph, replay it on new gradients (one with a
    NaN) and compare with the same optimizer stepping eagerly."""
    dev = torch.device("cuda")
    ws0, b0 = _model(dev)
    ws1, b1 = _model(dev)
    eager = _make(cls, ws0, b0, True)
    graphed = _make(cls, ws1, b1, True)
    for t in (1, 2):  # refresh at 1; step 2 warms up the non-refresh path (Triton compiles)
        g = _grads(dev, t)
        _set_grads(ws0, b0, g)
        eager.step()
        _set_grads(ws1, b1, g)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graphed.step()
        torch.cuda.current_stream().wait_stream(side)
    static = [p.grad for p in ws1 + [b1]]
    graph = torch.cuda.CUDAGraph()
    # capture consumes a step: capture on a copy of the state, then restore it
    saved = [(p.detach().clone(), {k: v.clone() for k, v in graphed.state[p].items()}) for p in ws1 + [b1]]
    with torch.cuda.graph(graph):
        graphed.step()
    for p, (w, st) in zip(ws1 + [b1], saved):
        p.detach().copy_(w)
        for k, v in st.items():
            graphed.state[p][k].copy_(v)
    for t in (3, 4):  # non-refresh steps (update_proj_gap=4: the next refresh is step 5)
        g = _grads(dev, t)
        if t == 4:
            g[0][1, 1] = float("nan")
        _set_grads(ws0, b0, g)
        eager.step()
        for s, x in zip(static, g):
            s.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(ws0 + [b0], ws1 + [b1]):
        assert torch.equal(a, b)
        assert torch.equal(eager.state[a]["exp_avg"], graphed.state[b]["exp_avg"])
        assert float(eager.state[a]["step"]) == float(graphed.state[b]["step"])
    assert float(graphed.state[ws1[0]]["step"]) == 3.0


# --------------------------------------------------------------------------- capture rules (host side)
def test_skip_counters_exist_before_any_capture(monkeypatch):
    """The device-side skip counters are made at construction (and on synchronizing steps),
    never by a captured step: made inside a graph, their zero fill would replay too. A step
    that would have to make one while capturing refuses, naming the remedy."""
    from lowrank_kernels.optim import capturable as cap

    ws, bias = _model("cpu")
    opt = _make(GaLoreAdamW, ws, bias, True)
    assert list(opt._skip_counters) == [torch.device("cpu")]
    counter = opt._skip_counters[torch.device("cpu")]
    assert _make(GaLoreAdamW, *_model("cpu"), False)._skip_counters == {}  # not capturable: none
    for t in range(1, 4):  # refresh, then capturable steps: the same counter object throughout
        _set_grads(ws, bias, _grads("cpu", t))
        opt.step()
    assert opt._skip_counters[torch.device("cpu")] is counter
    monkeypatch.setattr(cap, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA graph capture"):
        cap.device_skip([torch.ones(3)], [{"skip_nonfinite": True}], {})
    flags = cap.device_skip([torch.ones(3)], [{"skip_nonfinite": True}], opt._skip_counters)  # exists: fine
    assert flags.tolist() == [False]


def test_dct_refresh_reads_step_counts_once_not_per_parameter():
    """A capturable DCTAdamW's first step and refresh steps read the step counts through their
    host mirrors (refreshed by one stacked read per device), not one ``int(step)`` per parameter
    (a device synchronization each on a GPU): the count of scalar reads does not grow with the
    number of parameters. (GaLoreAdamW's SVD refresh checks each new projector for finiteness:
    one read per refreshed parameter, by design.)"""
    cls = DCTAdamW
    from .._opcount import CountOps

    def reads(nparams):
        gen = torch.Generator().manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(24, 20, generator=gen)) for _ in range(nparams)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([{"params": ws, "rank": 4, "update_proj_gap": 2}], lr=1e-2, capturable=True)
        out = []
        for _ in range(3):  # refresh (first step), capturable, refresh
            for w in ws:
                w.grad = torch.randn(24, 20, generator=gen)
            with CountOps() as mode:
                opt.step()
            out.append(mode.counts.get("aten._local_scalar_dense", 0) + mode.counts.get("aten.item", 0))
        return out

    assert reads(3) == reads(6), (reads(3), reads(6))
