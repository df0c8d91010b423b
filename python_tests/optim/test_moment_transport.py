"""Projection-aware moments (``moment_transport=True``, LDAdam's rule) on GaLoreAdamW and DCTAdamW.

- an unchanged projector leaves every step bit-identical to ``moment_transport=False``;
- a rotated basis of the same subspace moves the first moment by the rotation, so it equals
  the moment of a run that used the new basis from the start (and, for a signed
  permutation, the second moment and the weights too);
- the second moment follows LDAdam's equation (checked against a float64 restatement);
- DCT: the change of basis is a selection (kept indices move, new ones start at zero),
  bit-identical to ``moment_refresh="reindex"``;
- 8-bit / 16-bit moments are transported (dequantize, transport, requantize);
- a checkpoint round trip across a transporting refresh is bit-identical;
- the bucketed step and the per-parameter one agree bitwise with transport on.
"""
import copy

import pytest
import torch

from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, GradNormLoRPAdamW, QGaLoreAdamW
from lowrank_kernels.optim import transport as T

from ._helpers import grad_sequence, roundtrip

BETAS = (0.9, 0.99)


def _orth(k, seed):
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


class _Preset(GaLoreAdamW):
    """GaLore whose refreshes return preset projectors (``plan[step]``), so a test picks the
    change of basis."""

    plan = {}

    def _compute_projector(self, p, grad, state, group, step):
        proj = self.plan[step]  # fresh contiguous copies, as a real refresh returns
        if isinstance(proj, tuple):
            return tuple(t.to(p.dtype).contiguous().clone() for t in proj)
        return proj.to(p.dtype).contiguous().clone()


def _preset(plan):
    return type("Preset", (_Preset,), {"plan": plan})


def _run(cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = cls([{"params": [p], "rank": kw.pop("rank", 4), "update_proj_gap": kw.pop("gap", 2), **kw}],
              lr=1e-2, betas=BETAS, weight_decay=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


def _same(a, b):
    assert torch.equal(a, b), (a - b).abs().max()


# ------------------------------------------------------------------ unchanged projector: bit-identical
@pytest.mark.parametrize("side", ["right", "left", "full"])
@pytest.mark.parametrize("bits", [32, 16, 8])
def test_unchanged_projector_keeps_the_step_bit_identical(side, bits):
    shape = (24, 16)
    g = grad_sequence(shape, 1)[0]
    grads = [g.clone() for _ in range(6)]  # one gradient: every refresh returns the same projector
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    kw = dict(proj_type=side, moment_bits=bits, min_8bit_size=0, block_size=8)
    calls = []
    orig = T.transport_moments_

    def spy(*a, **k):
        calls.append(orig(*a, **k))
        return calls[-1]

    T.transport_moments_ = spy
    try:
        p1, o1 = _run(GaLoreAdamW, w0, grads, moment_transport=True, **kw)
    finally:
        T.transport_moments_ = orig
    p0, o0 = _run(GaLoreAdamW, w0, grads, **kw)
    assert calls == [False, False]  # refreshes at steps 3 and 5 found the projector unchanged
    _same(p1, p0)
    for k, v in o0.state[p0].items():
        _same(o1.state[p1][k], v)


def test_unchanged_indices_keep_the_dct_step_bit_identical():
    shape = (24, 16)
    g = grad_sequence(shape, 1)[0]
    grads = [g.clone() for _ in range(6)]
    w0 = torch.randn(shape)
    p1, o1 = _run(DCTAdamW, w0, grads, moment_transport=True)
    p0, o0 = _run(DCTAdamW, w0, grads)
    _same(p1, p0)
    _same(o1.state[p1]["exp_avg"], o0.state[p0]["exp_avg"])


# ------------------------------------------------------------------ a rotated basis moves the moments
@pytest.mark.parametrize("side", ["right", "left"])
def test_signed_permutation_moves_both_moments_exactly(side):
    """P_new = O P_old with O a signed permutation: the transported moments (both of them)
    and the weights equal those of a run that used P_new from the first step."""
    m, n, r = 24, 16, 4
    grads = grad_sequence((m, n), 5, dtype=torch.float64)
    w0 = torch.randn(m, n, dtype=torch.float64)
    basis = _orth(n if side == "right" else m, 7)
    p_old = basis[:r] if side == "right" else basis[:, :r]
    o = torch.eye(r, dtype=torch.float64)[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)[:, None]
    p_new = o @ p_old if side == "right" else p_old @ o.T
    kw = dict(proj_type=side, gap=3)
    moved, om = _run(_preset({1: p_old, 4: p_new}), w0, grads, moment_transport=True, **kw)
    ref, orf = _run(_preset({1: p_new, 4: p_new}), w0, grads, **kw)
    kept, ok = _run(_preset({1: p_old, 4: p_new}), w0, grads, **kw)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(om.state[moved][k], orf.state[ref][k], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(moved, ref, rtol=1e-12, atol=1e-15)
    assert (kept - ref).abs().max() > 1e-4  # without transport the stale moments change the step


@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_rotation_moves_first_moment_and_second_by_ldadam(side):
    """A general rotation inside the subspace: the first moment after the refresh equals the
    run that used the new basis all along; the second follows LDAdam's equation."""
    m, n, r = 24, 16, 4
    grads = grad_sequence((m, n), 4, dtype=torch.float64)
    w0 = torch.randn(m, n, dtype=torch.float64)
    bl, br = _orth(m, 11), _orth(n, 12)
    ol, orr = _orth(r, 13), _orth(r, 14)
    u0, v0 = bl[:, :r], br[:r]
    u1, v1 = u0 @ ol, orr @ v0
    plans = {"right": (v0, v1), "left": (u0, u1), "full": ((u0, v0), (u1, v1))}
    old, new = plans[side]
    kw = dict(proj_type=side, gap=3)
    # state after step 3 (before the refresh at step 4), then call the refresh hook alone
    p, opt = _run(_preset({1: old, 4: new}), w0, grads[:3], moment_transport=True, **kw)
    st = opt.state[p]
    m_old, v_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    group = opt.param_groups[0]
    assert opt._refresh_projector(p, grads[3], st, group, 4)
    ref_p, ref_opt = _run(_preset({1: new, 4: new}), w0, grads[:3], **kw)
    torch.testing.assert_close(st["exp_avg"], ref_opt.state[ref_p]["exp_avg"], rtol=1e-10, atol=1e-13)
    # LDAdam's second moment, written out (k = 3 accumulated steps)
    c1, c2 = 1 - BETAS[0] ** 3, 1 - BETAS[1] ** 3
    ql = None if side == "right" else ol.T
    qr = None if side == "left" else orr.T
    var = v_old / c2 - (m_old / c1) ** 2
    mm = m_old
    if ql is not None:
        var, mm = (ql * ql) @ var, ql @ mm
    if qr is not None:
        var, mm = var @ (qr * qr), mm @ qr
    want_v = c2 * (var + (mm / c1) ** 2).abs()
    torch.testing.assert_close(st["exp_avg_sq"], want_v, rtol=1e-10, atol=1e-15)
    assert (st["exp_avg_sq"] - v_old).abs().max() > 1e-6


def test_change_of_basis_layouts():
    r = 3
    b = _orth(8, 1)
    o = _orth(r, 2)
    right_old, left_old = b[:r], b[:, :r]
    torch.testing.assert_close(T.change_of_basis(right_old, o @ right_old, "right"), o.T)
    torch.testing.assert_close(T.change_of_basis(left_old, left_old @ o, "left"), o.T)


# ------------------------------------------------------------------ DCT: a selection
def test_dct_transport_is_a_selection():
    m, n, r = 24, 16, 4
    grads = grad_sequence((m, n), 3)
    p, opt = _run(DCTAdamW, torch.randn(m, n), grads[:2], moment_transport=True, gap=2, rank=r)
    st = opt.state[p]
    old_idx = st["indices"].clone()
    m_old, v_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    keep = [int(old_idx[2]), int(old_idx[0])]
    fresh = [i for i in range(n) if i not in old_idx.tolist()][:2]
    new_idx = torch.tensor([fresh[0], keep[0], fresh[1], keep[1]], dtype=torch.int32)
    opt._compute_projector = lambda *a: new_idx.clone()
    assert opt._refresh_projector(p, grads[2], st, opt.param_groups[0], 3)
    assert torch.equal(st["indices"], new_idx)
    for new_pos, old_pos in ((1, 2), (3, 0)):  # kept vectors carry their columns (right side: m x r)
        _same(st["exp_avg"][:, new_pos], m_old[:, old_pos])
        _same(st["exp_avg_sq"][:, new_pos], v_old[:, old_pos])
    for new_pos in (0, 2):  # new vectors start at zero
        assert not st["exp_avg"][:, new_pos].any() and not st["exp_avg_sq"][:, new_pos].any()


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_dct_transport_equals_reindex(shape):
    grads = grad_sequence(shape, 7)
    w0 = torch.randn(shape)
    p1, o1 = _run(DCTAdamW, w0, grads, moment_transport=True, gap=2)
    p0, o0 = _run(DCTAdamW, w0, grads, moment_refresh="reindex", gap=2)
    pk, _ = _run(DCTAdamW, w0, grads, gap=2)
    _same(p1, p0)
    assert not torch.equal(p1, pk)


# ------------------------------------------------------------------ moment formats
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lowbit_moments_are_transported(bits, side):
    """8-bit: dequantize, transport, requantize; 16-bit: bfloat16 rounded to nearest. The
    transported moments match the float32 transport of the same (dequantized) moments to the
    format's resolution."""
    m, n, r = 32, 24, 4
    grads = grad_sequence((m, n), 3)
    bl, br = _orth(m, 21).float(), _orth(n, 22).float()
    o = _orth(r, 23).float()
    old, new = (br[:r], o @ br[:r]) if side == "right" else (bl[:, :r], bl[:, :r] @ o.T)
    kw = dict(proj_type=side, gap=3, moment_bits=bits, min_8bit_size=0, block_size=8)
    p, opt = _run(_preset({1: old, 3: new}), torch.randn(m, n), grads[:2], moment_transport=True, **kw)
    st = opt.state[p]
    fmt_bs = opt.param_groups[0]["block_size"]
    m32 = T._read(st, "exp_avg", True, fmt_bs, torch.float32)
    v32 = T._read(st, "exp_avg_sq", False, fmt_bs, torch.float32)
    ptrs = {k: v.data_ptr() for k, v in st.items()}
    q = T.change_of_basis(old, new, side)
    want_m, want_v = T.transport(m32, v32, q if side == "left" else None, q if side == "right" else None,
                                 1 - BETAS[0] ** 2, 1 - BETAS[1] ** 2)
    assert opt._refresh_projector(p, grads[2], st, opt.param_groups[0], 3)
    assert {k: v.data_ptr() for k, v in st.items()} == ptrs  # in place
    got_m = T._read(st, "exp_avg", True, fmt_bs, torch.float32)
    got_v = T._read(st, "exp_avg_sq", False, fmt_bs, torch.float32)
    tol = 2e-2 if bits == 8 else 1e-2
    assert (got_m - want_m).abs().max() <= tol * want_m.abs().max()
    assert (got_v - want_v).abs().max() <= tol * want_v.abs().max()
    assert (got_m - m32).abs().max() > 0.1 * m32.abs().max()  # they did move


# ------------------------------------------------------------------ checkpoint, bucketing
@pytest.mark.parametrize("cls,kw", [
    (GaLoreAdamW, dict()), (GaLoreAdamW, dict(moment_bits=8, min_8bit_size=0, block_size=8)),
    (GaLoreAdamW, dict(proj_type="full")), (DCTAdamW, dict())], ids=["galore", "galore-8bit", "galore-full", "dct"])
def test_checkpoint_roundtrip_across_a_transporting_refresh(cls, kw):
    shape = (24, 16)
    grads = grad_sequence(shape, 8)
    w0 = torch.randn(shape)
    p, opt = _run(cls, w0, grads, moment_transport=True, **kw)
    q, half = _run(cls, w0, grads[:3], moment_transport=True, **kw)
    sd = roundtrip(copy.deepcopy(half.state_dict()))
    r = torch.nn.Parameter(q.detach().clone())
    resumed = cls([{"params": [r], "rank": 4, "update_proj_gap": 2, **kw}], lr=1e-2, betas=BETAS, weight_decay=0.01,
                  moment_transport=True)
    resumed.load_state_dict(sd)
    for g in grads[3:]:
        r.grad = g.clone()
        resumed.step()
    _same(r, p)
    for k, v in opt.state[p].items():
        _same(resumed.state[r][k], v)


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_bucketed_and_per_parameter_steps_agree(cls):
    shapes = [(24, 16), (16, 24), (24, 16), (20, 12)]
    gens = [grad_sequence(s, 7, seed=i + 5) for i, s in enumerate(shapes)]
    w0 = [torch.randn(s) for s in shapes]
    outs = []
    for foreach in (None, False):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = cls([{"params": ps, "rank": 4, "update_proj_gap": 2, "foreach": foreach}], lr=1e-2,
                  moment_transport=True)
        for t in range(7):
            for p, g in zip(ps, gens):
                p.grad = g[t].clone()
            opt.step()
        outs.append(ps)
    for a, b in zip(*outs):
        _same(a, b)


# ------------------------------------------------------------------ errors
def test_bad_values_are_refused_with_their_name():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError, match="moment_transport must be a bool"):
        GaLoreAdamW([p], rank=2, moment_transport=1)
    with pytest.raises(TypeError, match="moment_transport must be a bool"):
        DCTAdamW([p], rank=2, moment_transport="yes")
    with pytest.raises(ValueError, match="moment_transport=True.*moment_refresh='reset'"):
        DCTAdamW([p], rank=2, moment_transport=True, moment_refresh="reset")
    with pytest.raises(ValueError, match="moment_transport=True is not supported by QGaLoreAdamW"):
        QGaLoreAdamW([{"params": [p], "rank": 2, "moment_transport": True}])
    with pytest.raises(ValueError, match="moment_transport=True is not supported by GradNormLoRPAdamW"):
        GradNormLoRPAdamW([{"params": [p], "rank": 2, "moment_transport": True}])
