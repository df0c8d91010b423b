"""The quant family on every backend: INT4 pack/unpack, INT8 quantize/dequantize, the
stochastic-rounding update, and the projection ops with a packed INT4 projector."""
import math

import numpy as np
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import Int4Projector, use_backend
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.reference import quant as qref

from .._numerics import assert_change_close, assert_close_f32, assert_flash_rule
from ..conftest import TOL, rel_err, require_backend


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("quant_int4_pack", name)
    return name


@pytest.fixture(params=reg.BACKENDS)
def dev_backend(request, device):
    """Each backend that can run on the test device (CPU, or CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda)."""
    name = request.param
    require_backend("quant_int4_pack", name, device)
    return name


def per_element(stat, numel, group_size):
    return stat.double().repeat_interleave(group_size)[:numel]


def assert_levels_equal(a, b, device="cpu"):
    """Quantized levels of two backends: identical (same float32 ops without FMA contraction,
    same hash), on the CPU and on the GPU alike."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"{(a != b).sum().item()} levels differ"


# --------------------------------------------------------------------------- INT4 pack / unpack
ROUNDTRIP_CASES = {
    "odd_1": (torch.randn(1), 256),
    "odd_7": (torch.randn(7), 4),
    "odd_257": (torch.randn(257), 256),
    "odd_2d_123x77": (torch.randn(123, 77), 256),
    "short_last_group": (torch.randn(33, 31), 64),
    "all_positive": (torch.rand(9, 61) + 3.0, 256),
    "all_negative": (-torch.rand(9, 61) - 3.0, 128),
    "constant": (torch.full((5, 5), 0.7), 8),
    "transposed": (torch.randn(40, 23).T, 32),
}


@pytest.mark.parametrize("case", sorted(ROUNDTRIP_CASES))
def test_int4_roundtrip_within_half_step(backend, case):
    x, gs = ROUNDTRIP_CASES[case]
    with use_backend(backend):
        packed, scale, mn = ops.int4_pack(x, group_size=gs)
        y = ops.int4_unpack(packed, scale, mn, x.shape, torch.float64, group_size=gs)
    n = x.numel()
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 2),)
    assert scale.shape == mn.shape == (math.ceil(n / gs),) and scale.dtype == mn.dtype == torch.float32
    step = per_element(scale, n, gs)
    err = (y.reshape(-1) - x.reshape(-1).double()).abs()
    # half a step, plus float32 rounding of min + s*q
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6 * x.abs().max().item()).all(), (err / step).max()
    if case in ("all_positive", "all_negative"):
        # the groups are one-signed: no clipping to zero (the reference package's bug)
        assert (y.sign() == x.sign()).all()


def test_int4_nibble_layout_and_levels(backend):
    # min 0, max 15 -> s = 1, q = x: even index in the low nibble, odd numel pads a zero nibble.
    x = torch.tensor([0.0, 15.0, 1.0, 14.0, 2.0])
    with use_backend(backend):
        packed, scale, mn = ops.int4_pack(x, group_size=256)
    assert packed.tolist() == [0xF0, 0xE1, 0x02]
    assert scale.tolist() == [1.0] and mn.tolist() == [0.0]
    # rounding: ties go up, s = 1 again
    x = torch.tensor([0.0, 15.0, 2.5, 7.49, 7.5])
    with use_backend(backend):
        packed, _, _ = ops.int4_pack(x, group_size=256)
    assert qref.unpack_nibbles(packed, 5).tolist() == [0, 15, 3, 7, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_int4_backend_vs_reference(dev_backend, device, dtype):
    x = (torch.randn(64, 45) * 3).to(device, dtype)
    with use_backend("reference"):
        r = ops.int4_pack(x, group_size=50)
        ry = ops.int4_unpack(*r, x.shape, dtype, group_size=50)
    with use_backend(dev_backend):
        o = ops.int4_pack(x, group_size=50)
        oy = ops.int4_unpack(*r, x.shape, dtype, group_size=50)
    assert_levels_equal(o[0], r[0])
    torch.testing.assert_close(o[1], r[1], rtol=0, atol=0)
    torch.testing.assert_close(o[2], r[2], rtol=0, atol=0)
    torch.testing.assert_close(oy, ry, rtol=0, atol=0)


def test_int4_projector_memory():
    p = torch.linalg.qr(torch.randn(1024, 128))[0].T.contiguous()  # 128 x 1024
    proj = Int4Projector.quantize(p)
    bf16_bytes = p.numel() * 2
    assert proj.packed.numel() == p.numel() // 2
    assert proj.nbytes() <= 0.27 * bf16_bytes  # scales and minima included


# --------------------------------------------------------------------------- INT8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_int8_roundtrip_and_vs_reference(dev_backend, device, dtype):
    w = (torch.randn(77, 31) + 0.3).to(device, dtype)
    w[:3] = w[:3].abs() + 1  # a one-signed group
    gs = 96
    with use_backend("reference"):
        r = ops.int8_quantize(w, group_size=gs)
    with use_backend(dev_backend):
        q, s, mn = ops.int8_quantize(w, group_size=gs)
        y = ops.int8_dequantize(q, s, mn, group_size=gs, dtype=torch.float64)
        y16 = ops.int8_dequantize(q, s, mn, group_size=gs, dtype=torch.bfloat16)
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert_levels_equal(q, r[0])
    torch.testing.assert_close(s, r[1], rtol=0, atol=0)
    torch.testing.assert_close(mn, r[2], rtol=0, atol=0)
    step = per_element(s, w.numel(), gs).view(w.shape)
    err = (y - w.double()).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6).all()
    assert y16.dtype == torch.bfloat16
    # bf16 output: one rounding of the float64 value (min + s q is exact in float32 up to one rounding)
    torch.testing.assert_close(y16.double(), y, rtol=2 ** -8, atol=1e-6)


def _sr_setup(fracs, group_size=256, per_group=None, s0=0.01, seed=0):
    """A zero INT8 weight and an update whose values sit at level + frac in known groups.

    Each group holds its min (0) and max (255 * s0), so the fresh stats are (0, s0)
    up to rounding; the other elements are s0 * (k + frac_g) with random k in [0, 254).
    """
    gen = torch.Generator().manual_seed(seed)
    per_group = per_group or group_size
    ng = len(fracs)
    k = torch.randint(0, 254, (ng, per_group), generator=gen).double()
    v = k + torch.tensor(fracs, dtype=torch.float64)[:, None]
    v[:, 0] = 0.0
    v[:, 1] = 255.0
    target = (v * s0).float().reshape(-1)
    q = torch.zeros(target.numel(), dtype=torch.uint8)
    scale = torch.ones(ng, dtype=torch.float32)
    mn = torch.zeros(ng, dtype=torch.float32)
    return q, scale, mn, target, k


def test_int8_stochastic_rounding_unbiased(backend):
    """Each group's values sit at a fixed fraction f above a level: SR must round up with
    probability f. With n = 1022 draws per group the std of the up-fraction is at most
    sqrt(0.25 / 1022) = 0.0156; we allow 5 std = 0.079 (fixed seed, so the test is
    deterministic). Round-to-nearest or floor would miss f by up to 0.5."""
    fracs = [0.1, 0.3, 0.5, 0.7, 0.9, 0.05]
    q, scale, mn, target, k = _sr_setup(fracs, group_size=1024)
    with use_backend(backend):
        ops.int8_update_sr_(q, scale, mn, target, decay=1.0, alpha=1.0, seed=1234, group_size=1024)
    x = (mn.double().repeat_interleave(1024) + scale.double().repeat_interleave(1024) * q.double()).view(6, 1024)
    t = target.double().view(6, 1024)
    assert torch.allclose(mn.double(), torch.zeros(6, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(scale.double(), torch.full((6,), 0.01, dtype=torch.float64), rtol=1e-5)
    # never more than one step away
    assert ((x - t).abs() <= scale.double()[:, None] * (1 + 1e-4)).all()
    up = (q.view(6, 1024)[:, 2:].double() - k[:, 2:]).mean(dim=1)  # fraction rounded up
    for f, u in zip(fracs, up.tolist()):
        assert abs(u - f) < 0.079, (f, u)
    # and the mean error over everything is ~0 (unbiased): 6132 draws, std <= 0.0064 steps
    assert abs(((x - t)[:, 2:] / 0.01).mean().item()) < 0.032


def test_int8_sr_deterministic_per_seed_and_matches_reference(dev_backend, device):
    backend = dev_backend
    w = torch.randn(50, 37, device=device)
    with use_backend("reference"):
        q0, s0, m0 = ops.int8_quantize(w, group_size=100)
    upd = torch.randn(37, 50, device=device).T  # non-contiguous update

    def run(b, seed):
        q, s, mn = q0.clone(), s0.clone(), m0.clone()
        with use_backend(b):
            ops.int8_update_sr_(q, s, mn, upd, decay=0.99, alpha=-0.05, seed=seed, group_size=100)
        return q, s, mn

    a, again, other, ref = run(backend, 7), run(backend, 7), run(backend, 8), run("reference", 7)
    assert all(torch.equal(x, y) for x, y in zip(a, again)), "not deterministic for one seed"
    assert not torch.equal(a[0], other[0]), "another seed drew the same numbers"
    assert_levels_equal(a[0], ref[0])
    torch.testing.assert_close(a[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], ref[2], rtol=0, atol=0)


def test_int8_sr_fresh_stats_let_the_range_grow(backend):
    """An update past the old max is not clipped: the group stats are recomputed."""
    w = torch.rand(4, 64)  # range [0, 1)
    with use_backend(backend):
        q, s, mn = ops.int8_quantize(w, group_size=64)
        upd = torch.zeros_like(w)
        upd[1, 5] = 10.0
        target = ops.int8_dequantize(q, s, mn, group_size=64, dtype=torch.float64) + upd.double()
        ops.int8_update_sr_(q, s, mn, upd, seed=3, group_size=64)
        x = ops.int8_dequantize(q, s, mn, group_size=64, dtype=torch.float64)
    step = per_element(s, 256, 64).view(4, 64)
    assert ((x - target).abs() <= step * (1 + 1e-4)).all()
    assert abs(x[1, 5].item() - target[1, 5].item()) < 1e-5  # the new max is exact


def test_uniform_hash_is_uniform():
    u = qref.uniform_from_seed(42, torch.arange(200_000))
    assert u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov against U[0, 1): critical value at alpha = 1e-3 is 1.95 / sqrt(n)
    s = np.sort(u.double().numpy())
    n = s.size
    d = max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))
    assert d < 1.95 / math.sqrt(n), d
    # neighbouring indices are not correlated
    x = u.double() - 0.5
    assert abs((x[1:] * x[:-1]).mean().item() / x.var().item()) < 0.01
    # seeds give different streams
    assert not torch.equal(u[:100], qref.uniform_from_seed(43, torch.arange(100)))
    assert qref.mix32_int(12345) == int(qref.mix32(torch.tensor([12345]))[0])


# --------------------------------------------------------------------------- INT4 projector in the projection family
def make_int4_problem(m, n, rank, side, dtype, group_size=64, transposed_grad=False, device="cpu"):
    grad = torch.randn(n, m, dtype=dtype).T if transposed_grad else torch.randn(m, n, dtype=dtype)
    if side == "right":
        dense = torch.linalg.qr(torch.randn(n, rank, dtype=torch.float64))[0].T.float()
        lshape = (m, rank)
    else:
        dense = torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64))[0].float()
        lshape = (rank, n)
    proj = Int4Projector.quantize(dense.to(device), group_size)
    grad = grad.T.contiguous().to(device).T if transposed_grad else grad.to(device)
    return grad, proj, (0.1 * torch.randn(lshape)).to(device), (0.1 * torch.rand(lshape)).to(device)


# group sizes: powers of two (a shift in the Triton tile loader) and not (a division)
INT4_SHAPES = [(123, 77, "right", 64), (64, 300, "left", 256), (33, 33, "right", 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,side,gs", INT4_SHAPES)
def test_int4_projection_vs_dequantize_then_dense(dev_backend, device, dtype, m, n, side, gs):
    """The fused INT4 ops (the INT4 tile loader) equal the dense reference on the dequantized
    projector: float32 moments and N elementwise at ~1e-5, the weight by its change (float32)
    or by flash-attention's rule against float64 (bf16)."""
    backend = dev_backend
    for rank in sorted({1, 17, min(m, n)}):
        grad, proj, ea, eas = make_int4_problem(m, n, rank, side, dtype, group_size=gs, transposed_grad=(rank == 17),
                                                device=device)
        dense = proj.dequantize(torch.float32)
        e1, e2 = ea.clone(), eas.clone()
        with use_backend("reference"):
            rn = ops.project_adam_(grad, dense, e1, e2, side=side, beta1=0.9, beta2=0.95, eps=1e-6)
        f1, f2 = ea.clone(), eas.clone()
        with use_backend(backend):
            on = ops.project_adam_(grad, proj, f1, f2, side=side, beta1=0.9, beta2=0.95, eps=1e-6)
        assert_close_f32(f1, e1, f"exp_avg, rank {rank}")
        assert_close_f32(f2, e2, f"exp_avg_sq, rank {rank}")
        assert_close_f32(on, rn, f"N, rank {rank}", rtol=4e-5)

        w = torch.randn(m, n, dtype=dtype, device=device)

        def check_w(w_ours, w_ref, fn_truth, plain, what):
            if dtype == torch.float32:
                assert_change_close(w_ours, w, w_ref, what, rtol=4e-5)
            else:
                assert_flash_rule(w_ours, fn_truth(), plain, what)

        w1, w2 = w.clone(), w.clone()
        with use_backend("reference"):
            ops.backproject_apply_(w1, rn, dense, side=side, alpha=-0.3, decay=0.99)
        with use_backend(backend):
            ops.backproject_apply_(w2, rn, proj, side=side, alpha=-0.3, decay=0.99)

        def truth_apply():
            d, r64 = dense.double(), rn.double()
            return 0.99 * w.double() - 0.3 * (r64 @ d if side == "right" else d @ r64)

        rd, dd = rn.to(dtype), dense.to(dtype)
        check_w(w2, w1, truth_apply, 0.99 * w - 0.3 * (rd @ dd if side == "right" else dd @ rd),
                f"backproject_apply_ W, rank {rank}")

        w1, w2 = w.clone(), w.clone()
        e1, e2, f1, f2 = ea.clone(), eas.clone(), ea.clone(), eas.clone()
        kw = dict(side=side, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=4, weight_decay=0.1, scale=0.25)
        with use_backend("reference"):
            ops.project_update_backproject_(w1, grad, dense, e1, e2, **kw)
        with use_backend(backend):
            ops.project_update_backproject_(w2, grad, proj, f1, f2, **kw)
        assert_close_f32(f1, e1, f"fused exp_avg, rank {rank}")

        def truth_fused():
            w64, a, b = w.double(), ea.double(), eas.double()
            with use_backend("reference"):
                ops.project_update_backproject_(w64, grad.double(), dense.double(), a, b, **kw)
            return w64

        step_size = 0.01 * math.sqrt(1 - 0.999**4) / (1 - 0.9**4)
        nd = e1.to(dtype) / (e2.sqrt().to(dtype) + 1e-8)
        plain = w * (1 - 0.01 * 0.1) - (step_size * 0.25) * (nd @ dd if side == "right" else dd @ nd)
        check_w(w2, w1, truth_fused, plain, f"fused W, rank {rank}")


def test_int4_reference_float64():
    """Reference on float64 data: INT4 ops = unpack + the float64 dense formula."""
    grad, proj, ea, eas = make_int4_problem(40, 30, 5, "right", torch.float64)
    ea, eas = ea.double(), eas.double()
    P = proj.dequantize(torch.float64)
    R = grad @ P.T
    M = 0.9 * ea + 0.1 * R
    V = 0.99 * eas + 0.01 * R * R
    with use_backend("reference"):
        out = ops.project_adam_(grad, proj, ea, eas, side="right", beta1=0.9, beta2=0.99, eps=1e-6)
    torch.testing.assert_close(out, M / (V.sqrt() + 1e-6), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- opcheck
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_cases():
    x = torch.randn(13, 21)
    with use_backend("reference"):
        packed, s4, m4 = ops.int4_pack(x, 64)
        q, s8, m8 = ops.int8_quantize(x, 50)
    yield "quant_int4_pack", (x, 64)
    yield "quant_int4_unpack", (packed, s4, m4, [13, 21], torch.bfloat16, 64)
    yield "quant_int8_quantize", (x, 50)
    yield "quant_int8_dequantize", (q, s8, m8, 50, torch.float32)
    yield "quant_int8_update_sr", (q.clone(), s8.clone(), m8.clone(), torch.randn(13, 21), 0.99, -0.1, 5, 50)
    g, proj, ea, eas = make_int4_problem(20, 13, 4, "right", torch.float32, group_size=16)
    # The projection family's ops with the packed INT4 projector kind
    # (proj = packed, indices = None, q_scale, q_min, rank, group_size).
    pa = (None, proj.scale, proj.minimum, 4, 16)
    yield "projection_project", (g, proj.packed, "right", *pa)
    yield "projection_project_adam", (g, proj.packed, ea, eas, "right", 0.9, 0.999, 1e-8, *pa)
    yield "projection_backproject_apply", (torch.randn(20, 13), ea, proj.packed, "right", -0.5, 0.9, *pa)
    gl, projl, eal, easl = make_int4_problem(13, 20, 4, "left", torch.float32, group_size=16)
    pl = (None, projl.scale, projl.minimum, 4, 16)
    yield "projection_project_update_backproject", (
        torch.randn(13, 20), gl, projl.packed, eal, easl, "left", 0.01, 0.9, 0.999, 1e-8, 3, 0.1, 0.25, *pl)


_CASE_NAMES = [c[0] for c in _opcheck_cases()]


@pytest.mark.parametrize("case", range(len(_CASE_NAMES)), ids=_CASE_NAMES)
def test_opcheck(backend, case):
    name, args = list(_opcheck_cases())[case]
    with use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.lowrank_kernels, name).default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("case", range(len(_CASE_NAMES)), ids=_CASE_NAMES)
def test_opcheck_cpp_op_directly(case):
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops._lowrank_kernels, name + "_cpu").default, args, test_utils=OPCHECK_TESTS)


# --------------------------------------------------------------------------- bad input
def test_pack_unpack_bad_input(backend):
    x = torch.randn(10, 7)
    with use_backend(backend):
        with pytest.raises(ValueError, match="group_size must be a positive even int"):
            ops.int4_pack(x, group_size=5)
        with pytest.raises(TypeError, match="x must have a floating dtype"):
            ops.int4_pack(x.long(), group_size=4)
        with pytest.raises(ValueError, match="x must have at least one element"):
            ops.int4_pack(torch.empty(0), group_size=4)
        packed, s, mn = ops.int4_pack(x, group_size=16)
        with pytest.raises(ValueError, match=r"packed must have shape \(40,\)"):
            ops.int4_unpack(packed, s, mn, (10, 8), group_size=16)
        with pytest.raises(ValueError, match=r"scale must have shape \(35,\)"):
            ops.int4_unpack(packed, s, mn, x.shape, group_size=2)
        with pytest.raises(TypeError, match="packed must be uint8"):
            ops.int4_unpack(packed.to(torch.int8), s, mn, x.shape, group_size=16)
        with pytest.raises(TypeError, match="minimum must be float32"):
            ops.int4_unpack(packed, s, mn.double(), x.shape, group_size=16)
        with pytest.raises(TypeError, match="dtype must be a floating dtype"):
            ops.int4_unpack(packed, s, mn, x.shape, torch.int32, group_size=16)


def test_int8_update_sr_bad_input_changes_nothing(backend):
    w = torch.randn(12, 9)
    with use_backend("reference"):
        q, s, mn = ops.int8_quantize(w, group_size=32)
    before = (q.clone(), s.clone(), mn.clone())
    cases = [
        (dict(update=torch.randn(9, 12)), ValueError, r"update must have shape \(12, 9\)"),
        (dict(update=torch.ones(12, 9, dtype=torch.int32)), TypeError, "update must have a floating dtype"),
        (dict(decay=float("nan")), ValueError, "decay must be finite"),
        (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
        (dict(group_size=0), ValueError, "group_size must be a positive int"),
        (dict(group_size=16), ValueError, r"scale must have shape \(7,\)"),
        (dict(q=q.T), ValueError, "q must be contiguous"),
        (dict(q=q.float()), TypeError, "q must be uint8"),
        (dict(scale=s.half()), TypeError, "scale must be float32"),
        (dict(update=torch.randn(12, 9, device="meta")), ValueError, "all tensors must be on one device"),
    ]
    for override, exc, msg in cases:
        kw = dict(q=q, scale=s, minimum=mn, update=torch.randn(12, 9), decay=1.0, alpha=1.0, seed=1, group_size=32)
        kw.update(override)
        args = [kw.pop(k) for k in ("q", "scale", "minimum", "update")]
        with use_backend(backend), pytest.raises(exc, match=msg):
            ops.int8_update_sr_(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip((q, s, mn), before))


def test_int4_projection_bad_input_changes_nothing(backend):
    grad, proj, ea, eas = make_int4_problem(30, 20, 4, "right", torch.float32, group_size=16)
    ea0, eas0 = ea.clone(), eas.clone()
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"side='left' needs proj of shape \(m, rank\)"):
            ops.project_adam_(grad, proj, ea, eas, side="left")
        with pytest.raises(ValueError, match="exp_avg must have shape"):
            ops.project_adam_(grad, proj, ea[:, :3], eas, side="right")
        bad = proj._replace(packed=proj.packed[:-1].clone())
        with pytest.raises(ValueError, match="packed must have shape"):
            ops.project_adam_(grad, bad, ea, eas, side="right")
        bad = proj._replace(scale=proj.scale.double())
        with pytest.raises(TypeError, match="scale must be float32"):
            ops.project_adam_(grad, bad, ea, eas, side="right")
        with pytest.raises(ValueError, match="beta1 must be in"):
            ops.project_adam_(grad, proj, ea, eas, side="right", beta1=1.5)
        w = torch.randn(30, 20)
        w0 = w.clone()
        with pytest.raises(ValueError, match="update must have shape"):
            ops.backproject_apply_(w, torch.randn(4, 30), proj, side="right", alpha=1.0)
        with pytest.raises(ValueError, match="step must be >= 1"):
            ops.project_update_backproject_(w, grad, proj, ea, eas, side="right", lr=0.1, step=0)
    assert torch.equal(ea, ea0) and torch.equal(eas, eas0) and torch.equal(w, w0)
