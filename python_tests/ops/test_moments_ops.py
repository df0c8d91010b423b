"""8-bit and 16-bit (stochastic-rounding) moments in the op layer (issue 14).

The reference (the specification) against independent math: the 8-bit step is
dequantize -> float32 Adam -> N -> requantize, the bf16 store is the hashed stochastic
rounding of reference/moments.py. Then every backend that implements the new forms
against the reference, argument errors, and opcheck / torch.compile of the new schemas.
"""
import math

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import moments as Q
from lowrank_kernels.reference.quant import MASK32, mix32_int, seed_keys

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


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
