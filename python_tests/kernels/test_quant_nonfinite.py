"""Non-finite values in the quant ops, on every backend (reference, C++, Triton).

Documented behaviour (lowrank_kernels/reference/quant.py, "Non-finite values"): a group
holding a NaN or an infinity gets scale = minimum = NaN and all its levels 0, so it
dequantizes to NaN; the other groups are quantized exactly as without the bad value.
A NaN must never be silently quantized to a level (GPU min/max drop NaNs)."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend

GS = 16


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    require_backend("quant_int4_pack", request.param)
    return request.param


def _data(bad):
    """7 x 9 = 63 values in 4 groups of 16 (the last one short); ``bad`` written into group 1
    (flat index 21) and into the short last group (index 62)."""
    x = torch.randn(7, 9, generator=torch.Generator().manual_seed(3))
    clean = x.clone()
    x.view(-1)[21] = bad
    x.view(-1)[62] = bad
    return x, clean


BADS = [float("nan"), float("inf"), float("-inf")]
BAD_GROUPS = [1, 3]
GOOD = torch.tensor([True, False, True, False])


def _per_elem(mask_groups, numel):
    return mask_groups.repeat_interleave(GS)[:numel]


@pytest.mark.parametrize("bad", BADS, ids=["nan", "inf", "-inf"])
def test_int8_quantize_poisons_only_the_bad_groups(backend, bad):
    x, clean = _data(bad)
    with use_backend(backend):
        q, s, mn = ops.int8_quantize(x, group_size=GS)
        q0, s0, mn0 = ops.int8_quantize(clean, group_size=GS)
        deq = ops.int8_dequantize(q, s, mn, group_size=GS)
    assert torch.isnan(s[BAD_GROUPS]).all() and torch.isnan(mn[BAD_GROUPS]).all()
    assert torch.equal(s[GOOD], s0[GOOD]) and torch.equal(mn[GOOD], mn0[GOOD])
    good_e = _per_elem(GOOD, 63)
    assert (q.view(-1)[~good_e] == 0).all()
    assert torch.equal(q.view(-1)[good_e], q0.view(-1)[good_e])
    assert torch.isnan(deq.view(-1)[~good_e]).all() and torch.isfinite(deq.view(-1)[good_e]).all()


@pytest.mark.parametrize("bad", BADS, ids=["nan", "inf", "-inf"])
def test_int4_pack_poisons_only_the_bad_groups(backend, bad):
    x, clean = _data(bad)
    with use_backend(backend):
        p, s, mn = ops.int4_pack(x, group_size=GS)
        p0, s0, mn0 = ops.int4_pack(clean, group_size=GS)
        deq = ops.int4_unpack(p, s, mn, x.shape, group_size=GS)
    assert torch.isnan(s[BAD_GROUPS]).all() and torch.isnan(mn[BAD_GROUPS]).all()
    assert torch.equal(s[GOOD], s0[GOOD]) and torch.equal(mn[GOOD], mn0[GOOD])
    nib = torch.stack([p.long() & 15, p.long() >> 4], 1).view(-1)[:63]
    nib0 = torch.stack([p0.long() & 15, p0.long() >> 4], 1).view(-1)[:63]
    good_e = _per_elem(GOOD, 63)
    assert (nib[~good_e] == 0).all() and torch.equal(nib[good_e], nib0[good_e])
    assert torch.isnan(deq.view(-1)[~good_e]).all() and torch.isfinite(deq.view(-1)[good_e]).all()


@pytest.mark.parametrize("bad", BADS, ids=["nan", "inf", "-inf"])
def test_int8_update_sr_poisons_only_the_bad_groups(backend, bad):
    w = torch.randn(7, 9, generator=torch.Generator().manual_seed(5))
    upd, clean = _data(bad)
    with use_backend("reference"):
        q_init, s_init, mn_init = ops.int8_quantize(w, group_size=GS)
    outs = []
    for u in (upd, clean):
        q, s, mn = q_init.clone(), s_init.clone(), mn_init.clone()
        with use_backend(backend):
            ops.int8_update_sr_(q, s, mn, u, decay=0.99, alpha=-0.1, seed=11, group_size=GS)
        outs.append((q, s, mn))
    (q, s, mn), (q0, s0, mn0) = outs
    assert torch.isnan(s[BAD_GROUPS]).all() and torch.isnan(mn[BAD_GROUPS]).all()
    assert torch.equal(s[GOOD], s0[GOOD]) and torch.equal(mn[GOOD], mn0[GOOD])
    good_e = _per_elem(GOOD, 63)
    assert (q.view(-1)[~good_e] == 0).all() and torch.equal(q.view(-1)[good_e], q0.view(-1)[good_e])
    # A poisoned group stays poisoned through the next update (NaN stats in, NaN out).
    with use_backend(backend):
        ops.int8_update_sr_(q, s, mn, clean, decay=0.99, alpha=-0.1, seed=12, group_size=GS)
    assert torch.isnan(s[BAD_GROUPS]).all() and torch.isfinite(s[GOOD]).all()


def test_backends_agree_bitwise_on_nonfinite_groups():
    """Levels, scales and minima of every available backend equal the reference's (NaN == NaN)."""
    x, _ = _data(float("nan"))
    with use_backend("reference"):
        ref8 = ops.int8_quantize(x, group_size=GS)
        ref4 = ops.int4_pack(x, group_size=GS)
    seen = 0
    for b in reg.BACKENDS:
        if reg.why_unavailable(reg.OPS["quant_int4_pack"], b, torch.device("cpu")) is not None:
            continue
        seen += 1
        with use_backend(b):
            o8 = ops.int8_quantize(x, group_size=GS)
            o4 = ops.int4_pack(x, group_size=GS)
        for r, o in zip(ref8 + ref4, o8 + o4):
            assert torch.equal(r, o) if not r.is_floating_point() else torch.equal(r.isnan(), o.isnan()) and \
                torch.equal(r.nan_to_num(), o.nan_to_num()), b
    assert seen >= 1
