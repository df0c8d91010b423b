"""8-bit and bf16 stochastic-rounding moments in the Triton kernels.

The launchers of kernels/projection.py and kernels/adam.py are called directly (the op
layer routes to them with the same trailing arguments; bad arguments are the op layer's to
reject, so those go through the ops) and compared with a reference
composed from reference/projection.py (the projection ``R``) and reference/moments.py
(quantize / dequantize with the dynamic maps, the bf16 stochastic rounding), with the
float32 update written with the reference's torch ops (fused multiply-adds, as the kernels); then through
the ops (``use_backend("triton")`` against ``use_backend("reference")``):

- 8-bit: codes equal except "ties" (the reference's normalized value within 1e-5 of a
  decision midpoint: the Triton GEMM sums ``R`` in another order), counted and bounded;
  absmax at rtol 4e-6 against a float64 ``R`` (float32 summation error, doubled in
  ``R^2``; exactly equal without a GEMM); ``N`` (float32) elementwise; for the
  weight update, the change of the weight against the reference's change;
- 16-bit: the bf16 bits of the stored moments equal the SR of the float32 value; exactly
  where that value is exact (integer-valued inputs, or the elementwise kernel), else
  within one bf16 spacing and equal to the SR of the reference value nearly everywhere;
- a non-finite gradient gives its blocks ``absmax = NaN`` and the zero code;
- odd shapes (37 x 53, rank 5), columns not a multiple of the block (block sizes 64 and
  256), a rank above 256 (several blocks per row on the right side); every projector
  kind (dense, DCT, INT4) and side.

Runs under TRITON_INTERPRET=1 on CPU, on CUDA with LOWRANK_KERNELS_TEST_DEVICE=cuda.
"""
import math
import os

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import moments as Q
from lowrank_kernels.reference import projection as RP
from lowrank_kernels.reference.dct import dct_basis_float64
from lowrank_kernels.reference.quant import MASK32, quant_int4_pack_ref

from .._interpreter import FMA_ROUNDS_TWICE, fma_slack
from .._numerics import assert_change_close, assert_close_f32

kp = pytest.importorskip("lowrank_kernels.kernels.projection")
ka = pytest.importorskip("lowrank_kernels.kernels.adam")

if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

B1, B2, EPS = 0.9, 0.95, 1e-6
KINDS = ("dense", "dct", "int4")
SIDES = ("right", "left")
# (m, n, rank, block_size): odd shapes; cols not a multiple of the block; right side with
# rank 300 has two blocks per row (256 + 44), left side with n = 300 too.
SHAPES = [(37, 53, 5, 64), (37, 53, 5, 256), (41, 300, 7, 256), (300, 29, 300, 256), (45, 131, 9, 64)]


# --------------------------------------------------------------------------- references
def sr_bf16(x: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """The stochastic rounding of float32 ``x`` to bf16 (reference/moments.py)."""
    return Q.bf16_round_sr_ref(x.cpu(), seed, offset).to(x.device)


def quantize(x, signed, bs):
    """reference/moments.py's quantizer (non-finite blocks: NaN absmax, the zero code)."""
    return Q.moments_quantize_ref(x, signed=signed, block_size=bs)


def _mids(signed, device):
    values = Q.moments_dynamic_map(signed, device)
    return (values[:-1] + values[1:]) / 2.0


def adam8_ref(R, cm, am, cv, av, bs, beta1=B1, beta2=B2, eps=EPS):
    """(N, new codes/absmax of m and v, the float32 m and v) from float32 ``R``."""
    m = Q.moments_dequantize_ref(cm, am, signed=True, block_size=bs)
    v = Q.moments_dequantize_ref(cv, av, signed=False, block_size=bs)
    m = m.mul(beta1).add_(R, alpha=1.0 - beta1)  # the reference's ops (one fused multiply-add)
    v = v.mul(beta2).addcmul_(R, R, value=1.0 - beta2)
    n = m / (v.sqrt() + eps)
    ncm, nam = quantize(m, True, bs)
    ncv, nav = quantize(v, False, bs)
    return n, (ncm, nam, ncv, nav), (m, v)


def moments8(shape, bs, device, gen):
    """Random 8-bit moments (codes + absmax) of ``shape`` spread over decades."""
    m = 0.1 * torch.randn(shape, generator=gen) * torch.logspace(-3, 0, shape[-1])[torch.randperm(shape[-1],
                                                                                                  generator=gen)]
    v = 0.01 * torch.rand(shape, generator=gen) + 1e-6
    cm, am = Q.moments_quantize_ref(m, signed=True, block_size=bs)
    cv, av = Q.moments_quantize_ref(v, signed=False, block_size=bs)
    return [t.to(device) for t in (cm, am, cv, av)]


def projector(kind, side, m, n, rank, device, gen, dtype=torch.float32):
    """``(launcher projector args: proj, indices, q_scale, q_min, rank, group_size)``, dense P."""
    if kind == "dense":
        p = torch.randn((rank, n) if side == "right" else (m, rank), generator=gen) / math.sqrt(max(m, n))
        p = p.to(dtype).to(device)
        return (p, None, None, None, 0, 0), p.float()
    if kind == "dct":
        s = n if side == "right" else m
        basis = dct_basis_float64(s).to(dtype).to(device)
        idx = torch.randperm(s, generator=gen)[:rank].to(torch.int32).to(device)
        rows = basis.index_select(0, idx.long()).float()
        return (basis, idx, None, None, 0, 0), (rows if side == "right" else rows.T)
    shape = (rank, n) if side == "right" else (m, rank)
    dense = torch.randn(shape, generator=gen) / math.sqrt(max(m, n))
    packed, scale, mn = quant_int4_pack_ref(dense, 32)
    args = (packed.to(device), None, scale.to(device), mn.to(device), rank, 32)
    from lowrank_kernels.reference.quant import quant_int4_unpack_ref

    return args, quant_int4_unpack_ref(packed, scale, mn, shape, torch.float32, 32).to(device)


def check_codes(out, ref, x_ref, absmax_ref, signed, bs, what, max_frac=0.01):
    """Codes equal except ties: adjacent codes whose decision midpoint lies within 1e-5 of the
    reference's normalized value. Returns the number of ties (at most ``max_frac`` of all)."""
    diff = out.long() != ref.long()
    n = int(diff.sum())
    if n == 0:
        return 0
    assert ((out.long() - ref.long()).abs()[diff] == 1).all(), f"{what}: non-adjacent code differences"
    cols = x_ref.shape[-1]
    scale = absmax_ref.double().repeat_interleave(bs, dim=-1)[..., :cols]
    normed = (x_ref.double() / torch.where(scale > 0, scale, torch.ones_like(scale)))[diff]
    lo = torch.minimum(out.long(), ref.long())[diff]
    mids = _mids(signed, out.device).double()
    dist = (normed - mids[lo]).abs()
    assert (dist <= 1e-5).all(), f"{what}: {n} code differences, max distance to the midpoint {float(dist.max())}"
    assert n <= max(2, max_frac * out.numel()), f"{what}: {n} ties of {out.numel()}"
    return n


def check_q8_state(state, ref, xs, bs, what, exact_absmax=False):
    (cm, am, cv, av), (rcm, ram, rcv, rav), (rm, rv) = state, ref, xs
    assert cm.dtype == cv.dtype == torch.uint8 and am.dtype == av.dtype == torch.float32
    # with a GEMM: R's float32 summation error (~1e-6 relative on 50-300 terms), doubled in R^2.
    # Without a GEMM exact, except under an interpreter that rounds tl.fma twice (Triton 3.6:
    # python_tests/_interpreter.py): one float32 rounding of the product term, ~1e-7 of absmax.
    rtol = (1e-6 if FMA_ROUNDS_TWICE else 0.0) if exact_absmax else 4e-6
    torch.testing.assert_close(am, ram, rtol=rtol, atol=0.0, equal_nan=True, msg=lambda s: f"{what} m_absmax: {s}")
    torch.testing.assert_close(av, rav, rtol=rtol, atol=0.0, equal_nan=True, msg=lambda s: f"{what} v_absmax: {s}")
    check_codes(cm, rcm, rm, ram, True, bs, f"{what} exp_avg")
    check_codes(cv, rcv, rv, rav, False, bs, f"{what} exp_avg_sq")


def inputs(m, n, gen, device, dtype=torch.float32):
    return torch.randn(m, n, generator=gen).to(dtype).to(device)


# --------------------------------------------------------------------------- 8-bit: project + Adam
def test_maps_are_the_references():
    maps = kp.q8_maps("cpu")
    assert maps.dtype == torch.float32 and maps.shape == (1024,)
    for k, signed in enumerate((True, False)):
        assert torch.equal(maps[256 * k:256 * (k + 1)], Q.moments_dynamic_map(signed))
        assert torch.equal(maps[512 + 256 * k:512 + 256 * k + 255], _mids(signed, "cpu"))
        assert maps[512 + 256 * k + 255] == float("inf")
    assert kp.q8_maps("cpu") is maps


@pytest.mark.parametrize("kind,side,m,n,rank,bs", [
    (kind, side, *shape) for kind in KINDS for side in SIDES for shape in SHAPES
    if not (kind == "dct" and shape[2] > (shape[1] if side == "right" else shape[0]))  # DCT: rank <= basis size
])
def test_project_adam_8bit(kind, side, m, n, rank, bs, device):
    gen = torch.Generator().manual_seed(m * 7 + n + rank + bs)
    grad = inputs(m, n, gen, device)
    pargs, P = projector(kind, side, m, n, rank, device, gen)
    lshape = (m, rank) if side == "right" else (rank, n)
    cm, am, cv, av = moments8(lshape, bs, device, gen)
    R = RP.project(grad.double(), P.double(), side, torch.float64).float()
    n_ref, ref, xs = adam8_ref(R, cm, am, cv, av, bs)
    state = [t.clone() for t in (cm, am, cv, av)]
    out = kp.projection_project_adam_triton(grad, pargs[0], state[0], state[2], side, B1, B2, EPS, *pargs[1:],
                                            m_absmax=state[1], v_absmax=state[3], block_size=bs)
    assert out.dtype == torch.float32 and out.shape == lshape
    assert_close_f32(out, n_ref, "N", rtol=2e-5)
    check_q8_state(state, ref, xs, bs, f"{kind}/{side}")
    # blocks: the row's number of blocks is ceil(cols / bs)
    assert state[1].shape == (lshape[0], math.ceil(lshape[1] / bs))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", SIDES)
def test_project_update_backproject_8bit(kind, side, device):
    m, n, rank, bs = 37, 53, 5, 64
    gen = torch.Generator().manual_seed(11)
    grad = inputs(m, n, gen, device)
    w0 = inputs(m, n, gen, device)
    pargs, P = projector(kind, side, m, n, rank, device, gen)
    lshape = (m, rank) if side == "right" else (rank, n)
    cm, am, cv, av = moments8(lshape, bs, device, gen)
    R = RP.project(grad.double(), P.double(), side, torch.float64).float()
    n_ref, ref, xs = adam8_ref(R, cm, am, cv, av, bs)
    lr, step, wd, scale = 0.01, 3, 0.1, 0.5
    w_ref = w0.clone()
    RP._apply(w_ref, n_ref, P, side, -RP.adam_step_size(lr, B1, B2, step) * scale, 1.0 - lr * wd)
    w = w0.clone()
    state = [t.clone() for t in (cm, am, cv, av)]
    kp.projection_project_update_backproject_triton(
        w, grad, pargs[0], state[0], state[2], side, lr, B1, B2, EPS, step, wd, scale, *pargs[1:],
        m_absmax=state[1], v_absmax=state[3], block_size=bs)
    assert_change_close(w, w0, w_ref, "W", rtol=2e-5)
    check_q8_state(state, ref, xs, bs, f"{kind}/{side}")


@pytest.mark.parametrize("side", SIDES)
def test_foreach_8bit_equals_single(side, device):
    """The multi-tensor launcher on a bucket (dense, DCT and INT4 in turn; odd shapes) gives the
    single-tensor launcher's weights and state bit for bit."""
    gen = torch.Generator().manual_seed(5)
    bs = 64
    for kind in KINDS:
        shapes = [(37, 53, 5), (70, 41, 3)]
        params, grads, projs, states, tails = [], [], [], [], []
        for m, n, r in shapes:
            params.append(inputs(m, n, gen, device))
            grads.append(inputs(m, n, gen, device))
            pargs, _ = projector(kind, side, m, n, r, device, gen)
            projs.append(pargs[0])
            tails.append(pargs[1:])
            states.append(moments8((m, r) if side == "right" else (r, n), bs, device, gen))
        lr, wd, scale, step = [0.01, 0.02], [0.0, 0.1], [0.25, 1.0], [1, 4]
        single_w = [p.clone() for p in params]
        single_s = [[t.clone() for t in s] for s in states]
        for i in range(2):
            kp.projection_project_update_backproject_triton(
                single_w[i], grads[i], projs[i], single_s[i][0], single_s[i][2], side, lr[i], B1, B2, EPS, step[i],
                wd[i], scale[i], *tails[i], m_absmax=single_s[i][1], v_absmax=single_s[i][3], block_size=bs)
        fw = [p.clone() for p in params]
        fs = [[t.clone() for t in s] for s in states]
        lists = {"dense": ((), (), (), ()), "dct": ([t[0] for t in tails], (), (), ()),
                 "int4": ((), [t[1] for t in tails], [t[2] for t in tails], [t[3] for t in tails])}[kind]
        kp.projection_foreach_project_update_backproject_triton(
            fw, grads, projs, [s[0] for s in fs], [s[2] for s in fs], side, lr, B1, B2, EPS, step, wd, scale,
            *lists, 32 if kind == "int4" else 0, [s[1] for s in fs], [s[3] for s in fs], bs, [])
        for i in range(2):
            assert torch.equal(fw[i], single_w[i]), (kind, i)
            for a, b in zip(fs[i], single_s[i]):
                assert torch.equal(a, b), (kind, i)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_project_adam_8bit_nonfinite_grad(side, bad, device):
    """A non-finite gradient element poisons exactly the blocks of R it reaches: absmax NaN and
    zero codes there, N non-finite where R is; every other block matches the reference."""
    m, n, rank, bs = 37, 300, 5, 64
    gen = torch.Generator().manual_seed(3)
    grad = inputs(m, n, gen, device)
    grad[4, 100] = bad  # right: row 4 of R; left: column 100 of R (block 1 of each row)
    pargs, P = projector("dense", side, m, n, rank, device, gen)
    lshape = (m, rank) if side == "right" else (rank, n)
    cm, am, cv, av = moments8(lshape, bs, device, gen)
    R = RP.project(grad.double(), P.double(), side, torch.float64).float()
    n_ref, ref, xs = adam8_ref(R, cm, am, cv, av, bs)
    state = [t.clone() for t in (cm, am, cv, av)]
    out = kp.projection_project_adam_triton(grad, pargs[0], state[0], state[2], side, B1, B2, EPS,
                                            m_absmax=state[1], v_absmax=state[3], block_size=bs)
    bad_blocks = torch.zeros(state[1].shape, dtype=torch.bool, device=device)
    if side == "right":
        bad_blocks[4, :] = True
    else:
        bad_blocks[:, 100 // bs] = True
    for ab in (state[1], state[3]):
        assert torch.isnan(ab[bad_blocks]).all() and torch.isfinite(ab[~bad_blocks]).all()
    zero_m = int(torch.bucketize(torch.zeros(()), _mids(True, "cpu")))
    zero_v = int(torch.bucketize(torch.zeros(()), _mids(False, "cpu")))
    bad_el = bad_blocks.repeat_interleave(bs, dim=-1)[:, :lshape[1]]
    assert (state[0][bad_el] == zero_m).all() and (state[2][bad_el] == zero_v).all()
    bad_r = ~torch.isfinite(R)  # N is non-finite exactly where R is (a whole row / column of R)
    assert bad_r.sum() in (rank, m) and (bad_r <= bad_el).all()
    assert not torch.isfinite(out[bad_r]).any() and torch.isfinite(out[~bad_r]).all()
    # decoding the poisoned blocks gives NaN, never finite values
    assert torch.isnan(Q.moments_dequantize_ref(state[0], state[1], signed=True, block_size=bs)[bad_el]).all()
    check_q8_state(state, ref, xs, bs, "nonfinite")
    assert_close_f32(out[~bad_el], n_ref[~bad_el], "N", rtol=2e-5)


# --------------------------------------------------------------------------- 8-bit: elementwise adam
@pytest.mark.parametrize("shape,bs", [((37, 53), 64), ((37, 53), 256), ((3, 5, 300), 256), ((301,), 64),
                                      ((9, 1), 256), ((4, 600), 100)])
def test_adam_update_8bit(shape, bs, device):
    """No GEMM: absmax equals the reference exactly, codes up to ties of the update's roundings."""
    gen = torch.Generator().manual_seed(sum(shape) + bs)
    r = torch.randn(shape, generator=gen).to(device)
    cm, am, cv, av = moments8(shape, bs, device, gen)
    n_ref, ref, xs = adam8_ref(r, cm, am, cv, av, bs)
    state = [t.clone() for t in (cm, am, cv, av)]
    out = ka.adam_update_triton(r, state[0], state[2], B1, B2, EPS, m_absmax=state[1], v_absmax=state[3],
                                block_size=bs)
    assert out.dtype == torch.float32 and out.shape == shape
    torch.testing.assert_close(out, n_ref, rtol=fma_slack(1e-6), atol=0.0)
    check_q8_state(state, ref, xs, bs, "adam", exact_absmax=True)


def test_adam_update_8bit_bf16_r_and_noncontiguous_codes(device):
    gen = torch.Generator().manual_seed(2)
    bs = 64
    r = torch.randn(53, 37, generator=gen).to(torch.bfloat16).to(device).T  # strided r
    cm, am, cv, av = moments8((37, 53), bs, device, gen)
    n_ref, ref, xs = adam8_ref(r.float(), cm, am, cv, av, bs)
    cmt = cm.T.contiguous().T  # non-contiguous codes (copied, updated, copied back)
    state = [cmt, am.clone(), cv.clone(), av.clone()]
    out = ka.adam_update_triton(r, state[0], state[2], B1, B2, EPS, m_absmax=state[1], v_absmax=state[3],
                                block_size=bs)
    torch.testing.assert_close(out, n_ref, rtol=fma_slack(1e-6), atol=0.0)
    check_q8_state(state, ref, xs, bs, "adam strided", exact_absmax=True)


def test_adam_foreach_8bit_and_sr(device):
    gen = torch.Generator().manual_seed(9)
    bs = 64
    shapes = [(37, 53), (5, 300), (77,)]
    rs = [torch.randn(s, generator=gen).to(device) for s in shapes]
    states = [moments8(s, bs, device, gen) for s in shapes]
    ns = [torch.full(s, float("nan"), device=device) for s in shapes]  # poisoned outputs
    ref_states = [[t.clone() for t in s] for s in states]
    ref_n = [ka.adam_update_triton(rs[i], ref_states[i][0], ref_states[i][2], B1, B2, EPS,
                                   m_absmax=ref_states[i][1], v_absmax=ref_states[i][3], block_size=bs)
             for i in range(3)]
    ka.adam_foreach_update_triton(rs, [s[0] for s in states], [s[2] for s in states], ns, B1, B2, EPS,
                                  [s[1] for s in states], [s[3] for s in states], bs, [])
    for i in range(3):
        assert torch.equal(ns[i], ref_n[i])
        for a, b in zip(states[i], ref_states[i]):
            assert torch.equal(a, b)
    # bf16 SR: per-entry seeds
    ms = [(0.1 * torch.randn(s, generator=gen)).to(torch.bfloat16).to(device) for s in shapes]
    vs = [(0.01 * torch.rand(s, generator=gen)).to(torch.bfloat16).to(device) for s in shapes]
    ns = [torch.full(s, float("nan"), dtype=torch.bfloat16, device=device) for s in shapes]
    seeds = [3, 4, 2**40 + 5]
    m1, v1 = [t.clone() for t in ms], [t.clone() for t in vs]
    ka.adam_foreach_update_triton(rs, m1, v1, ns, B1, B2, EPS, [], [], 0, seeds)
    for i in range(3):
        m2, v2 = ms[i].clone(), vs[i].clone()
        n2 = ka.adam_update_triton(rs[i], m2, v2, B1, B2, EPS, moment_seed=seeds[i])
        assert torch.equal(m1[i], m2) and torch.equal(v1[i], v2) and torch.equal(ns[i], n2)


# --------------------------------------------------------------------------- 16-bit stochastic rounding
@pytest.mark.parametrize("seed", [0, 7, 123456789, 2**63 - 1])
@pytest.mark.parametrize("shape", [(37, 53), (1000,), (3, 7, 11)])
def test_adam_update_sr_bits(seed, shape, device):
    """The elementwise kernel forms m, v exactly as the reference's torch ops (fused multiply-adds), so the
    stored bf16 bits equal the spec's SR of those float32 values, bit for bit."""
    gen = torch.Generator().manual_seed(seed % 1000 + len(shape))
    r = torch.randn(shape, generator=gen).to(device)
    m0 = (0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16).to(device)
    v0 = (0.01 * torch.rand(shape, generator=gen)).to(torch.bfloat16).to(device)
    m = m0.float().mul(B1).add_(r, alpha=1.0 - B1)  # the reference's float32 update
    v = v0.float().mul(B2).addcmul_(r, r, value=1.0 - B2)
    mt, vt = m0.clone(), v0.clone()
    out = ka.adam_update_triton(r, mt, vt, B1, B2, EPS, moment_seed=seed)
    numel = r.numel()
    assert torch.equal(mt.view(torch.int16), sr_bf16(m, seed).view(torch.int16))
    assert torch.equal(vt.view(torch.int16), sr_bf16(v, seed, numel).view(torch.int16))
    # not round-to-nearest: some values round the other way
    assert (mt != m.to(torch.bfloat16)).any()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (m / (v.sqrt() + EPS)).to(torch.bfloat16).float(), rtol=0, atol=0)


def test_sr_nonfinite_passes_through(device):
    r = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=device)
    m0 = torch.zeros(4, dtype=torch.bfloat16, device=device)
    v0 = torch.zeros(4, dtype=torch.bfloat16, device=device)
    ka.adam_update_triton(r, m0, v0, 0.0, 0.0, EPS, moment_seed=1)
    assert torch.isnan(m0[0]) and m0[1] == float("inf") and m0[2] == -float("inf") and m0[3] == 1.0
    assert torch.isnan(v0[0]) and v0[1] == float("inf") and v0[2] == float("inf")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("seed", [1, 2**35 + 17])
def test_project_adam_sr_bits_exact(side, seed, device):
    """Integer-valued gradient and projector: R is exact whatever the summation order, so the
    float32 moments are too and the stored bf16 bits equal the spec's SR of them."""
    m, n, rank = 37, 53, 5
    gen = torch.Generator().manual_seed(seed % 97)
    grad = (torch.randint(-64, 65, (m, n), generator=gen) / 8.0).to(device)
    P = torch.randint(-4, 5, (rank, n) if side == "right" else (m, rank), generator=gen).float().to(device)
    R = RP.project(grad, P, side, torch.float32)
    lshape = R.shape
    m0 = (torch.randn(lshape, generator=gen) * 4).to(torch.bfloat16).to(device)
    v0 = (torch.rand(lshape, generator=gen) * 16).to(torch.bfloat16).to(device)
    b1, b2 = 0.75, 0.5  # m0 * 0.75, R * 0.25, v0 * 0.5, R^2 * 0.5: exact in float32
    mx = m0.float() * b1 + R * (1.0 - b1)
    vx = v0.float() * b2 + (R * R) * (1.0 - b2)
    mt, vt = m0.clone(), v0.clone()
    out = kp.projection_project_adam_triton(grad, P, mt, vt, side, b1, b2, EPS, moment_seed=seed)
    assert torch.equal(mt.view(torch.int16), sr_bf16(mx, seed).view(torch.int16))
    assert torch.equal(vt.view(torch.int16), sr_bf16(vx, seed, mx.numel()).view(torch.int16))
    assert (mt != mx.to(torch.bfloat16)).any()  # the rounding is not to nearest
    torch.testing.assert_close(out.float(), (mx / (vx.sqrt() + EPS)).to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", SIDES)
def test_project_sr_every_kind(kind, side, device):
    """Random float inputs: each stored moment is one of the two bf16 neighbours of the
    reference's float32 value and equals the spec's SR of it except where the GEMM's rounding
    moved the value across a rounding threshold (rare); the weight update uses N in bf16."""
    m, n, rank, seed = 37, 53, 5, 99
    gen = torch.Generator().manual_seed(4)
    grad = inputs(m, n, gen, device, torch.bfloat16)
    pargs, P = projector(kind, side, m, n, rank, device, gen, dtype=torch.bfloat16 if kind != "int4" else
                         torch.float32)
    R = RP.project(grad.double(), P.double(), side, torch.float64).float()
    lshape = R.shape
    m0 = (0.1 * torch.randn(lshape, generator=gen)).to(torch.bfloat16).to(device)
    v0 = (0.01 * torch.rand(lshape, generator=gen)).to(torch.bfloat16).to(device)
    mx = m0.float().mul(B1).add_(R, alpha=1.0 - B1)
    vx = v0.float().mul(B2).addcmul_(R, R, value=1.0 - B2)
    w0 = inputs(m, n, gen, device, torch.bfloat16)
    w = w0.clone()
    mt, vt = m0.clone(), v0.clone()
    kp.projection_project_update_backproject_triton(w, grad, pargs[0], mt, vt, side, 0.01, B1, B2, EPS, 2, 0.0,
                                                    1.0, *pargs[1:], moment_seed=seed)
    for x, got, off, what in ((mx, mt, 0, "exp_avg"), (vx, vt, mx.numel(), "exp_avg_sq")):
        # SR keeps the truncated bits or adds one unit to them: one of x's two bf16 neighbours
        # (up to the GEMM's rounding of x: a value next to a bf16 may see the neighbour beyond it)
        top = ((x.cpu().view(torch.int32).to(torch.int64) & MASK32) >> 16)
        g16 = got.cpu().view(torch.int16).to(torch.int64) & 0xFFFF
        assert ((g16 - top).abs() <= 1).all() and ((g16 - top) == 1).any() and ((g16 - top) == 0).any(), what
        mism = int((got.view(torch.int16) != sr_bf16(x, seed, off).view(torch.int16)).sum())
        assert mism <= max(2, 0.01 * x.numel()), (what, mism)
    assert (w != w0).any()


# --------------------------------------------------------------------------- bad arguments
def _q8_case(device):
    gen = torch.Generator().manual_seed(0)
    grad = inputs(37, 53, gen, device)
    P = torch.randn(5, 53, generator=gen).to(device)
    cm, am, cv, av = moments8((37, 5), 64, device, gen)
    return grad, P, cm, am, cv, av


@pytest.mark.parametrize("case", ["one_absmax", "block_size_0", "block_size_300", "float_codes", "absmax_shape",
                                  "absmax_dtype", "seed_8bit", "seed_fp32", "block_size_plain", "absmax_strided"])
def test_bad_moment_arguments_raise_and_change_nothing(case, device):
    """Bad moment arguments are rejected by the op layer before the Triton launchers run,
    with every tensor unchanged."""
    _require_triton(device)
    grad, P, cm, am, cv, av = _q8_case(device)
    ea, eas = torch.zeros(37, 5, device=device), torch.zeros(37, 5, device=device)
    kw = dict(m_absmax=am, v_absmax=av, block_size=64)
    a, b = cm, cv
    err, match = ValueError, None
    if case == "one_absmax":
        kw, match = dict(m_absmax=am, block_size=64), "need both m_absmax and v_absmax"
    elif case == "block_size_0":
        kw["block_size"], match = 0, "block_size must be in"
    elif case == "block_size_300":
        kw["block_size"], match = 300, "block_size must be in"
    elif case == "float_codes":
        a, b, err, match = ea, eas, TypeError, "exp_avg must be uint8"
    elif case == "absmax_shape":
        kw["m_absmax"], match = torch.zeros(37, 2, device=device), r"m_absmax must have shape \(37, 1\)"
    elif case == "absmax_dtype":
        kw["v_absmax"], err, match = av.double(), TypeError, "v_absmax must be float32"
    elif case == "seed_8bit":
        kw["moment_seed"], match = 3, "moment_seed"
    elif case == "seed_fp32":
        kw, a, b, match = dict(moment_seed=3), ea, eas, "moment_seed"
    elif case == "block_size_plain":
        kw, a, b, match = dict(block_size=256), ea, eas, "must be 0"
    elif case == "absmax_strided":
        kw["m_absmax"], match = torch.zeros(37, 2, device=device)[:, :1], "m_absmax must be contiguous"
    before = [t.clone() for t in (a, b, am, av)]
    ops_ = torch.ops.lowrank_kernels
    for call in (
        lambda: ops_.projection_project_adam(grad, P, a, b, "right", B1, B2, EPS, **kw),
        lambda: ops_.projection_project_update_backproject(grad.clone(), grad, P, a, b, "right", 0.1, B1, B2, EPS, 1,
                                                           0.0, 1.0, **kw),
        lambda: ops_.adam_update(torch.randn(37, 5, device=device), a, b, B1, B2, EPS, **kw),
    ):
        with use_backend("triton"), pytest.raises(err, match=match):
            call()
        for t, s in zip((a, b, am, av), before):
            assert torch.equal(t, s)


def test_foreach_bad_entry_changes_nothing(device):
    """A bad moment-format entry in the middle of a bucket fails before any entry is written."""
    _require_triton(device)
    gen = torch.Generator().manual_seed(1)
    bs = 64
    rs = [torch.randn(5, 70, generator=gen).to(device) for _ in range(3)]
    states = [moments8((5, 70), bs, device, gen) for _ in range(3)]
    states[1][1] = torch.zeros(5, 3, device=device)  # wrong absmax shape
    before = [[t.clone() for t in s] for s in states]
    ns = [torch.empty(5, 70, device=device) for _ in range(3)]
    with use_backend("triton"), pytest.raises(ValueError, match=r"entry 1|parameter 1"):
        torch.ops.lowrank_kernels.adam_foreach_update(rs, [s[0] for s in states], [s[2] for s in states], ns, B1, B2,
                                                      EPS, [s[1] for s in states], [s[3] for s in states], bs, [])
    for s, b in zip(states, before):
        for t, u in zip(s, b):
            assert torch.equal(t, u)


def test_exact_ties_go_down(device):
    """A normalized value exactly on a decision midpoint takes the lower code (the reference's
    ``bucketize(right=False)``); the row's absmax 1 makes ``x * (1 / absmax) = x`` exact."""
    mids = _mids(True, "cpu")
    r = torch.cat([torch.ones(1), mids[::3], -mids[1::7].abs()]).reshape(1, -1).to(device)
    bs = r.shape[-1]
    cm, am, cv, av = (torch.zeros(r.shape, dtype=torch.uint8, device=device), torch.zeros(1, 1, device=device),
                      torch.zeros(r.shape, dtype=torch.uint8, device=device), torch.zeros(1, 1, device=device))
    ka.adam_update_triton(r, cm, cv, 0.0, 0.0, EPS, m_absmax=am, v_absmax=av, block_size=bs)  # m = r exactly
    assert am.item() == 1.0
    want = torch.bucketize(r.cpu(), mids, right=False)
    assert torch.equal(cm.cpu().long(), want)
    assert torch.equal(cm[0, 1:1 + mids[::3].numel()].cpu().long(), torch.arange(0, 255, 3))


# --------------------------------------------------------------------------- through the ops (router -> triton)
def _op_projector(kind, side, m, n, rank, gen):
    from lowrank_kernels import ops

    k = n if side == "right" else m
    dense = torch.linalg.qr(torch.randn(k, rank, generator=gen, dtype=torch.float64))[0]
    dense = (dense.T if side == "right" else dense).float().contiguous()
    if kind == "dense":
        return dense
    if kind == "dct":
        return ops.DCTProjector(ops.dct_basis(k), torch.randperm(k, generator=gen)[:rank].to(torch.int32))
    return ops.Int4Projector.quantize(dense, 16)


def _require_triton(device="cpu"):
    from ..conftest import require_backend

    require_backend("projection_project_adam", "triton", device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", SIDES)
def test_ops_route_8bit_and_sr_to_triton(kind, side):
    """``ops.project_adam_`` / ``project_update_backproject_`` / ``foreach_..._`` with the triton
    backend against the reference backend: 8-bit codes up to counted ties,
    absmax, N and the weight change; bf16 SR moments one of the two bf16 neighbours."""
    from lowrank_kernels import ops
    from lowrank_kernels.ops import use_backend

    _require_triton()
    m, n, rank, bs = 37, 53, 5, 64
    gen = torch.Generator().manual_seed(21)
    proj = _op_projector(kind, side, m, n, rank, gen)
    grad = torch.randn(m, n, generator=gen)
    lshape = ops.lowrank_shape(m, n, rank, side)
    st0 = ops.moments8_zeros(lshape, block_size=bs)
    # a first step from zeros (both backends), then the compared step
    with use_backend("reference"):
        ops.project_adam_(torch.randn(m, n, generator=gen), proj, st0["exp_avg"], st0["exp_avg_sq"], side=side,
                          m_absmax=st0["m_absmax"], v_absmax=st0["v_absmax"], block_size=bs)
    res = {}
    for be in ("reference", "triton"):
        st = {k: v.clone() for k, v in st0.items()}
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
        w0 = w.clone()
        with use_backend(be):
            nn = ops.project_adam_(grad, proj, st["exp_avg"], st["exp_avg_sq"], side=side, beta1=B1, beta2=B2,
                                   eps=EPS, m_absmax=st["m_absmax"], v_absmax=st["v_absmax"], block_size=bs)
            st2 = {k: v.clone() for k, v in st0.items()}
            ops.project_update_backproject_(w, grad, proj, st2["exp_avg"], st2["exp_avg_sq"], side=side, lr=0.01,
                                            beta1=B1, beta2=B2, eps=EPS, step=2, weight_decay=0.1, scale=0.5,
                                            m_absmax=st2["m_absmax"], v_absmax=st2["v_absmax"], block_size=bs)
            st3 = {k: v.clone() for k, v in st0.items()}
            w3 = [w0.clone()]
            ops.foreach_project_update_backproject_(
                w3, [grad], [proj], [st3["exp_avg"]], [st3["exp_avg_sq"]], side=side, lr=0.01, beta1=B1, beta2=B2,
                eps=EPS, step=2, weight_decay=0.1, scale=0.5, m_absmax=[st3["m_absmax"]],
                v_absmax=[st3["v_absmax"]], block_size=bs)
        res[be] = (nn, st, w, st2, w3[0], st3)
    (rn, rst, rw, rst2, rw3, rst3), (tn, tst, tw, tst2, tw3, tst3) = res["reference"], res["triton"]
    assert tn.dtype == torch.float32
    assert_close_f32(tn, rn, "N", rtol=2e-5)
    assert_change_close(tw, w0, rw, "W", rtol=2e-5)
    assert torch.equal(tw3, tw)  # foreach == single on the triton backend
    for a, b in ((tst, rst), (tst2, rst2), (tst3, rst3)):
        torch.testing.assert_close(a["m_absmax"], b["m_absmax"], rtol=4e-6, atol=0.0)
        torch.testing.assert_close(a["v_absmax"], b["v_absmax"], rtol=4e-6, atol=0.0)
        # the reference's float32 moments are not returned here (the launcher tests above
        # judge each tie against them): adjacent codes only, and few
        for key in ("exp_avg", "exp_avg_sq"):
            diff = a[key].long() - b[key].long()
            assert (diff.abs() <= 1).all() and int((diff != 0).sum()) <= max(2, 0.01 * diff.numel()), key

    # bf16 stochastic rounding through the ops (bf16 gradient: the op takes moments in float32
    # or the parameter's dtype)
    grad = grad.to(torch.bfloat16)
    if isinstance(proj, torch.Tensor):
        proj = proj.to(torch.bfloat16)
    ea0 = (0.1 * torch.randn(lshape, generator=gen)).to(torch.bfloat16)
    eas0 = (0.01 * torch.rand(lshape, generator=gen)).to(torch.bfloat16)
    got = {}
    for be in ("reference", "triton"):
        ea, eas = ea0.clone(), eas0.clone()
        with use_backend(be):
            nn = ops.project_adam_(grad, proj, ea, eas, side=side, beta1=B1, beta2=B2, eps=EPS, moment_seed=5)
        got[be] = (nn, ea, eas)
    for i in (1, 2):
        d = (_bits16(got["triton"][i]) - _bits16(got["reference"][i])).abs()
        assert (d <= 1).all() and int((d != 0).sum()) <= max(2, 0.01 * d.numel())


def _bits16(t):
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.parametrize("shape,bs", [((37, 53), 64), ((3, 300), 256)])
def test_ops_adam_update_8bit_and_sr_triton_equals_reference(shape, bs):
    """No GEMM: the triton backend of ``ops.adam_update_`` / ``adam_foreach_update_`` equals the
    reference backend bit for bit (the kernel's float32 update rounds as torch's fused
    multiply-adds): absmax, codes, and the bf16 stochastic-rounding bits; N to 1e-6."""
    from lowrank_kernels import ops
    from lowrank_kernels.ops import use_backend

    _require_triton()
    gen = torch.Generator().manual_seed(8)
    r = torch.randn(shape, generator=gen)
    cm, am, cv, av = moments8(shape, bs, "cpu", gen)
    out = {}
    for be in ("reference", "triton"):
        st = [t.clone() for t in (cm, am, cv, av)]
        with use_backend(be):
            nn = ops.adam_update_(r, st[0], st[2], beta1=B1, beta2=B2, eps=EPS, m_absmax=st[1], v_absmax=st[3],
                                  block_size=bs)
            stf = [t.clone() for t in (cm, am, cv, av)]
            nf = ops.foreach_adam_update_([r], [stf[0]], [stf[2]], beta1=B1, beta2=B2, eps=EPS, m_absmax=[stf[1]],
                                          v_absmax=[stf[3]], block_size=bs)
        out[be] = (nn, st, nf[0], stf)
    (rn, rst, rnf, rstf), (tn, tst, tnf, tstf) = out["reference"], out["triton"]
    for n_, st_, n_r, st_r in ((tn, tst, rn, rst), (tnf, tstf, rnf, rstf)):
        # N: one last-bit difference of m / (sqrt(v) + eps) under the interpreter (not investigated)
        torch.testing.assert_close(n_, n_r, rtol=fma_slack(1e-6), atol=0.0)
        if FMA_ROUNDS_TWICE:  # one rounding of the product term apart (python_tests/_interpreter.py)
            for a, b in zip(st_[1::2], st_r[1::2]):  # absmax
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
            for a, b in zip(st_[0::2], st_r[0::2]):  # codes: equal or adjacent (a value at a midpoint)
                d = (a.long() - b.long()).abs()
                assert int(d.max()) <= 1 and int((d > 0).sum()) <= max(2, 0.01 * d.numel())
            continue
        for a, b in zip(st_, st_r):
            assert torch.equal(a, b)
    # bf16 stochastic rounding (bf16 r: the op takes moments in float32 or r's dtype)
    rb = (r * 1e-3).to(torch.bfloat16)
    m0 = (1e-3 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    v0 = (1e-6 * torch.rand(shape, generator=gen)).to(torch.bfloat16)
    res = []
    for be in ("reference", "triton"):
        ea, eas = m0.clone(), v0.clone()
        with use_backend(be):
            nn = ops.adam_update_(rb, ea, eas, beta1=B1, beta2=B2, eps=EPS, moment_seed=2**33 + 1)
        res.append((ea, eas, nn))
    for a, b in zip(res[0], res[1]):
        assert torch.equal(_bits16(a), _bits16(b))
    v32 = v0.float().mul(B2).addcmul_(rb.float(), rb.float(), value=1.0 - B2)
    assert (res[1][1] != v32.to(torch.bfloat16)).any()  # stochastic, not to nearest


# --------------------------------------------------------------------------- tile policy of the 8-bit kernel
def test_q8_tiles_own_whole_blocks():
    """``project_q8`` tiles: ``bn = max(16, next_pow2(min(block_size, N)))`` lanes for one block per
    program, at most 4096 elements (the float moments' 64 x 64), every arch and projector mode."""
    L = pytest.importorskip("lowrank_kernels.kernels._launch")
    for arch in (None, 80, 86, 89, 90, 120):
        for mode in (0, 1, 2):
            for qblock, bn in ((256, 256), (200, 256), (129, 256), (128, 128), (64, 64), (33, 64), (5, 16), (1, 16)):
                t = L.choose_config("project_q8", arch, M=300, N=1000, K=77, op_bytes=[2, 2], side="left", mode=mode,
                                    qblock=qblock)
                assert t.bn == bn and t.bn >= qblock, (arch, mode, qblock, t)
                if arch is not None:
                    assert t.bm * t.bn <= 4096 and t.bm >= 16
                    assert t in L.candidates("project_q8", arch, wide=False, mode=mode, qblock=qblock)
    with pytest.raises(ValueError, match="qblock must be in"):
        L.choose_config("project_q8", 90, M=10, N=10, K=10, op_bytes=[2, 2], qblock=0)
