"""8-bit blockwise moments (reference format): map, quantize/dequantize against bitsandbytes and
against independent math, bytes, errors."""
import math

import pytest
import torch

from lowrank_kernels.reference import moments as Q

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_map_equals_bitsandbytes(signed):
    ours = Q.moments_dynamic_map(signed)
    ref = bnb_functional.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, ref.to(torch.float32))
    assert torch.all(ours[1:] > ours[:-1])  # sorted, no duplicate
    assert ours.max() == 1.0 and (ours.min() == 0.0 if not signed else ours.min() < -0.99)
    assert Q.moments_dynamic_map(signed) is ours  # built once per device


def _moment(signed, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, generator=gen) * torch.logspace(-4, 0, n)[torch.randperm(n, generator=gen)]
    return x if signed else x.square()  # second moments are >= 0, spread over decades


def _ties(x, absmax, signed, block):
    """Elements whose normalized value lies within float32 rounding of a decision boundary."""
    values = Q.moments_dynamic_map(signed).double()
    mids = (values[:-1] + values[1:]) / 2
    scale = absmax.double().repeat_interleave(block, dim=-1)[..., : x.shape[-1]]
    normed = x.double() / torch.where(scale > 0, scale, torch.ones_like(scale))
    dist = (normed.unsqueeze(-1) - mids).abs().min(dim=-1).values
    return dist <= 4 * torch.finfo(torch.float32).eps * normed.abs().clamp(min=1e-30)


def _bnb_reference_quantize(x, code, blocksize):
    """bitsandbytes' PyTorch implementation of quantize_blockwise (its "default" kernel: nearest
    rounding through float32 midpoints, the semantics of its CUDA kernel), called directly:
    on CPU tensors the public function runs bitsandbytes' native CPU kernel instead."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, x, code, blocksize)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [256, 1000, 4096 + 77, 65536])
def test_codes_equal_bitsandbytes_one_row(signed, n):
    x = _moment(signed, n, seed=n + signed)
    codes, absmax = Q.moments_quantize_ref(x, signed=signed, block_size=256)
    code = bnb_functional.create_dynamic_map(signed=signed)
    ref_codes, ref_absmax = _bnb_reference_quantize(x, code, 256)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == (1, math.ceil(n / 256)) and absmax.dtype == torch.float32
    # one row: our row blocks are bitsandbytes' flat blocks
    assert torch.equal(absmax.flatten(), ref_absmax.flatten())
    differ = codes != ref_codes.reshape(x.shape)
    ties = _ties(x, absmax, signed, 256)
    n_diff = int(differ.sum())
    # codes differ only at (near-)exact ties, and then by one step of the map
    assert not (differ & ~ties).any(), f"{n_diff} codes differ, {int((differ & ~ties).sum())} away from a tie"
    if n_diff:
        assert (codes.int() - ref_codes.reshape(x.shape).int())[differ].abs().max().item() == 1
    assert n_diff <= max(2, n // 2000), f"{n_diff} tie codes differ out of {n} ({int(ties.sum())} near ties)"
    # dequantize: bitsandbytes' public function on our codes and absmax gives our values exactly
    ours = Q.moments_dequantize_ref(codes, absmax, signed=signed, block_size=256)
    ref = bnb_functional.dequantize_blockwise(codes.flatten(), absmax=absmax.flatten(), code=code, blocksize=256)
    assert torch.equal(ours.flatten(), ref)


@pytest.mark.parametrize("signed", [True, False])
def test_never_farther_than_bitsandbytes_native_cpu_kernel(signed):
    """bitsandbytes' public quantize_blockwise on CPU (its native kernel) does not always pick
    the nearest entry (a coarse search; here it differs on a large share of small values);
    our code is never farther from the value than its choice, with the same absmax."""
    x = _moment(signed, 8192, seed=11)
    codes, absmax = Q.moments_quantize_ref(x, signed=signed)
    code = bnb_functional.create_dynamic_map(signed=signed)
    native, state = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(absmax.flatten(), state.absmax)
    values = code.double()
    normed = x.double() / absmax.double().repeat_interleave(256, dim=-1)
    ours_err = (values[codes.long()] - normed).abs()
    native_err = (values[native.long()] - normed).abs()
    assert torch.all(ours_err <= native_err + 1e-12)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_rounding_independent(signed):
    """Every element decodes to the map entry nearest its normalized value (float64 check)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 300, generator=gen) * 3  # 2 blocks per row: 256 + 44
    if not signed:
        x = x.square()
    codes, absmax = Q.moments_quantize_ref(x, signed=signed, block_size=256)
    assert absmax.shape == (37, 2)
    torch.testing.assert_close(absmax[:, 0], x[:, :256].abs().amax(1), rtol=0, atol=0)
    torch.testing.assert_close(absmax[:, 1], x[:, 256:].abs().amax(1), rtol=0, atol=0)
    values = Q.moments_dynamic_map(signed).double()
    scale = torch.cat([absmax[:, :1].expand(37, 256), absmax[:, 1:].expand(37, 44)], 1).double()
    normed = x.double() / scale
    dist = (normed.unsqueeze(-1) - values).abs()
    best = dist.min(-1).values
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= best + 1e-7)  # nearest (up to float32 ties)
    deq = Q.moments_dequantize_ref(codes, absmax, signed=signed)
    torch.testing.assert_close(deq.double(), values[codes.long()] * scale, rtol=1e-7, atol=0)
    rel = ((deq - x).abs() / x.abs().clamp(min=1e-12))[x.abs() > 1e-3 * scale.float()]
    assert rel.median() < 0.03  # bitsandbytes-like round-trip error on spread values


def test_blocks_stay_inside_rows_and_shards_align():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 513, generator=gen)
    codes, absmax = Q.moments_quantize_ref(x, signed=True, block_size=128)
    assert absmax.shape == (6, 5)
    for i in range(6):
        c, a = Q.moments_quantize_ref(x[i:i + 1], signed=True, block_size=128)
        assert torch.equal(c, codes[i:i + 1]) and torch.equal(a, absmax[i:i + 1])  # row-local
    top, bottom = Q.moments_quantize_ref(x[:4], signed=True, block_size=128), Q.moments_quantize_ref(x[4:], signed=True, block_size=128)
    assert torch.equal(torch.cat([top[0], bottom[0]]), codes) and torch.equal(torch.cat([top[1], bottom[1]]), absmax)


def test_zero_block_and_extremes():
    x = torch.zeros(2, 300)
    x[1, 260] = -5.0
    codes, absmax = Q.moments_quantize_ref(x, signed=True)
    assert absmax[0].eq(0).all() and absmax[1, 1] == 5.0
    deq = Q.moments_dequantize_ref(codes, absmax, signed=True)
    assert torch.isfinite(deq).all() and deq[0].eq(0).all()
    assert deq[1, 260] == pytest.approx(-5.0 * 0.99297, rel=1e-4)  # the signed map's most negative entry
    v = torch.tensor([[0.0, 1e-9, 2.0]])
    c, a = Q.moments_quantize_ref(v, signed=False)
    d = Q.moments_dequantize_ref(c, a, signed=False)
    assert d[0, 0] == 0 and d[0, 2] == 2.0


@pytest.mark.parametrize("shape", [(4096, 128), (123, 77), (1, 256), (7, 257), (2, 3, 300)])
def test_nbytes_formula_matches_tensors(shape):
    x = torch.randn(shape)
    m = Q.moments_quantize_ref(x, signed=True)
    v = Q.moments_quantize_ref(x.square(), signed=False)
    measured = sum(t.numel() * t.element_size() for t in (*m, *v))
    rows = math.prod(shape[:-1])
    assert measured == 2 * math.prod(shape) + 8 * rows * math.ceil(shape[-1] / 256)
    assert Q.moments8_nbytes(shape) == measured
    assert Q.moment_nbytes(shape) * 2 == measured


def test_bf16_input_and_dtype_out():
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    codes, absmax = Q.moments_quantize_ref(x, signed=True)
    out = Q.moments_dequantize_ref(codes, absmax, signed=True, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and absmax.dtype == torch.float32
    ref_codes, _ = Q.moments_quantize_ref(x.float(), signed=True)
    assert torch.equal(codes, ref_codes)


def test_bad_inputs():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="block_size must be an int in \\[1, 256\\]"):
        Q.moments_quantize_ref(x, signed=True, block_size=512)
    with pytest.raises(TypeError, match="x must be floating point"):
        Q.moments_quantize_ref(torch.ones(3, 3, dtype=torch.int32), signed=True)
    with pytest.raises(ValueError, match="0-d"):
        Q.moments_quantize_ref(torch.tensor(1.0), signed=True)
    with pytest.raises(TypeError, match="signed must be a bool"):
        Q.moments_quantize_ref(x, signed=1)
    codes, absmax = Q.moments_quantize_ref(x, signed=True)
    with pytest.raises(TypeError, match="codes must be uint8"):
        Q.moments_dequantize_ref(codes.int(), absmax, signed=True)
    with pytest.raises(TypeError, match="absmax must be a float32"):
        Q.moments_dequantize_ref(codes, absmax.double(), signed=True)
    with pytest.raises(ValueError, match="absmax must have shape \\(4, 1\\)"):
        Q.moments_dequantize_ref(codes, absmax[:2], signed=True)
