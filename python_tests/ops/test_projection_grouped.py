"""The grouped Triton launches of the multi-tensor ops.

``projection_foreach_project_update_backproject`` is two launches for a whole list of
odd-shaped parameters (one project + Adam, one back-project + apply, each over every tile of
every parameter, a table of addresses/shapes/strides read by the kernels) and
``adam_foreach_update`` is one: checked here by counting launches, and by comparing with a
loop of the single-tensor Triton launches (bit for bit: every tile runs the single kernels'
code with the same tile under the interpreter) and with the reference (elementwise, at the
tolerances of the single-tensor tests). Lists mix shapes (one row, one column of tiles,
several tiles, ranks 1..8), both sides, every projector kind, float32 / bf16 parameters,
float32 / bf16 stochastic-rounding / 8-bit moments, device ``skip`` / ``coeffs`` flags,
non-contiguous tensors, mixed dtypes (split on the host), one entry and none.

Runs under TRITON_INTERPRET=1 on CPU; with LOWRANK_KERNELS_TEST_DEVICE=cuda on a GPU
(bench/gpu_check.sh), where the weights are compared with the single launches' at 1e-6
instead of bitwise (the grouped back-projection may take another tile there; see
``_assert_equal_states``). Not yet run on a GPU.
"""
import math
import os

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend

from .._interpreter import FMA_ROUNDS_TWICE, fma_slack
from .._numerics import assert_change_close, assert_matches_backend, assert_within_roundings
from ..conftest import require_backend

kp = pytest.importorskip("lowrank_kernels.kernels.projection")
kg = pytest.importorskip("lowrank_kernels.kernels.projection_grouped")
ka = pytest.importorskip("lowrank_kernels.kernels.adam")
L = pytest.importorskip("lowrank_kernels.kernels._launch")

if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

# (m, n, rank): odd shapes; (130, 66) has several tiles of the interpreter's 64 x 64 tile in
# both kernels, (1, 9) a single row, (5, 70) / (70, 5) a short side.
SHAPES = [(33, 17, 3), (5, 70, 1), (64, 64, 8), (1, 9, 1), (130, 66, 5), (70, 5, 2)]
KINDS = ("dense", "dct", "int4")
SIDES = ("right", "left")
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-6)
BS = 16  # 8-bit block size: several blocks per row for the wider moments, one partial block for the narrow


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _projector(kind, m, n, r, side, dtype, gen, device):
    k = n if side == "right" else m
    if kind == "dct":
        idx = torch.randperm(k, generator=gen)[:r].to(torch.int32).to(device)
        return ops.DCTProjector(ops.dct_basis(k, dtype).to(device), idx)
    q = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))[0]
    dense = (q.T if side == "right" else q).to(dtype).contiguous().to(device)
    if kind == "dense":
        return dense
    return ops.Int4Projector.quantize(dense, 16)


def _bucket(kind, side, dtype, moments, device, shapes=SHAPES, seed=0, transposed=()):
    """``(params, grads, projs, exp_avgs, exp_avg_sqs, extra)``; ``extra``: the moment-format
    keywords of the op (absmax lists / seeds). ``transposed``: entries whose gradient and
    parameter are transposed views (non-unit column strides)."""
    gen = _gen(seed)
    params, grads, projs, eas, easqs, mas, vas = [], [], [], [], [], [], []
    for i, (m, n, r) in enumerate(shapes):
        if i in transposed:
            params.append(torch.randn(n, m, generator=gen).to(dtype).to(device).T)
            grads.append(torch.randn(n, m, generator=gen).to(dtype).to(device).T)
        else:
            params.append(torch.randn(m, n, generator=gen).to(dtype).to(device))
            grads.append(torch.randn(m, n, generator=gen).to(dtype).to(device))
        projs.append(_projector(kind, m, n, r, side, dtype, gen, device))
        ls = ops.lowrank_shape(m, n, r, side)
        if moments == "q8":
            st = ops.moments8_zeros(ls, device, block_size=BS)
            eas.append(torch.randint(0, 256, ls, generator=gen, dtype=torch.uint8).to(device))
            easqs.append(torch.randint(128, 256, ls, generator=gen, dtype=torch.uint8).to(device))
            mas.append(torch.rand(st["m_absmax"].shape, generator=gen).to(device))
            vas.append((0.01 * torch.rand(st["v_absmax"].shape, generator=gen)).to(device))
        else:
            mdt = torch.bfloat16 if moments == "sr16" else torch.float32
            eas.append((0.1 * torch.randn(ls, generator=gen)).to(mdt).to(device))
            easqs.append((0.01 * torch.rand(ls, generator=gen) + 1e-4).to(mdt).to(device))
    extra = {}
    if moments == "q8":
        extra = dict(m_absmax=mas, v_absmax=vas, block_size=BS)
    elif moments == "sr16":
        extra = dict(moment_seed=[11 + 3 * i for i in range(len(shapes))])
    return params, grads, projs, eas, easqs, extra


def _hyper(k):
    return dict(lr=[0.01 * (1 + i % 3) for i in range(k)], step=[1 + 2 * i for i in range(k)],
                weight_decay=[0.1 * (i % 2) for i in range(k)], scale=[0.25 + 0.5 * (i % 3) for i in range(k)])


def _coeffs(hyper, device):
    """The ``(n, 2)`` float64 ``coeffs`` of the host lists: ``(step_size * scale, 1 - lr * wd)``."""
    a = [lr * math.sqrt(1 - HYPER["beta2"] ** t) / (1 - HYPER["beta1"] ** t) * sc
         for lr, t, sc in zip(hyper["lr"], hyper["step"], hyper["scale"])]
    d = [1.0 - lr * wd for lr, wd in zip(hyper["lr"], hyper["weight_decay"])]
    return torch.tensor(list(zip(a, d)), dtype=torch.float64, device=device)


def _clone(xs):
    return [x.clone() for x in xs]


def _clone_extra(extra):
    return {k: (_clone(v) if k in ("m_absmax", "v_absmax") else v) for k, v in extra.items()}


def _state(params, eas, easqs, extra):
    return [params, eas, easqs] + [extra[k] for k in ("m_absmax", "v_absmax") if k in extra]


def _single_loop(backend, params, grads, projs, eas, easqs, extra, side, hyper):
    """The single-tensor op entry by entry (copies)."""
    p, e, v, x = _clone(params), _clone(eas), _clone(easqs), _clone_extra(extra)
    with use_backend(backend):
        for i in range(len(p)):
            kw = {}
            if "m_absmax" in x:
                kw = dict(m_absmax=x["m_absmax"][i], v_absmax=x["v_absmax"][i], block_size=x["block_size"])
            if "moment_seed" in x:
                kw = dict(moment_seed=x["moment_seed"][i])
            ops.project_update_backproject_(p[i], grads[i], projs[i], e[i], v[i], side=side, lr=hyper["lr"][i],
                                            step=hyper["step"][i], weight_decay=hyper["weight_decay"][i],
                                            scale=hyper["scale"][i], **HYPER, **kw)
    return p, e, v, x


def _grouped(params, grads, projs, eas, easqs, extra, side, hyper, **flags):
    p, e, v, x = _clone(params), _clone(eas), _clone(easqs), _clone_extra(extra)
    with use_backend("triton"):
        ops.foreach_project_update_backproject_(p, grads, projs, e, v, side=side, **hyper, **HYPER, **x, **flags)
    return p, e, v, x


def _assert_equal_states(a, b, what, before=None):
    """Every tensor bit for bit. ``before``: the parameters before the step, when ``b`` comes
    from the single-tensor launches: on a GPU the grouped back-projection may take another
    tile than a single launch (its table's tile for the list's largest problem), so there the
    weights' change is compared elementwise at 1e-6 (the moments stay bitwise: the project
    kernel's tables do not depend on the shape, and the lists here have one 8-bit block width,
    so its grouped tile is the single launches' tile)."""
    for name, xs, ys in zip(("param", "exp_avg", "exp_avg_sq", "m_absmax", "v_absmax"), a, b):
        for i, (s, t) in enumerate(zip(xs, ys)):
            if name == "param" and before is not None and s.device.type == "cuda":
                assert_change_close(s, before[i], t, f"{what}: param {i}", rtol=1e-6)
            else:
                assert torch.equal(s, t), f"{what}: {name}[{i}] differs"


@pytest.fixture(autouse=True)
def _triton_available(device):
    require_backend("projection_foreach_project_update_backproject", "triton", device)


# --------------------------------------------------------------------------- launch counts
class _Counter:
    def __init__(self, monkeypatch):
        self.launches = []
        for name in ("launch", "launch_gemm", "launch_grouped"):
            real = getattr(L, name)

            def wrapped(*args, _real=real, _name=name, **kw):
                self.launches.append((_name, args[0]))
                return _real(*args, **kw)

            monkeypatch.setattr(L, name, wrapped)


@pytest.mark.parametrize("count", [1, 3, 6])
@pytest.mark.parametrize("moments", ["plain", "sr16", "q8"])
def test_two_launches_per_projection_call_one_per_adam_call(device, monkeypatch, count, moments):
    shapes = SHAPES[:count]
    params, grads, projs, eas, easqs, extra = _bucket("dense", "right", torch.float32, moments, device, shapes)
    counter = _Counter(monkeypatch)
    with use_backend("triton"):
        ops.foreach_project_update_backproject_(params, grads, projs, eas, easqs, side="right", **_hyper(count),
                                                **HYPER, **extra)
    kname = {"plain": "project_grouped", "sr16": "project_sr_grouped", "q8": "project_q8_grouped"}[moments]
    assert counter.launches == [("launch_grouped", kname), ("launch_grouped", "backproject_grouped")]

    counter.launches.clear()
    rs = [torch.randn(ops.lowrank_shape(m, n, r, "right"), generator=_gen(1)).to(device) for m, n, r in shapes]
    with use_backend("triton"):
        ops.foreach_adam_update_(rs, eas, easqs, **HYPER, **extra)
    # one launch per alignment class: entries whose sizes are multiples of 16 (the 64 x 8 one)
    # launch apart from the others (see test_adam_mixed_aligned_and_unaligned_entries)
    classes = {r.shape[-1] % 16 == 0 and min(BS, r.shape[-1]) % 16 == 0 if moments == "q8" else r.numel() % 16 == 0
               for r in rs}
    assert counter.launches == [("launch", "adam")] * len(classes)

    # the single-tensor ops keep one launch (project) / two launches (step) per parameter
    counter.launches.clear()
    with use_backend("triton"):
        for i in range(count):
            kw = dict(m_absmax=extra["m_absmax"][i], v_absmax=extra["v_absmax"][i], block_size=BS) \
                if moments == "q8" else ({"moment_seed": extra["moment_seed"][i]} if moments == "sr16" else {})
            ops.project_update_backproject_(params[i], grads[i], projs[i], eas[i], easqs[i], side="right", lr=0.01,
                                            step=2, **HYPER, **kw)
    assert [name for name, _ in counter.launches] == ["launch_gemm"] * (2 * count)


def test_mixed_dtypes_split_into_uniform_launches(device, monkeypatch):
    """float32 and bf16 parameters in one list: two sub-lists, two launches each, results
    equal to the single launches."""
    a = _bucket("dense", "left", torch.float32, "plain", device, SHAPES[:3])
    b = _bucket("dense", "left", torch.bfloat16, "plain", device, SHAPES[3:], seed=1)
    params, grads, projs, eas, easqs = (a[k][:1] + b[k][:1] + a[k][1:] + b[k][1:] for k in range(5))
    hyper = _hyper(len(params))
    counter = _Counter(monkeypatch)
    got = _grouped(params, grads, projs, eas, easqs, {}, "left", hyper)
    assert [n for _, n in counter.launches] == ["project_grouped", "backproject_grouped"] * 2
    want = _single_loop("triton", params, grads, projs, eas, easqs, {}, "left", hyper)
    _assert_equal_states(got[:3], want[:3], "mixed dtypes", params)
    # the device flags are read by list index, not by index inside a sub-list
    k = len(params)
    skip = torch.tensor([i in (1, 4) for i in range(k)], device=device)
    coeffs = _coeffs(hyper, device)
    flagged = _grouped(params, grads, projs, eas, easqs, {}, "left", hyper, skip=skip, coeffs=coeffs)
    for name, a, b, c in zip(("param", "exp_avg", "exp_avg_sq"), flagged[:3], got[:3], (params, eas, easqs)):
        for i in range(k):
            assert torch.equal(a[i], c[i] if i in (1, 4) else b[i]), (name, i)


# --------------------------------------------------------------------------- grouped == single launches == reference
def _abs_gemm_max(grad, proj, side) -> float:
    """``max |G| |P|^T`` (right) or ``max |P|^T |G|`` (left), in float64: what bounds R's
    float32 summation error (a few eps of it)."""
    if isinstance(proj, ops.DCTProjector):
        p = proj.dense(side)
    elif isinstance(proj, ops.Int4Projector):
        p = proj.dequantize()
    else:
        p = proj
    g, p = grad.double().abs(), p.double().abs()
    return float((g @ p.T if side == "right" else p.T @ g).max())


def _check_against_reference(got, params, grads, projs, eas, easqs, extra, side, hyper, moments):
    ref = _single_loop("reference", params, grads, projs, eas, easqs, extra, side, hyper)
    ref = _state(*ref[:3], ref[3])
    for i in range(len(params)):
        if moments == "plain":
            assert_change_close(got[0][i], params[i], ref[0][i], f"param {i}")
            assert_matches_backend(got[1][i], ref[1][i], f"exp_avg {i}")
            assert_matches_backend(got[2][i], ref[2][i], f"exp_avg_sq {i}")
        elif moments == "sr16":
            # bf16 moments: the stochastic rounding of float32 values equal to ~1e-6 (one bf16
            # spacing apart where a value sits at a rounding boundary); N is bf16 (two roundings)
            assert_within_roundings(got[1][i], ref[1][i], f"exp_avg {i}", k=1)
            assert_within_roundings(got[2][i], ref[2][i], f"exp_avg_sq {i}", k=1)
            assert_change_close(got[0][i], params[i], ref[0][i], f"param {i}", rtol=2e-2)
        else:
            # 8-bit: absmax at float32 accuracy, codes equal or one apart (ties), N float32.
            # absmax = max |beta m_old + (1 - beta) R| of a block: beside 1e-5 of it, (1 - beta)
            # times R's float32 summation error (a few eps of sum_k |G_ik P_jk|), which a block
            # whose two terms nearly cancel turns into more than 1e-5 of the result (dct, right,
            # float32: 1.4e-5, 1.2e-8 absolute, with 3e-9 between the reference and float64).
            s = _abs_gemm_max(grads[i], projs[i], side)
            eps = torch.finfo(torch.float32).eps
            torch.testing.assert_close(got[3][i], ref[3][i], rtol=1e-5, atol=(1 - HYPER["beta1"]) * 4 * eps * s)
            torch.testing.assert_close(got[4][i], ref[4][i], rtol=1e-5, atol=(1 - HYPER["beta2"]) * 8 * eps * s * s)
            for name, s, t in (("exp_avg", got[1][i], ref[1][i]), ("exp_avg_sq", got[2][i], ref[2][i])):
                d = (s.long() - t.long()).abs()
                assert int(d.max()) <= 1 and int((d > 0).sum()) <= max(2, 0.02 * d.numel()), f"{name} {i}"
            assert_change_close(got[0][i], params[i], ref[0][i], f"param {i}", rtol=1e-4)


@pytest.mark.parametrize("moments", ["plain", "sr16", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_equals_single_launches_and_reference(device, kind, side, dtype, moments):
    params, grads, projs, eas, easqs, extra = _bucket(kind, side, dtype, moments, device)
    hyper = _hyper(len(params))
    got = _grouped(params, grads, projs, eas, easqs, extra, side, hyper)
    want = _single_loop("triton", params, grads, projs, eas, easqs, extra, side, hyper)
    _assert_equal_states(_state(*got[:3], got[3]), _state(*want[:3], want[3]), f"{kind} {side} {moments}", params)
    for i in range(len(params)):  # every entry written (a bf16 weight may not move: its change is below one ulp)
        assert not torch.equal(got[1][i], eas[i]), f"exp_avg {i} unchanged"
        assert dtype == torch.bfloat16 or not torch.equal(got[0][i], params[i]), f"param {i} unchanged"
    _check_against_reference(_state(*got[:3], got[3]), params, grads, projs, eas, easqs, extra, side, hyper,
                             moments)


@pytest.mark.parametrize("transposed", [(0, 4), tuple(range(len(SHAPES)))], ids=["some", "all"])
@pytest.mark.parametrize("side", SIDES)
def test_non_contiguous_entries(device, side, transposed):
    """Transposed gradients and parameters in some entries (the kernels read the table's
    strides: no unit-stride shortcut for the list) or in all (the unit stride is the other one)."""
    params, grads, projs, eas, easqs, extra = _bucket("dense", side, torch.float32, "plain", device,
                                                      transposed=transposed)
    hyper = _hyper(len(params))
    got = _grouped(params, grads, projs, eas, easqs, extra, side, hyper)
    want = _single_loop("triton", params, grads, projs, eas, easqs, extra, side, hyper)
    _assert_equal_states(got[:3], want[:3], "non-contiguous", params)
    _check_against_reference(got, params, grads, projs, eas, easqs, extra, side, hyper, "plain")


@pytest.mark.parametrize("moments", ["plain", "q8"])
@pytest.mark.parametrize("kind", ["dense", "dct"])
def test_skip_and_coeffs_flags(device, kind, moments):
    """``skip``: flagged entries keep every bit of their weight and moments, the others equal the
    unflagged call; ``coeffs`` (float64, computed as the host does) equal the host lists."""
    params, grads, projs, eas, easqs, extra = _bucket(kind, "right", torch.float32, moments, device)
    k = len(params)
    hyper = _hyper(k)
    plain = _grouped(params, grads, projs, eas, easqs, extra, "right", hyper)
    skip = torch.tensor([i in (1, 4) for i in range(k)], device=device)
    flagged = _grouped(params, grads, projs, eas, easqs, extra, "right", hyper, skip=skip)
    before = _state(params, eas, easqs, extra)
    for name, a, b, c in zip(("param", "exp_avg", "exp_avg_sq", "m_absmax", "v_absmax"),
                             _state(*flagged[:3], flagged[3]), _state(*plain[:3], plain[3]), before):
        for i in range(k):
            assert torch.equal(a[i], c[i] if i in (1, 4) else b[i]), (name, i)
    coeffs = _coeffs(hyper, device)
    junk = dict(hyper, lr=[0.5] * k, step=[1] * k, weight_decay=[0.0] * k, scale=[9.0] * k)  # ignored
    with_coeffs = _grouped(params, grads, projs, eas, easqs, extra, "right", junk, coeffs=coeffs)
    # the host lists' lr also drives nothing else: the moments and weights equal the plain call
    _assert_equal_states(_state(*with_coeffs[:3], with_coeffs[3]), _state(*plain[:3], plain[3]), "coeffs")


def test_one_entry_and_empty_list(device, monkeypatch):
    params, grads, projs, eas, easqs, extra = _bucket("int4", "left", torch.float32, "plain", device, SHAPES[4:5])
    hyper = _hyper(1)
    got = _grouped(params, grads, projs, eas, easqs, extra, "left", hyper)
    want = _single_loop("triton", params, grads, projs, eas, easqs, extra, "left", hyper)
    _assert_equal_states(got[:3], want[:3], "one entry", params)
    counter = _Counter(monkeypatch)
    with use_backend("triton"):
        ops.foreach_project_update_backproject_([], [], [], [], [], side="right", lr=0.1, step=1)
        assert ops.foreach_adam_update_([], [], []) == []
    assert counter.launches == []


def test_bad_entry_fails_before_any_write(device):
    """A float64 entry (the Triton kernels take 32/16-bit floats) last in the list: TypeError
    naming it, and no entry written."""
    params, grads, projs, eas, easqs, _ = _bucket("dense", "right", torch.float32, "plain", device, SHAPES[:3])
    params[2], grads[2], projs[2] = params[2].double(), grads[2].double(), projs[2].double()
    eas[2], easqs[2] = eas[2].double(), easqs[2].double()
    snap = [t.clone() for t in params + eas + easqs]
    n = len(params)
    with pytest.raises(TypeError, match=r"\(parameter 2\): param has dtype torch.float64"):
        kp.projection_foreach_project_update_backproject_triton(
            params, grads, projs, eas, easqs, "right", [0.1] * n, 0.9, 0.99, 1e-8, [1] * n, [0.0] * n, [1.0] * n)
    assert all(torch.equal(a, b) for a, b in zip(params + eas + easqs, snap))


# --------------------------------------------------------------------------- adam_foreach_update
def _adam_lists(moments, device, dtype=torch.float32, seed=0, shapes=((33, 17), (5, 70), (1, 9), (300, 7), (2, 1500))):
    gen = _gen(seed)
    rs = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    if moments == "q8":
        ms = [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8).to(device) for s in shapes]
        vs = [torch.randint(128, 256, s, generator=gen, dtype=torch.uint8).to(device) for s in shapes]
        st = [ops.moments8_zeros(s, device, block_size=BS) for s in shapes]
        extra = dict(m_absmax=[torch.rand(x["m_absmax"].shape, generator=gen).to(device) for x in st],
                     v_absmax=[(0.01 * torch.rand(x["v_absmax"].shape, generator=gen)).to(device) for x in st],
                     block_size=BS)
    else:
        mdt = torch.bfloat16 if moments == "sr16" else dtype
        ms = [(0.1 * torch.randn(s, generator=gen)).to(mdt).to(device) for s in shapes]
        vs = [(0.01 * torch.rand(s, generator=gen)).to(mdt).to(device) for s in shapes]
        extra = {"moment_seed": [5 + i for i in range(len(shapes))]} if moments == "sr16" else {}
    return rs, ms, vs, extra


def _adam_single(rs, ms, vs, extra):
    m, v, x = _clone(ms), _clone(vs), _clone_extra(extra)
    out = []
    with use_backend("triton"):
        for i in range(len(rs)):
            kw = {}
            if "m_absmax" in x:
                kw = dict(m_absmax=x["m_absmax"][i], v_absmax=x["v_absmax"][i], block_size=BS)
            if "moment_seed" in x:
                kw = dict(moment_seed=x["moment_seed"][i])
            out.append(ops.adam_update_(rs[i], m[i], v[i], **HYPER, **kw))
    return out, m, v, x


def _adam_grouped(rs, ms, vs, extra):
    m, v, x = _clone(ms), _clone(vs), _clone_extra(extra)
    with use_backend("triton"):
        out = ops.foreach_adam_update_(rs, m, v, **HYPER, **x)
    return out, m, v, x


@pytest.mark.parametrize("moments", ["plain", "sr16", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adam_grouped_equals_single_launches_and_reference(device, moments, dtype):
    rs, ms, vs, extra = _adam_lists(moments, device, dtype)
    got = _adam_grouped(rs, ms, vs, extra)
    want = _adam_single(rs, ms, vs, extra)
    for name, a, b in zip(("n", "exp_avg", "exp_avg_sq"), got[:3], want[:3]):
        for i, (s, t) in enumerate(zip(a, b)):
            assert torch.equal(s, t), (name, i)
    for key in ("m_absmax", "v_absmax"):
        for s, t in zip(got[3].get(key, ()), want[3].get(key, ())):
            assert torch.equal(s, t), key
    # the elementwise kernels compute exactly the reference's float32 values
    m, v, x = _clone(ms), _clone(vs), _clone_extra(extra)
    with use_backend("reference"):
        ref = ops.foreach_adam_update_(rs, m, v, **HYPER, **x)
    for i in range(len(rs)):
        # fma_slack: an interpreter that rounds tl.fma twice (Triton 3.6) is one float32 rounding
        # of the moments' product term off the fused reference (python_tests/_interpreter.py)
        torch.testing.assert_close(got[0][i], ref[i], rtol=fma_slack(1e-6), atol=0.0)
        if moments != "q8" and device.type == "cpu" and FMA_ROUNDS_TWICE:
            for what, a, b in (("exp_avg", got[1][i], m[i]), ("exp_avg_sq", got[2][i], v[i])):
                if a.dtype == torch.float32:
                    torch.testing.assert_close(a, b, rtol=fma_slack(0.0), atol=0.0)
                else:  # 16-bit moments: that float32 rounding may move the 16-bit rounding by one
                    assert_within_roundings(a, b, f"{what} {i}", k=1)
        elif moments != "q8" and device.type == "cpu":  # the reference's torch ops round as the kernels on CPU
            assert torch.equal(got[1][i], m[i]) and torch.equal(got[2][i], v[i]), i
        elif moments != "q8":
            assert_matches_backend(got[1][i], m[i], f"exp_avg {i}")
            assert_matches_backend(got[2][i], v[i], f"exp_avg_sq {i}")


def test_adam_non_contiguous_and_mixed(device, monkeypatch):
    """A transposed moment pair and a bf16 entry among float32 ones: two launches (one per dtype
    sub-list), the moments written back through their views, equal to the single launches."""
    rs, ms, vs, extra = _adam_lists("plain", device)
    ms[1] = ms[1].T.contiguous().T  # same shape, column-major
    vs[1] = vs[1].T.contiguous().T
    rs[3] = rs[3].to(torch.bfloat16)
    counter = _Counter(monkeypatch)
    got = _adam_grouped(rs, ms, vs, extra)
    assert counter.launches == [("launch", "adam")] * 2
    want = _adam_single(rs, ms, vs, extra)
    for a, b in zip(got[:3], want[:3]):
        for s, t in zip(a, b):
            assert torch.equal(s, t)
    assert not got[1][1].is_contiguous() and not torch.equal(got[1][1], ms[1])  # written through the view


# --------------------------------------------------------------------------- host tables
def test_device_table_reused_by_content(device):
    a = L.device_table([1, 2, 3], torch.int64, device)
    assert L.device_table([1, 2, 3], torch.int64, device) is a
    b = L.device_table([1, 2, 4], torch.int64, device)
    assert b is not a and b.tolist() == [1, 2, 4] and b.dtype == torch.int64 and b.device.type == device.type
    f = L.device_table([0.1, 2.0], torch.float32, device)
    assert f.dtype == torch.float32 and f.tolist() == [pytest.approx(0.1), 2.0]
    for i in range(L._DEVICE_TABLES_MAX + 5):  # bounded
        L.device_table([i, -1], torch.int64, device)
    assert len(L._DEVICE_TABLES) <= L._DEVICE_TABLES_MAX


def test_grouped_tile_and_even_k():
    """One tile per grouped launch: the table's choice for the largest problem; EVEN_K from the
    gcd of the problems' K (the compile check re-tiles by that key)."""
    probs = [(37, 5, 64), (300, 24, 128), (16, 16, 192)]
    t = L.grouped_tile("backproject_grouped", torch.device("cpu"), problems=probs, op_bytes=[4, 4])
    assert t == L.choose_config("backproject_grouped", None, M=300, N=24, K=128, op_bytes=[4, 4])
    with L.capture() as caps:
        tile90 = L.grouped_tile("project_grouped", torch.device("cpu"), problems=probs, op_bytes=[2, 2])
        L.launch_grouped("project_grouped", kg._projection_project_adam_grouped_kernel, (1,), (), {},
                         device=torch.device("cpu"), tile=tile90, problems=probs, op_bytes=[2, 2])
    (c,) = caps
    assert c.key["K"] == 64 and c.key["M"] == 300 and c.tile_kernel == "project_grouped"
    assert c.meta["EVEN_K"] == (64 % tile90.bk == 0)
    for arch in (80, 90):
        tile = c.tile_for(arch)
        assert c.with_tile(tile)["EVEN_K"] == all(k % tile.bk == 0 for _, _, k in probs)
    with pytest.raises(ValueError, match="problems must not be empty"):
        L.grouped_tile("project_grouped", torch.device("cpu"), problems=[], op_bytes=[2, 2])


# --------------------------------------------------------------------------- aligned / unaligned sub-lists
# Entries whose addresses are 16-byte aligned and whose dimensions and non-unit strides are
# multiples of 16 go to a sub-list launched with ALIGNED (their table in the divided-by-16 form,
# so the compiled code vectorizes as the single kernels'); the others to their own sub-list.
ALIGNED_SHAPES = [(32, 48, 16), (64, 32, 16), (33, 17, 3), (32, 48, 16), (48, 32, 16)]


def _misaligned(t):
    """A copy of ``t`` at an address 4 bytes (float32) / 2 bytes (bf16) past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


class _GroupedLaunches:
    """Records each grouped projection launch: ``(kernel name, ALIGNED, list indices)``."""

    def __init__(self, monkeypatch):
        self.launches = []
        real = L.launch_grouped

        def wrapped(kernel_name, kernel, grid, args, meta, **kw):
            tab = args[0].cpu().view(-1, 32)
            self.launches.append((kernel_name, meta["ALIGNED"], tab[:, 31].tolist()))
            return real(kernel_name, kernel, grid, args, meta, **kw)

        monkeypatch.setattr(L, "launch_grouped", wrapped)


@pytest.mark.parametrize("moments", ["plain", "sr16", "q8"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_aligned_and_unaligned_entries_equal_single_launches(device, monkeypatch, kind, side, moments):
    """Aligned entries (0, 1), an odd shape (2), an aligned shape whose gradient sits at a misaligned address (3) and
    a transposed aligned entry (4, another unit-stride pattern): three sub-lists, the aligned ones
    launched with ALIGNED; every entry equal to the single launches, bit for bit."""
    params, grads, projs, eas, easqs, extra = _bucket(kind, side, torch.float32, moments, device,
                                                      shapes=ALIGNED_SHAPES, transposed=(4,))
    grads[3] = _misaligned(grads[3])  # (the parameters are cloned for each call)
    hyper = _hyper(len(params))
    rec = _GroupedLaunches(monkeypatch)
    got = _grouped(params, grads, projs, eas, easqs, extra, side, hyper)
    assert [(a, idx) for name, a, idx in rec.launches if name == "backproject_grouped"] == \
        [(True, [0, 1]), (False, [2, 3]), (True, [4])]
    assert [a for name, a, _ in rec.launches if name != "backproject_grouped"] == [True, False, True]
    want = _single_loop("triton", params, grads, projs, eas, easqs, extra, side, hyper)
    _assert_equal_states(_state(*got[:3], got[3]), _state(*want[:3], want[3]), f"{kind} {side} {moments}", params)
    for i in range(len(params)):
        assert not torch.equal(got[0][i], params[i]) and not torch.equal(got[1][i], eas[i]), i


def test_grouped_alignment_partition_on_the_host():
    """:func:`grouped_alignment` per entry: the unit-stride pattern of an aligned entry, ``None``
    for a misaligned address (parameter, gradient, projector, moments, INT4 scale, 8-bit absmax),
    a dimension or a non-unit stride that is not a multiple of 16, or an 8-bit quantization step
    that is not."""
    meta = torch.device("meta")

    def E(*shape, dtype=torch.float32, offset=0):
        n = math.prod(shape)
        return torch.empty(n + offset, dtype=dtype, device=meta)[offset:].view(shape)

    def entry(m=32, n=48, r=16, side="right", off=None, q8_block=0, proj_kind="dense", grad=None):
        off = off or {}
        param = E(m, n, offset=off.get("param", 0))
        g = grad if grad is not None else E(m, n, offset=off.get("grad", 0))
        ls = (m, r) if side == "right" else (r, n)
        if proj_kind == "int4":
            rows, cols = (r, n) if side == "right" else (m, r)
            ng = -(-rows * cols // 16)
            desc = (E(-(-rows * cols // 2), dtype=torch.uint8, offset=off.get("proj", 0)),
                    E(ng, offset=off.get("scale", 0)), E(ng), (rows, cols), 16)
        else:
            desc = E(r, n, offset=off.get("proj", 0)) if side == "right" else E(m, r, offset=off.get("proj", 0))
        if q8_block:
            ea, eas = E(*ls, dtype=torch.uint8, offset=off.get("m", 0)), E(*ls, dtype=torch.uint8)
            ab = (ls[0], -(-ls[1] // q8_block))
            fmt = kp.moment_format("t", ea, eas, E(*ab, offset=off.get("absmax", 0)), E(*ab), q8_block)
        else:
            ea, eas, fmt = E(*ls, offset=off.get("m", 0)), E(*ls), kp.PLAIN
        return kg.grouped_alignment(param, g, kg._proj_launch_args(desc, side), ea, eas, fmt, side)

    unit = entry()
    assert unit == (False, True, False, True, False, True, False, True, False, True)  # row-major everywhere
    assert entry(side="left") is not None and entry(proj_kind="int4") is not None
    assert entry(q8_block=16) is not None and entry(q8_block=256) is not None  # qstep min(256, 16) = 16
    transposed = entry(grad=E(48, 32).T)
    assert transposed is not None and transposed[:2] == (True, False)
    for role in ("param", "grad", "proj", "m"):
        assert entry(off={role: 1}) is None, role
        assert entry(off={role: 4}) is not None, role  # 16 bytes further: aligned again
    assert entry(proj_kind="int4", off={"scale": 1}) is None
    assert entry(q8_block=16, off={"absmax": 1}) is None
    assert entry(m=33) is None and entry(n=40) is None and entry(r=8) is None
    assert entry(side="left", q8_block=8) is None  # 8-column quantization step
    assert entry(grad=E(32, 64)[:, :48]) is not None  # row stride 64: a multiple of 16
    assert entry(grad=E(32, 56)[:, :48]) is None  # row stride 56


def test_adam_mixed_aligned_and_unaligned_entries(device, monkeypatch):
    """``adam_foreach_update``: aligned entries (numel a multiple of 16, 16-byte addresses) in one
    ALIGNED launch, the others (odd numel, a misaligned input) in another; bitwise the single
    launches."""
    for moments in ("plain", "sr16", "q8"):
        rs, ms, vs, extra = _adam_lists(moments, device, seed=3, shapes=((16, 32), (5, 7), (8, 16), (3, 48)))
        rs[2] = _misaligned(rs[2])  # (the moments are cloned for each call)
        seen = []
        real = L.launch

        def wrapped(family, kernel, grid, args, meta, _seen=seen, _real=real, **kw):
            _seen.append((meta["ALIGNED"], args[0].cpu().view(-1, 16)[:, 0].tolist()))
            return _real(family, kernel, grid, args, meta, **kw)

        monkeypatch.setattr(L, "launch", wrapped)
        got = _adam_grouped(rs, ms, vs, extra)
        monkeypatch.setattr(L, "launch", real)
        assert [a for a, _ in seen] == [True, False], moments
        # entries 0 and 3 aligned; the aligned table holds each r's distance from the launch's r / 16
        assert [rs[0].data_ptr() + 16 * q for q in seen[0][1]] == [rs[i].data_ptr() for i in (0, 3)], moments
        want = _adam_single(rs, ms, vs, extra)
        for name, a, b in zip(("n", "exp_avg", "exp_avg_sq"), got[:3], want[:3]):
            for i, (s, t) in enumerate(zip(a, b)):
                assert torch.equal(s, t), (moments, name, i)
        for key in ("m_absmax", "v_absmax"):
            for s, t in zip(got[3].get(key, ()), want[3].get(key, ())):
                assert torch.equal(s, t), (moments, key)


def test_adam_alignment_on_the_host():
    meta = torch.device("meta")

    def E(*shape, dtype=torch.float32, offset=0):
        return torch.empty(math.prod(shape) + offset, dtype=dtype, device=meta)[offset:].view(shape)

    assert ka.adam_alignment(E(16, 32), E(16, 32), E(16, 32), E(16, 32), kp.PLAIN)
    assert not ka.adam_alignment(E(5, 7), E(5, 7), E(5, 7), E(5, 7), kp.PLAIN)  # numel 35
    assert not ka.adam_alignment(E(16, 32), E(16, 32, offset=2), E(16, 32), E(16, 32), kp.PLAIN)
    assert ka.adam_alignment(E(16, 32), E(16, 32, offset=4), E(16, 32), E(16, 32), kp.PLAIN)
    u8 = torch.uint8
    for block, cols, ok in ((16, 32, True), (256, 48, True), (8, 32, False), (16, 24, False)):
        ab = (4, -(-cols // block))
        fmt = kp.moment_format("t", E(4, cols, dtype=u8), E(4, cols, dtype=u8), E(*ab), E(*ab), block)
        assert ka.adam_alignment(E(4, cols), E(4, cols, dtype=u8), E(4, cols, dtype=u8), E(4, cols), fmt) == ok
    fmt = kp.moment_format("t", E(4, 32, dtype=u8), E(4, 32, dtype=u8), E(4, 2, offset=1), E(4, 2), 16)
    assert not ka.adam_alignment(E(4, 32), E(4, 32, dtype=u8), E(4, 32, dtype=u8), E(4, 32), fmt)
