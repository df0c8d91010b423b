"""8-bit and 16-bit (stochastic-rounding) moments in the op layer.

The reference (the specification) against independent math: the 8-bit step is
dequantize -> float32 Adam -> N -> requantize, the bf16 store is the hashed stochastic
rounding of reference/moments.py. Then every backend that implements the new forms
against the reference, argument errors, and torch.compile of the new schemas.
"""
import math

import numpy as np
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import moments as Q
from lowrank_kernels.reference.quant import MASK32, mix32_int, seed_keys

# A direct call of a C++ kernel's op with bad input fails a bare TORCH_CHECK (the op layer's
# validators, which run before every routed call, have the messages).
BARE_CHECK = "to be true, but got false"

# --------------------------------------------------------------------------- bf16 stochastic rounding (reference)
def _sr_scalar(x: float, i: int, seed: int) -> int:
    """The spec's SR of one float32 value, in plain Python ints: the bf16 bits."""
    b = int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item()) & MASK32
    k1, k2 = seed_keys(seed)
    h = mix32_int(mix32_int((i & MASK32) ^ k1) ^ k2)
    return ((b + (h >> 16)) >> 16) & 0xFFFF


def _bits(t_bf16: torch.Tensor) -> torch.Tensor:
    return t_bf16.view(torch.int16).to(torch.int64) & 0xFFFF


def test_bf16_sr_matches_scalar_definition():
    x = torch.randn(257) * torch.logspace(-6, 3, 257)
    out = Q.bf16_round_sr_ref(x, seed=1234, offset=17)
    want = torch.tensor([_sr_scalar(float(x[i]), i + 17, 1234) for i in range(x.numel())])
    assert torch.equal(_bits(out), want)


def test_bf16_sr_exact_on_representable_values_and_nonfinite():
    x = (torch.randn(1000) * 100).to(torch.bfloat16).to(torch.float32)  # representable in bf16
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    x[4] = float("nan")
    for seed in (0, 7, 2**40 + 3):
        out = Q.bf16_round_sr_ref(x, seed=seed)
        assert torch.equal(out[5:].float(), x[5:])
        assert torch.equal(_bits(out[:4]), _bits(x[:4].to(torch.bfloat16)))  # signs of zeros, infs kept
        assert torch.isnan(out[4])


def test_bf16_sr_unbiased_and_between_neighbours():
    # one value, many counters: the mean of the rounded values converges to it
    x = torch.full((200_000,), 1.0 + 2.0**-9 + 2.0**-12)  # between the bf16 neighbours 1.0 and 1 + 2^-7
    out = Q.bf16_round_sr_ref(x, seed=99).float()
    lo, hi = 1.0, 1.0 + 2.0**-7
    assert set(out.unique().tolist()) <= {lo, hi}
    p_up = (x[0].item() - lo) / (hi - lo)
    frac = (out == hi).double().mean().item()
    assert abs(frac - p_up) < 5 * math.sqrt(p_up * (1 - p_up) / x.numel())
    # random values: mean error far below round-to-nearest's bias scale, and within one bf16 ulp
    y = torch.rand(100_000) * 3 + 1
    sr = Q.bf16_round_sr_ref(y, seed=5).float()
    ulp = 2.0 ** (torch.floor(torch.log2(y)) - 7)
    assert torch.all((sr - y).abs() < ulp)
    assert abs((sr - y).div(ulp).mean().item()) < 0.01
    # another seed gives other draws; same seed, same draws
    assert not torch.equal(Q.bf16_round_sr_ref(y, seed=6), Q.bf16_round_sr_ref(y, seed=5))
    assert torch.equal(Q.bf16_round_sr_ref(y, seed=5), Q.bf16_round_sr_ref(y, seed=5))


def test_bf16_sr_negative_symmetric():
    x = torch.randn(5000)
    assert torch.equal(_bits(Q.bf16_round_sr_ref(-x, seed=3)) ^ 0x8000, _bits(Q.bf16_round_sr_ref(x, seed=3)))


def test_bf16_sr_keeps_second_moment_decaying():
    """The reason for SR: v <- beta2 v with beta2 = 0.999 stalls in bf16 with round-to-nearest."""
    v_rn = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    v_sr = v_rn.clone()
    for step in range(200):
        v_rn = (v_rn.float() * 0.999).to(torch.bfloat16)
        v_sr = Q.bf16_round_sr_ref(v_sr.float() * 0.999, seed=step)
    assert v_rn.float().mean() == 1.0  # stuck
    assert abs(v_sr.float().mean().item() - 0.999**200) < 0.01


# --------------------------------------------------------------------------- 8-bit: reference semantics
def _state8(shape, block_size, seed=0, scale=0.1):
    """A non-trivial 8-bit state: quantized random moments."""
    g = torch.Generator().manual_seed(seed)
    m = scale * torch.randn(shape, generator=g)
    v = (scale * torch.randn(shape, generator=g)) ** 2
    cm, am = Q.moments_quantize_ref(m, signed=True, block_size=block_size)
    cv, av = Q.moments_quantize_ref(v, signed=False, block_size=block_size)
    return cm, cv, am, av


def _adam8_by_hand(r, cm, cv, am, av, beta1, beta2, eps, block_size):
    m = Q.moments_dequantize_ref(cm, am, signed=True, block_size=block_size)
    v = Q.moments_dequantize_ref(cv, av, signed=False, block_size=block_size)
    r = r.float()
    m = beta1 * m + (1 - beta1) * r
    v = beta2 * v + (1 - beta2) * r * r
    n = m / (v.sqrt() + eps)
    return n, m, v


@pytest.mark.parametrize("shape,block_size", [((37, 53), 64), ((5, 300), 256), ((3, 4, 9), 4), ((700,), 256)])
def test_adam_update_8bit_reference_semantics(shape, block_size):
    cm, cv, am, av = _state8(shape, block_size, seed=1)
    r = torch.randn(shape)
    n_want, m_want, v_want = _adam8_by_hand(r, cm, cv, am, av, 0.9, 0.99, 1e-8, block_size)
    with use_backend("reference"):
        n = ops.adam_update_(r, cm, cv, beta1=0.9, beta2=0.99, eps=1e-8, m_absmax=am, v_absmax=av,
                             block_size=block_size)
    assert n.dtype == torch.float32 and n.shape == r.shape
    torch.testing.assert_close(n, n_want, rtol=1e-5, atol=1e-6)
    # the new state is the quantization of the float32 updated moments
    cm2, am2 = Q.moments_quantize_ref(m_want, signed=True, block_size=block_size)
    cv2, av2 = Q.moments_quantize_ref(v_want, signed=False, block_size=block_size)
    torch.testing.assert_close(am, am2, rtol=1e-6, atol=0)
    torch.testing.assert_close(av, av2, rtol=1e-6, atol=0)
    assert (cm.long() - cm2.long()).abs().max() <= 1 and (cm != cm2).float().mean() < 1e-3
    assert (cv.long() - cv2.long()).abs().max() <= 1 and (cv != cv2).float().mean() < 1e-3
    # decoded state is close to the float32 moments (8-bit dynamic map: ~1-2% relative to the block absmax)
    m_dec = Q.moments_dequantize_ref(cm, am, signed=True, block_size=block_size)
    blocks_am = am.repeat_interleave(block_size, dim=-1)[..., : shape[-1]]
    assert ((m_dec - m_want).abs() <= 0.02 * blocks_am + 1e-12).all()


def test_moments8_zeros_layout_and_first_step():
    st = ops.moments8_zeros((6, 300), block_size=128)
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == (6, 300)
    assert st["m_absmax"].dtype == torch.float32 and st["m_absmax"].shape == (6, 3)
    assert all(int(t.abs().sum()) == 0 for t in st.values())
    r = torch.randn(6, 300)
    with use_backend("reference"):
        n = ops.adam_update_(r, st["exp_avg"], st["exp_avg_sq"], beta1=0.9, beta2=0.999, eps=1e-8,
                             m_absmax=st["m_absmax"], v_absmax=st["v_absmax"], block_size=128)
    # first step from zero: m = 0.1 r, v = 0.001 r^2, N = 0.1 r / (sqrt(0.001) |r| + eps) ~ +-3.16
    torch.testing.assert_close(n, 0.1 * r / (math.sqrt(0.001) * r.abs() + 1e-8), rtol=1e-5, atol=1e-5)
    want = torch.stack([r[:, :128].abs().amax(-1), r[:, 128:256].abs().amax(-1), r[:, 256:].abs().amax(-1)], -1)
    torch.testing.assert_close(st["m_absmax"], 0.1 * want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="block_size"):
        ops.moments8_zeros((4, 4), block_size=0)
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.moments8_zeros(())


def test_8bit_nan_gradient_gives_nan_absmax_reference():
    st = ops.moments8_zeros((4, 70), block_size=32)
    r = torch.randn(4, 70)
    r[1, 40] = float("nan")
    r[2, 5] = float("inf")
    with use_backend("reference"):
        ops.adam_update_(r, st["exp_avg"], st["exp_avg_sq"], m_absmax=st["m_absmax"], v_absmax=st["v_absmax"],
                         block_size=32)
    bad = torch.zeros(4, 3, dtype=torch.bool)
    bad[1, 1] = bad[2, 0] = True
    for name in ("m_absmax", "v_absmax"):
        assert torch.isnan(st[name][bad]).all() and torch.isfinite(st[name][~bad]).all()
    # codes of a non-finite block: the map's zero entry
    zero_m = int(torch.nonzero(Q.moments_dynamic_map(True) == 0)[0])
    assert (st["exp_avg"][1, 32:64] == zero_m).all() and (st["exp_avg_sq"][2, 0:32] == 0).all()
    dec = Q.moments_dequantize_ref(st["exp_avg"], st["m_absmax"], signed=True, block_size=32)
    assert torch.isnan(dec[1, 32:64]).all() and torch.isfinite(dec[0]).all()


# --------------------------------------------------------------------------- 16-bit: reference semantics
def test_adam_update_bf16_sr_reference_semantics():
    shape = (13, 29)
    r = torch.randn(shape).to(torch.bfloat16)
    m0 = (0.1 * torch.randn(shape)).to(torch.bfloat16)
    v0 = (0.01 * torch.rand(shape)).to(torch.bfloat16)
    m, v = m0.clone(), v0.clone()
    with use_backend("reference"):
        n = ops.adam_update_(r, m, v, beta1=0.9, beta2=0.999, eps=1e-8, moment_seed=42)
    rf = r.float()
    mf = m0.float().mul(0.9).add_(rf, alpha=1 - 0.9)  # the reference's float32 operations
    vf = v0.float().mul(0.999).addcmul_(rf, rf, value=1 - 0.999)
    assert torch.equal(_bits(m), _bits(Q.bf16_round_sr_ref(mf, 42, 0)))
    assert torch.equal(_bits(v), _bits(Q.bf16_round_sr_ref(vf, 42, mf.numel())))
    assert not torch.equal(m, mf.to(torch.bfloat16))  # not round-to-nearest
    # N from the unrounded float32 moments, stored in bf16
    assert torch.equal(n, (mf / (vf.sqrt() + 1e-8)).to(torch.bfloat16))
    # seed -1 is round-to-nearest, as before
    m2, v2 = m0.clone(), v0.clone()
    with use_backend("reference"):
        ops.adam_update_(r, m2, v2, beta1=0.9, beta2=0.999, eps=1e-8)
    assert torch.equal(m2, mf.to(torch.bfloat16)) and torch.equal(v2, vf.to(torch.bfloat16))


# --------------------------------------------------------------------------- argument errors
def _adam8_args(shape=(6, 40), block_size=16):
    st = ops.moments8_zeros(shape, block_size=block_size)
    return torch.randn(shape), st


@pytest.mark.parametrize("backend", reg.BACKENDS)
def test_bad_moment_arguments_raise_and_write_nothing(backend):
    from ..conftest import require_backend

    require_backend("adam_update", backend)
    r, st = _adam8_args()
    snap = {k: v.clone() for k, v in st.items()}

    def call(**kw):
        args = dict(m_absmax=st["m_absmax"], v_absmax=st["v_absmax"], block_size=16)
        args.update(kw)
        with use_backend(backend):
            ops.adam_update_(r, st["exp_avg"], st["exp_avg_sq"], **args)

    with pytest.raises(ValueError, match="v_absmax is None"):
        call(v_absmax=None)
    with pytest.raises(ValueError, match="m_absmax is None"):
        call(m_absmax=None)
    with pytest.raises(ValueError, match="block_size must be in"):
        call(block_size=0)
    with pytest.raises(ValueError, match="block_size must be in"):
        call(block_size=300)
    with pytest.raises(ValueError, match="m_absmax must have shape"):
        call(block_size=8)  # absmax made for 16
    with pytest.raises(TypeError, match="m_absmax must be float32"):
        call(m_absmax=st["m_absmax"].double())
    with pytest.raises(ValueError, match="moment_seed"):
        call(moment_seed=3)
    with pytest.raises(ValueError, match="share memory"):
        call(v_absmax=st["m_absmax"])
    with pytest.raises(TypeError, match="exp_avg must be uint8"):
        with use_backend(backend):
            ops.adam_update_(r, torch.zeros(6, 40), st["exp_avg_sq"], m_absmax=st["m_absmax"],
                             v_absmax=st["v_absmax"], block_size=16)
    with pytest.raises(ValueError, match="contiguous"):
        with use_backend(backend):
            ops.adam_update_(r.T, st["exp_avg"].view(40, 6).T.contiguous().T, st["exp_avg_sq"].T,
                             m_absmax=st["m_absmax"], v_absmax=st["v_absmax"], block_size=16)
    for k, v in snap.items():
        assert torch.equal(st[k], v), k
    # plain moments: block_size must be 0 at the op level, seeds only with bf16 moments
    m, v = torch.zeros(6, 40), torch.zeros(6, 40)
    with use_backend(backend):
        with pytest.raises(ValueError, match="moment_seed"):
            ops.adam_update_(r, m, v, moment_seed=1)
        with pytest.raises(ValueError, match="moment_seed"):
            ops.adam_update_(r.half(), m.half(), v.half(), moment_seed=1)
        with pytest.raises(ValueError, match="block_size is for 8-bit"):
            torch.ops.lowrank_kernels.adam_update(r, m, v, 0.9, 0.999, 1e-8, None, None, 16, -1)
    assert not m.any() and not v.any()


def test_bad_moment_arguments_projection_ops():
    g, p = torch.randn(12, 9), torch.randn(3, 9)
    st = ops.moments8_zeros((12, 3), block_size=2)
    w = torch.randn(12, 9)
    with use_backend("reference"):
        with pytest.raises(ValueError, match="exp_avg must have shape"):
            ops.project_adam_(g, p, torch.zeros(12, 4, dtype=torch.uint8), st["exp_avg_sq"], side="right",
                              m_absmax=st["m_absmax"], v_absmax=st["v_absmax"], block_size=2)
        with pytest.raises(ValueError, match="share memory"):
            ops.project_update_backproject_(w, g, p, st["exp_avg"], st["exp_avg_sq"], side="right", lr=0.1, step=1,
                                            m_absmax=st["m_absmax"], v_absmax=st["m_absmax"], block_size=2)
        with pytest.raises(ValueError, match=r"m_absmax must have one entry per parameter"):
            ops.foreach_project_update_backproject_([w], [g], [p], [st["exp_avg"]], [st["exp_avg_sq"]], side="right",
                                                    lr=0.1, step=1, m_absmax=[st["m_absmax"]] * 2,
                                                    v_absmax=[st["v_absmax"]], block_size=2)
        with pytest.raises(TypeError, match="moment_seed must be a list"):
            ops.foreach_project_update_backproject_([w], [g], [p], [torch.zeros(12, 3)], [torch.zeros(12, 3)],
                                                    side="right", lr=0.1, step=1, moment_seed=3)
    assert not st["exp_avg"].any() and not st["m_absmax"].any()


# --------------------------------------------------------------------------- backends vs the reference
# The backends compared with the reference here (the Triton kernels' moment formats:
# python_tests/kernels/test_moments_triton.py).
MOMENT_BACKENDS = ("cpp",)
KINDS = ("dense", "dct", "int4")


@pytest.fixture(params=MOMENT_BACKENDS)
def mbackend(request):
    from ..conftest import require_backend

    require_backend("projection_project_adam", request.param)
    return request.param


def _projector(kind, m, n, rank, side, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = n if side == "right" else m
    if kind == "dct":
        idx = torch.randperm(k, generator=g)[:rank].to(torch.int64)
        return ops.DCTProjector(ops.dct_basis(k, dtype), idx)
    q = torch.linalg.qr(torch.randn(k, rank, dtype=torch.float64, generator=g))[0]
    dense = (q.T if side == "right" else q).to(dtype).contiguous()
    return dense if kind == "dense" else ops.Int4Projector.quantize(dense, 16)


def _assert_codes_close(codes, ref_codes, what):
    """Codes equal except rare one-level differences (last-bit differences of the float32
    update put a value on the other side of a decision boundary)."""
    diff = (codes.long() - ref_codes.long()).abs()
    n_diff = int((diff > 0).sum())
    assert int(diff.max()) <= 1, f"{what}: a code differs by {int(diff.max())} levels"
    assert n_diff <= 1 + codes.numel() // 1000, f"{what}: {n_diff} of {codes.numel()} codes differ"


def _assert_absmax_close(a, ref, what):
    assert torch.equal(torch.isnan(a), torch.isnan(ref)), f"{what}: NaN pattern differs"
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(a[ok], ref[ok], rtol=1e-6, atol=0, msg=lambda msg: f"{what}: {msg}")


def _assert_state8_close(st, ref, what):
    _assert_codes_close(st[0], ref[0], f"{what} exp_avg codes")
    _assert_codes_close(st[1], ref[1], f"{what} exp_avg_sq codes")
    _assert_absmax_close(st[2], ref[2], f"{what} m_absmax")
    _assert_absmax_close(st[3], ref[3], f"{what} v_absmax")


def _clone(xs):
    return [x.clone() for x in xs]


P8_SHAPES = [(37, 53, 5), (90, 300, 70)]


@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank", P8_SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_projection_ops_8bit_vs_reference(mbackend, kind, m, n, rank, side, block_size):
    from .._numerics import assert_change_close, assert_close_f32

    proj = _projector(kind, m, n, rank, side)
    ls = ops.lowrank_shape(m, n, rank, side)
    st0 = _state8(ls, block_size, seed=m + rank)
    g = torch.randn(n, m).T  # a transposed grad
    w0 = torch.randn(m, n)
    outs = {}
    for be in ("reference", mbackend):
        st, w = _clone(st0), w0.clone()
        kw = dict(m_absmax=st[2], v_absmax=st[3], block_size=block_size)
        with use_backend(be):
            N = ops.project_adam_(g, proj, st[0], st[1], side=side, beta1=0.8, beta2=0.9, eps=1e-6, **kw)
            st_a = _clone(st)
            ops.project_update_backproject_(w, g, proj, st[0], st[1], side=side, lr=0.02, step=3, weight_decay=0.1,
                                            scale=0.5, **kw)
        outs[be] = (N, st_a, st, w)
    (rN, rst_a, rst, rw), (N, st_a, st, w) = outs["reference"], outs[mbackend]
    assert N.dtype == torch.float32 and N.shape == ls
    assert_close_f32(N, rN, "project_adam_ N")
    _assert_state8_close(st_a, rst_a, "project_adam_")
    _assert_state8_close(st, rst, "project_update_backproject_")
    assert_change_close(w, w0, rw, "project_update_backproject_", rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_foreach_8bit_vs_reference_and_single(mbackend, kind, side):
    from .._numerics import assert_change_close

    shapes = [(37, 53, 5), (19, 41, 3), (64, 300, 9)]
    projs = [_projector(kind, m, n, r, side, seed=i) for i, (m, n, r) in enumerate(shapes)]
    states = [_state8(ops.lowrank_shape(m, n, r, side), 32, seed=i) for i, (m, n, r) in enumerate(shapes)]
    grads = [torch.randn(m, n) for m, n, _ in shapes]
    w0 = [torch.randn(m, n) for m, n, _ in shapes]
    outs = {}
    for be, foreach in (("reference", True), (mbackend, True), (mbackend, False)):
        sts, ws = [_clone(s) for s in states], _clone(w0)
        with use_backend(be):
            if foreach:
                ops.foreach_project_update_backproject_(
                    ws, grads, projs, [s[0] for s in sts], [s[1] for s in sts], side=side, lr=[0.01, 0.02, 0.03],
                    step=2, weight_decay=0.1, m_absmax=[s[2] for s in sts], v_absmax=[s[3] for s in sts],
                    block_size=32)
            else:
                for i, (w, gr, p, s) in enumerate(zip(ws, grads, projs, sts)):
                    ops.project_update_backproject_(w, gr, p, s[0], s[1], side=side, lr=[0.01, 0.02, 0.03][i],
                                                    step=2, weight_decay=0.1, m_absmax=s[2], v_absmax=s[3],
                                                    block_size=32)
        outs[(be, foreach)] = (sts, ws)
    ref_sts, ref_ws = outs[("reference", True)]
    f_sts, f_ws = outs[(mbackend, True)]
    s_sts, s_ws = outs[(mbackend, False)]
    for i in range(len(shapes)):
        _assert_state8_close(f_sts[i], ref_sts[i], f"foreach param {i}")
        assert_change_close(f_ws[i], w0[i], ref_ws[i], f"foreach param {i}", rtol=1e-4)
        for a, b in zip(f_sts[i], s_sts[i]):  # the multi-tensor op is the single-tensor step, exactly
            assert torch.equal(a, b)
        assert torch.equal(f_ws[i], s_ws[i])


@pytest.mark.parametrize("block_size", [7, 64, 256])
@pytest.mark.parametrize("shape", [(37, 53), (3, 4, 300), (700,), (1, 1)])
def test_adam_update_8bit_vs_reference(mbackend, shape, block_size):
    from .._numerics import assert_close_f32

    st0 = _state8(shape, block_size, seed=3)
    r = torch.randn(shape)
    outs = {}
    for be in ("reference", mbackend):
        st = _clone(st0)
        with use_backend(be):
            n = ops.adam_update_(r, st[0], st[1], beta1=0.9, beta2=0.95, eps=1e-8, m_absmax=st[2], v_absmax=st[3],
                                 block_size=block_size)
            ns = ops.foreach_adam_update_([r, 2 * r], [st[0], st[0].clone()], [st[1], st[1].clone()],
                                          m_absmax=[st[2], st[2].clone()], v_absmax=[st[3], st[3].clone()],
                                          block_size=block_size)
        outs[be] = (n, st, ns)
    (rn, rst, rns), (n, st, ns) = outs["reference"], outs[mbackend]
    assert n.dtype == torch.float32
    assert_close_f32(n, rn, "adam_update_ N")
    assert_close_f32(ns[1], rns[1], "adam_foreach_update_ N[1]", rtol=1e-4)
    _assert_state8_close(st, rst, "adam_update_ (two steps)")


def test_8bit_multistep_drift_bounded(mbackend):
    """10 GaLore steps, the backend against the reference each on its own state: rare
    one-level code differences must not grow into drift."""
    m, n, rank, side = 64, 90, 12, "left"
    proj = _projector("dense", m, n, rank, side)
    st0 = list(ops.moments8_zeros(ops.lowrank_shape(m, n, rank, side), block_size=32).values())
    w0 = torch.randn(m, n)
    grads = [torch.randn(m, n) for _ in range(10)]
    outs = {}
    for be in ("reference", mbackend):
        st, w = _clone(st0), w0.clone()
        with use_backend(be):
            for t, g in enumerate(grads):
                ops.project_update_backproject_(w, g, proj, st[0], st[1], side=side, lr=0.01, step=t + 1,
                                                m_absmax=st[2], v_absmax=st[3], block_size=32)
        outs[be] = (st, w)
    (rst, rw), (st, w) = outs["reference"], outs[mbackend]
    change, ref_change = w - w0, rw - w0
    rel = float((change - ref_change).norm() / ref_change.norm())
    assert rel < 1e-3, f"weight change drifted {rel:.2e} from the reference in 10 steps"
    for i, signed in ((0, True), (1, False)):
        a = Q.moments_dequantize_ref(st[i], st[2 + i], signed=signed, block_size=32)
        b = Q.moments_dequantize_ref(rst[i], rst[2 + i], signed=signed, block_size=32)
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_cpp_maps_equal_python_maps(mbackend):
    """The backend's dynamic maps are the Python maps, value for value: with beta1 = 0 and
    r = the signed map (absmax 1), exp_avg's codes must come back as 0..255; with codes
    0..255, absmax 1, beta = 0.5 and r = 0, N = (map_s / 2) / (sqrt(map_u / 2) + eps)
    exactly (in IEEE float32 per operation)."""
    ms, mu = Q.moments_dynamic_map(True), Q.moments_dynamic_map(False)
    codes = torch.arange(256, dtype=torch.uint8).view(1, 256)
    # decode + requantize of exact map values
    cm, cv = torch.zeros(1, 256, dtype=torch.uint8), torch.zeros(1, 256, dtype=torch.uint8)
    am, av = torch.zeros(1, 1), torch.zeros(1, 1)
    with use_backend(mbackend):
        ops.adam_update_(ms.view(1, 256).clone(), cm, cv, beta1=0.0, beta2=0.0, m_absmax=am, v_absmax=av)
    assert torch.equal(cm, codes) and float(am) == 1.0
    # decode: N from both maps exactly
    cm, cv, am, av = codes.clone(), codes.clone(), torch.ones(1, 1), torch.ones(1, 1)
    with use_backend(mbackend):
        n = ops.adam_update_(torch.zeros(1, 256), cm, cv, beta1=0.5, beta2=0.5, eps=1e-3, m_absmax=am, v_absmax=av)
    # IEEE float32 per operation (numpy), the kernels' arithmetic
    f32 = np.float32
    want = (ms.numpy() * f32(0.5)) / (np.sqrt(mu.numpy() * f32(0.5)) + f32(1e-3))
    assert torch.equal(n.view(256), torch.from_numpy(want))
    assert torch.equal(cm, codes) and torch.equal(cv, codes)  # halved values requantize to the same codes


@pytest.mark.parametrize("op", ["adam_update", "project_adam", "update_backproject"])
def test_8bit_nan_gradient_gives_nan_absmax(mbackend, op):
    m, n, rank = 20, 70, 6
    proj = _projector("dense", m, n, rank, "left")
    ls = ops.lowrank_shape(m, n, rank, "left")  # (6, 70)
    r, g, w0 = torch.randn(ls), torch.randn(m, n), torch.randn(m, n)
    r[2, 40] = float("nan")
    g[4, 40] = float("nan")  # poisons column 40 of R = P^T G: block 1 of every row
    outs = {}
    for be in ("reference", mbackend):
        st = _state8(ls, 32, seed=1)
        w = w0.clone()
        with use_backend(be):
            if op == "adam_update":
                ops.adam_update_(r, st[0], st[1], m_absmax=st[2], v_absmax=st[3], block_size=32)
            else:
                if op == "project_adam":
                    ops.project_adam_(g, proj, st[0], st[1], side="left", m_absmax=st[2], v_absmax=st[3],
                                      block_size=32)
                else:
                    ops.project_update_backproject_(w, g, proj, st[0], st[1], side="left", lr=0.1, step=1,
                                                    m_absmax=st[2], v_absmax=st[3], block_size=32)
        outs[be] = st
    st, rst = outs[mbackend], outs["reference"]
    assert torch.isnan(st[2]).any() and torch.isnan(st[3]).any()
    for i in (2, 3):
        assert torch.equal(torch.isnan(st[i]), torch.isnan(rst[i]))
    bad = torch.isnan(st[2]).repeat_interleave(32, dim=-1)[:, :70]
    zero_m = int(torch.nonzero(Q.moments_dynamic_map(True) == 0)[0])
    assert (st[0][bad] == zero_m).all() and (st[1][torch.isnan(st[3]).repeat_interleave(32, -1)[:, :70]] == 0).all()
    _assert_state8_close(st, rst, op)


# --------------------------------------------------------------------------- 16-bit SR: bits equal the reference
@pytest.mark.parametrize("shape", [(37, 53), (2, 3, 129), (1000,)])
def test_adam_update_bf16_sr_bits_equal_reference(mbackend, shape):
    r = torch.randn(shape).to(torch.bfloat16)
    m0, v0 = (0.1 * torch.randn(shape)).to(torch.bfloat16), (0.01 * torch.rand(shape)).to(torch.bfloat16)
    outs = {}
    for be in ("reference", mbackend):
        m, v = m0.clone(), v0.clone()
        with use_backend(be):
            n = ops.adam_update_(r, m, v, beta1=0.9, beta2=0.999, moment_seed=2**33 + 5)
            ns = ops.foreach_adam_update_([r], [m.clone()], [v.clone()], moment_seed=[77])
        outs[be] = (n, m, v, ns[0])
    for a, b in zip(outs[mbackend], outs["reference"]):
        assert a.dtype == torch.bfloat16
        assert torch.equal(_bits(a), _bits(b))


def _exact_problem(kind, m, n, rank, side):
    """Inputs whose projection is exact in float32 whatever the summation order (small
    integers times powers of two), so R, and then every moment bit, must match."""
    g = torch.randint(-4, 5, (m, n)).to(torch.bfloat16)
    k = n if side == "right" else m
    if kind == "dct":  # DCT rows are irrational (as INT4's dequantized values): compared up to one bf16 unit
        return g, _projector("dct", m, n, rank, side, torch.bfloat16)
    p = (torch.randint(-2, 3, (rank, k)).float() * 0.25).to(torch.bfloat16)
    p = p if side == "right" else p.T.contiguous()
    return g, (p if kind == "dense" else ops.Int4Projector.quantize(p.float(), 16))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_projection_ops_bf16_sr_vs_reference(mbackend, kind, side):
    m, n, rank = 37, 53, 5
    g, proj = _exact_problem(kind, m, n, rank, side)
    ls = ops.lowrank_shape(m, n, rank, side)
    m0, v0 = (0.1 * torch.randn(ls)).to(torch.bfloat16), (0.01 * torch.rand(ls)).to(torch.bfloat16)
    w0 = torch.randn(m, n).to(torch.bfloat16)
    outs = {}
    for be in ("reference", mbackend):
        ea, eas, w = m0.clone(), v0.clone(), w0.clone()
        with use_backend(be):
            N = ops.project_adam_(g, proj, ea, eas, side=side, moment_seed=11)
            ea2, eas2 = ea.clone(), eas.clone()
            ops.project_update_backproject_(w, g, proj, ea2, eas2, side=side, lr=0.01, step=2, moment_seed=12)
            ws, eas3, easq3 = [w0.clone()], [ea.clone()], [eas.clone()]
            ops.foreach_project_update_backproject_(ws, [g], [proj], eas3, easq3, side=side, lr=0.01, step=2,
                                                    moment_seed=[12])
        outs[be] = (N, ea, eas, ea2, eas2, eas3[0], easq3[0])
    for i, (a, b) in enumerate(zip(outs[mbackend], outs["reference"])):
        assert a.dtype == torch.bfloat16
        d = (_bits(a) - _bits(b)).abs()
        if kind != "dense":  # DCT rows, dequantized INT4 values: R itself may differ in its last float32 bit
            assert int(d.max()) <= 1 and int((d > 0).sum()) <= 1 + a.numel() // 100, i
        else:
            assert torch.equal(_bits(a), _bits(b)), (i, int((d > 0).sum()))
    assert torch.equal(_bits(outs[mbackend][3]), _bits(outs[mbackend][5]))  # foreach = single


# --------------------------------------------------------------------------- direct C++ calls, compile
def test_cpp_ops_check_moment_arguments():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    L = torch.ops._lowrank_kernels
    st = ops.moments8_zeros((6, 40), block_size=16)
    r = torch.randn(6, 40)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        L.adam_update_cpu(r, st["exp_avg"], st["exp_avg_sq"], 0.9, 0.99, 1e-8, st["m_absmax"], None, 16, -1)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        L.adam_update_cpu(r, st["exp_avg"], st["exp_avg_sq"], 0.9, 0.99, 1e-8, st["m_absmax"], st["v_absmax"], 300,
                          -1)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        L.adam_update_cpu(r, st["exp_avg"], st["exp_avg_sq"], 0.9, 0.99, 1e-8, st["m_absmax"], st["v_absmax"], 8, -1)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        L.adam_update_cpu(r, torch.zeros(6, 40), torch.zeros(6, 40), 0.9, 0.99, 1e-8, None, None, 0, 3)
    g, p = torch.randn(12, 9), torch.randn(3, 9)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        L.projection_project_adam_cpu(g, p, torch.zeros(12, 3), torch.zeros(12, 3, dtype=torch.uint8), "right", 0.9,
                                      0.99, 1e-8, None, None, None, 0, 0, torch.zeros(12, 1), torch.zeros(12, 1), 4,
                                      -1)
    assert not any(t.any() for t in st.values())


def test_moment_forms_compile_fullgraph():
    """The optional mutable absmax arguments and the seeds trace under torch.compile, and
    the in-place updates of codes and absmax survive functionalization."""
    torch._dynamo.reset()

    def step(w, g, p, st, r, st2, wb, gb, pb, mb, vb):
        ops.project_update_backproject_(w, g, p, st[0], st[1], side="left", lr=0.01, step=1, m_absmax=st[2],
                                        v_absmax=st[3], block_size=4)
        n = ops.adam_update_(r, st2[0], st2[1], m_absmax=st2[2], v_absmax=st2[3], block_size=4)
        ops.project_update_backproject_(wb, gb, pb, mb, vb, side="right", lr=0.01, step=1, moment_seed=3)
        return n.sum()

    def inputs():
        g = torch.Generator().manual_seed(0)
        w, grad = torch.randn(10, 9, generator=g), torch.randn(10, 9, generator=g)
        p = torch.randn(10, 3, generator=g)
        st = list(_state8((3, 9), 4, seed=2))
        st2 = list(_state8((5, 6), 4, seed=3))
        wb, gb = torch.randn(8, 7, generator=g).bfloat16(), torch.randn(8, 7, generator=g).bfloat16()
        pb = torch.randn(2, 7, generator=g)
        return (w, grad, p, st, torch.randn(5, 6, generator=g), st2, wb, gb, pb,
                torch.zeros(8, 2, dtype=torch.bfloat16), torch.zeros(8, 2, dtype=torch.bfloat16))

    eager, compiled = inputs(), inputs()
    out_e = step(*eager)
    out_c = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    torch.testing.assert_close(out_c, out_e)
    flat = lambda xs: [t for x in xs for t in (x if isinstance(x, list) else [x])]  # noqa: E731
    for a, b in zip(flat(compiled), flat(eager)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_8bit_moments_with_other_param_dtypes(mbackend, dtype, side):
    """8-bit moments with float64 (R and the weight update in float64, the moment step in
    float32) and bf16 weights: N is float32 whatever the weight dtype."""
    from .._numerics import assert_change_close, assert_close_f32

    m, n, rank = 29, 44, 7
    proj = _projector("dense", m, n, rank, side, dtype=dtype)
    ls = ops.lowrank_shape(m, n, rank, side)
    st0 = _state8(ls, 16, seed=4)
    g, w0 = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    outs = {}
    for be in ("reference", mbackend):
        st, w = _clone(st0), w0.clone()
        with use_backend(be):
            N = ops.project_adam_(g, proj, st[0], st[1], side=side, m_absmax=st[2], v_absmax=st[3], block_size=16)
            ops.project_update_backproject_(w, g, proj, st[0], st[1], side=side, lr=0.05, step=1, m_absmax=st[2],
                                            v_absmax=st[3], block_size=16)
        outs[be] = (N, st, w)
    (rN, rst, rw), (N, st, w) = outs["reference"], outs[mbackend]
    assert N.dtype == torch.float32 and rN.dtype == torch.float32 and w.dtype == dtype
    assert_close_f32(N, rN, "N")
    _assert_state8_close(st, rst, "state")
    assert_change_close(w, w0, rw, "weight", rtol=1e-4)


# --------------------------------------------------------------------------- bf16 moments for other parameter dtypes
@pytest.mark.parametrize("seed", [11, -1])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bf16_moments_with_other_param_dtypes(backend, dtype, kind, side, seed):
    """16-bit (bfloat16) moments for float32 / float16 / float64 parameters and gradients
    (float32 master weights), with stochastic (moment_seed >= 0) and nearest rounding: the
    moment bits and N equal the reference's (C++ dense: exactly; else up to one bf16 unit on
    a few elements: R's or the float32 moment update's last bit may differ), the weight
    change is close. The
    triton backend refuses float64 with a TypeError before writing anything."""
    from .._numerics import assert_change_close
    from ..conftest import require_backend

    require_backend("projection_project_adam", backend)
    m, n, rank = 37, 53, 5
    g16, proj16 = _exact_problem(kind, m, n, rank, side)
    g = g16.to(dtype)
    if kind == "dense":
        proj = proj16.to(dtype)
    elif kind == "dct":
        proj = _projector("dct", m, n, rank, side, dtype)
    else:
        proj = proj16
    ls = ops.lowrank_shape(m, n, rank, side)
    gen = torch.Generator().manual_seed(3)
    m0 = (0.1 * torch.randn(ls, generator=gen)).to(torch.bfloat16)
    v0 = (0.01 * torch.rand(ls, generator=gen)).to(torch.bfloat16)
    w0 = torch.randn(m, n, generator=gen).to(dtype)
    seed2 = seed + 1 if seed >= 0 else -1
    if backend == "triton" and dtype == torch.float64:
        ea, eas, w = m0.clone(), v0.clone(), w0.clone()
        with use_backend(backend), pytest.raises(TypeError, match="float64"):
            ops.project_update_backproject_(w, g, proj, ea, eas, side=side, lr=0.01, step=2, moment_seed=seed2)
        assert torch.equal(w, w0) and torch.equal(ea, m0) and torch.equal(eas, v0)
        return
    outs = {}
    for be in ("reference", backend):
        ea, eas, w = m0.clone(), v0.clone(), w0.clone()
        with use_backend(be):
            N = ops.project_adam_(g, proj, ea, eas, side=side, moment_seed=seed)
            ea2, eas2 = ea.clone(), eas.clone()
            ops.project_update_backproject_(w, g, proj, ea2, eas2, side=side, lr=0.01, step=2, moment_seed=seed2)
            ws, ea3, eas3 = [w0.clone()], [ea.clone()], [eas.clone()]
            ops.foreach_project_update_backproject_(ws, [g], [proj], ea3, eas3, side=side, lr=0.01, step=2,
                                                    moment_seed=[seed2])
        outs[be] = (N, ea, eas, ea2, eas2, ea3[0], eas3[0], w, ws[0])
    ref, out = outs["reference"], outs[backend]
    for i in range(7):
        a, b = out[i], ref[i]
        assert a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16, (i, a.dtype, b.dtype)
        d = (_bits(a) - _bits(b)).abs()
        if kind == "dense" and backend == "cpp":
            assert torch.equal(_bits(a), _bits(b)), (i, int((d > 0).sum()))
        else:  # triton's float32 moment arithmetic (fused multiply-adds) may put a value on the other side
            assert int(d.max()) <= 1 and int((d > 0).sum()) <= 1 + a.numel() // 100, i
    assert torch.equal(_bits(out[3]), _bits(out[5])) and torch.equal(_bits(out[4]), _bits(out[6]))  # foreach = single
    for i in (7, 8):
        assert out[i].dtype == dtype
        assert_change_close(out[i], w0, ref[i], f"weight {i}", rtol=1e-2 if kind != "dense" else 1e-4)
    if seed >= 0:  # the seed is used: nearest rounding stores other bits somewhere
        with use_backend("reference"):
            ea_n, eas_n = m0.clone(), v0.clone()
            ops.project_adam_(g, proj, ea_n, eas_n, side=side, moment_seed=-1)
        assert not (torch.equal(ea_n, ref[1]) and torch.equal(eas_n, ref[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_adam_update_bf16_moments_other_r_dtypes(backend, dtype):
    """adam_update_ (plain groups) with a float32 / float16 R and bfloat16 SR moments: bits
    equal the reference's."""
    from ..conftest import require_backend

    require_backend("adam_update", backend)
    shape = (37, 53)
    gen = torch.Generator().manual_seed(5)
    r = torch.randint(-4, 5, shape, generator=gen).to(dtype) * 0.25
    m0 = (0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    v0 = (0.01 * torch.rand(shape, generator=gen)).to(torch.bfloat16)
    outs = {}
    for be in ("reference", backend):
        m, v = m0.clone(), v0.clone()
        with use_backend(be):
            n = ops.adam_update_(r, m, v, beta1=0.9, beta2=0.999, moment_seed=2**33 + 5)
            ns = ops.foreach_adam_update_([r], [m.clone()], [v.clone()], moment_seed=[77])
        outs[be] = (n, m, v, ns[0])
    for a, b in zip(outs[backend], outs["reference"]):
        assert a.dtype == b.dtype
        if a.dtype == torch.bfloat16:
            assert torch.equal(_bits(a), _bits(b))
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
