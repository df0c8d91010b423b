"""The fira list op (``foreach_fira_update_``): every backend (C++, Triton under the
interpreter) against the reference on odd shapes, both sides, dense and DCT projectors, with
and without the limiter, the moment formats; the C++ op bitwise against the per-weight ops
it replaces; clear errors with nothing written."""
import math

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend
from .test_method_steps import SHAPES, _close, _moments, _run


def _fira_args(side, dct, limiter, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 2, 4]
    ps = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    projs, idx = [], []
    for (m, n), r in zip(SHAPES, ranks):
        k = n if side == "right" else m
        if dct:
            projs.append(ops.dct_basis(k))
            idx.append(torch.randperm(k, generator=gen)[:r].to(torch.int32))
        else:
            q = torch.linalg.qr(torch.randn(k, r, generator=gen)).Q
            projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, r) if side == "right" else (r, n) for (m, n), r in zip(SHAPES, ranks)]
    ea, es, kw = _moments(low, bits, gen)
    # prev norms: +inf (a first step), one that limits, one that does not
    prev = [torch.tensor(math.inf), torch.tensor(0.05), torch.tensor(1e3)] if limiter else None
    return ps, gs, projs, ea, es, dict(side=side, beta1=0.9, beta2=0.99, eps=1e-6, scale=[0.25, 1.0, 0.5],
                                       mix=[1.0, 0.25, 1.0], alpha=[-1e-2, -2e-2, -3e-3], decay=[0.99, 1.0, 0.9],
                                       indices=idx if dct else None, prev_norm=prev,
                                       gamma=[1.01, 1.01, 1.5] if limiter else None, **kw)


CASES = [("right", False, True, 32), ("left", False, True, 32), ("right", True, True, 32), ("left", True, False, 32),
         ("right", False, False, 16), ("left", True, True, 16), ("right", True, True, 8), ("left", False, True, 8)]
IDS = [f"{s}-{'dct' if d else 'dense'}-{'lim' if l else 'free'}-{b}" for s, d, l, b in CASES]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fira_backends_match_reference(case, backend):
    require_backend("fira_foreach_update", backend)
    want = _run(ops.foreach_fira_update_, lambda: _fira_args(*case), "reference")
    got = _run(ops.foreach_fira_update_, lambda: _fira_args(*case), backend)
    _close(got[:-1], want[:-1], f"fira {case} {backend}")
    if case[2]:
        _close(got[-1]["prev_norm"], want[-1]["prev_norm"], f"fira {case} {backend} prev_norm")


def _per_weight(ps, gs, projs, ea, es, kw):
    """The same step with the per-weight ops (project, adam_update_, residual_sumsq,
    residual_apply_) and torch glue: what FiraAdamW's per-parameter path runs."""
    side = kw["side"]
    right = side == "right"
    for i, (p, g) in enumerate(zip(ps, gs)):
        proj = projs[i] if kw["indices"] is None else ops.DCTProjector(projs[i], kw["indices"][i])
        low = ops.project(g, proj, side=side)
        mom = {}
        if "m_absmax" in kw:
            mom = dict(m_absmax=kw["m_absmax"][i], v_absmax=kw["v_absmax"][i], block_size=kw["block_size"])
        elif "moment_seed" in kw:
            mom = dict(moment_seed=kw["moment_seed"][i])
        upd = torch.float32 if ea[i].dtype == torch.uint8 else ea[i].dtype
        n = ops.adam_update_(low.to(upd), ea[i], es[i], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], **mom)
        n32 = n.to(low.dtype)
        d = 1 if right else 0
        s = torch.linalg.vector_norm(n32, dim=d) / (torch.linalg.vector_norm(low, dim=d) + 1e-8)
        mix = kw["mix"][i]
        if kw["prev_norm"] is not None:
            sb = s.unsqueeze(1) if right else s.unsqueeze(0)
            q = ops.residual_sumsq(g, low * sb * (-mix), proj, s, side=side).sqrt()
            prev = kw["prev_norm"][i]
            lim = torch.clamp(q / (prev.to(q.dtype) + 1e-8), min=kw["gamma"][i]) / kw["gamma"][i]
            s = s / lim.to(s.dtype)
            prev.copy_(q / lim)
        sb = s.unsqueeze(1) if right else s.unsqueeze(0)
        ops.residual_apply_(p, g, n32 * kw["scale"][i] - low * sb * mix, proj, s, side=side, alpha=kw["alpha"][i],
                            decay=kw["decay"][i])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fira_cpp_bitwise_equals_per_weight_ops(case):
    require_backend("fira_foreach_update", "cpp")
    with use_backend("cpp"):
        a = _fira_args(*case)
        ops.foreach_fira_update_(*a[:-1], **a[-1])
        b = _fira_args(*case)
        _per_weight(*b)
    for x, y in zip(a[:-1], b[:-1]):
        for s, t in zip(x, y):
            assert torch.equal(s, t), case
    if case[2]:
        for s, t in zip(a[-1]["prev_norm"], b[-1]["prev_norm"]):
            assert torch.equal(s, t), case


def test_fira_bad_entry_names_it_and_writes_nothing():
    ps, gs, projs, ea, es, kw = _fira_args("right", False, True, 32)
    before = [p.clone() for p in ps] + [t.clone() for t in ea]
    gs[2] = gs[2][:, :-1]
    with pytest.raises(ValueError, match=r"foreach_fira_update_ \(entry 2\).*grads"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps + ea, before))
    ps, gs, projs, ea, es, kw = _fira_args("left", True, True, 32)
    kw["indices"][1] = torch.tensor([0, 99], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(entry 1\).*indices must lie in"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **kw)
    ps, gs, projs, ea, es, kw = _fira_args("right", False, True, 32)
    with pytest.raises(ValueError, match=r"gamma must have one entry per prev_norm"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": kw["gamma"][:1]})
    with pytest.raises(ValueError, match=r"prev_norm and gamma go together"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": None})
    with pytest.raises(TypeError, match=r"\(entry 1\): params must have a floating dtype \(float32\)"):
        ops.foreach_fira_update_([ps[0], ps[1].double(), ps[2]], gs, projs, ea, es, **kw)
    with pytest.raises(ValueError, match=r"\(entry 0\).*gamma must be finite|gamma must be finite"):
        ops.foreach_fira_update_(ps, gs, projs, ea, es, **{**kw, "gamma": [0.5, 1.0, 1.0]})
