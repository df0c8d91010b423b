"""FiraAdamW: parity with the ``fira`` package (compat="fira", a tiny LLaMA with real
gradients), an independent float64 implementation of the update (norm-based scaling, residual,
limiter) for both projectors, the bucketed step against foreach=False, checkpoints, errors."""
import math
import warnings

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.optim import FiraAdamW, GaLoreAdamW

from ._helpers import grad_sequence, rel_change_err, roundtrip, run
from .test_compat import assert_weights_match, batches, one_thread, tiny_llama, train  # noqa: F401

STEPS = 20


def fira_pkg():
    return pytest.importorskip("fira")


# --------------------------------------------------------------------------- the package, real gradients
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_fira_package_tiny_llama(proj_type):
    """20 steps with weight decay, one projector per weight (the refresh at step 1 from identical
    inputs; see test_compat.test_galore_torch_tiny_llama for why later refreshes are left out)."""
    hp = dict(lr=1e-2, weight_decay=0.1, eps=1e-6)
    data = batches(STEPS)
    ref = train(lambda g: fira_pkg().FiraAdamW(g, **hp), dict(rank=8, update_proj_gap=200, alpha=0.25,
                                                              proj_type=proj_type), data)
    ours = train(lambda g: FiraAdamW(g, compat="fira", **hp), dict(rank=8, update_proj_gap=200, scale=0.25,
                                                                   proj_type=proj_type), data)
    assert_weights_match(ours, ref)
    # the residual term is really there: GaLore (the same projection, no residual) is far off
    galore = train(lambda g: GaLoreAdamW(g, compat="galore-torch", **hp),
                   dict(rank=8, update_proj_gap=200, scale=0.25, proj_type=proj_type), data)
    w = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert rel_change_err(w(galore), w(ref), w(tiny_llama())) > 1e-1


# --------------------------------------------------------------------------- the update, float64
def fira_float64(w0, grads, *, rank, gap, scale, lr, betas, eps, wd, side, gamma=1.01, projector="svd"):
    """Fira written from its formulas in float64 (torch's decay order, the orthogonal residual)."""
    w = w0.double().clone()
    b1, b2 = betas
    m = v = p = prev = None
    norms = []
    for t, g in enumerate(grads, 1):
        g = g.double()
        if (t - 1) % gap == 0:
            if projector == "svd":
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                p = vh[:rank] if side == "right" else u[:, :rank]
            else:
                idx = ops.dct_score_topk(g, rank, side=side, norm=1)
                rows = ops.dct_basis(g.shape[1] if side == "right" else g.shape[0], torch.float64)[idx.long()]
                p = rows if side == "right" else rows.T
        back = (lambda x: x @ p) if side == "right" else (lambda x: p @ x)  # noqa: B023
        r = g @ p.T if side == "right" else p.T @ g
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = m / (v.sqrt() + eps)
        dim = 1 if side == "right" else 0
        s = n.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)
        q = (s[:, None] if side == "right" else s[None, :]) * (g - back(r))
        if gamma is not None:
            qn = q.norm()
            if prev is not None:
                lim = max(float(qn / (prev + 1e-8)), gamma) / gamma
                q = q / lim
                qn = qn / lim
            prev = qn
            norms.append(float(qn))
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = (1 - lr * wd) * w - step_size * (scale * back(n) + q)
    return w, norms


CASES = [((40, 24), "right"), ((24, 40), "left")]


@pytest.mark.parametrize("projector", ["svd", "dct"])
@pytest.mark.parametrize("shape,side", CASES)
def test_update_equals_float64_formula(shape, side, projector):
    """Growing gradients, so the limiter acts at every step; a refresh at step 4."""
    hp = dict(rank=4, gap=3, scale=0.25, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.1, side=side)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 7, torch.float64, growing=True)
    want, norms = fira_float64(w0, grads, projector=projector, **hp)
    ours, opt = run(lambda q: FiraAdamW([{"params": [q], "rank": 4, "update_proj_gap": 3}], lr=1e-2,
                                        weight_decay=0.1, eps=1e-6, projector=projector), w0, grads)
    torch.testing.assert_close(ours.detach(), want, rtol=1e-10, atol=1e-12)
    state = opt.state[ours]
    assert state["residual_norm"].dtype == torch.float64 and state["residual_norm"].dim() == 0  # float64 weights
    assert float(state["residual_norm"]) == pytest.approx(norms[-1], rel=1e-6)
    assert ("indices" in state) == (projector == "dct") and ("projector" in state) == (projector == "svd")
    # the limiter acted: each stored norm at most gamma times the previous one, and it matters
    assert all(b <= a * 1.01 * (1 + 1e-9) for a, b in zip(norms, norms[1:]))
    free, _ = fira_float64(w0, grads, projector=projector, gamma=None, **hp)
    assert rel_change_err(free, want, w0) > 1e-2
    unlimited, _ = run(lambda q: FiraAdamW([{"params": [q], "rank": 4, "update_proj_gap": 3}], lr=1e-2,
                                           weight_decay=0.1, eps=1e-6, projector=projector, gamma=None), w0, grads)
    torch.testing.assert_close(unlimited.detach(), free, rtol=1e-10, atol=1e-12)


def test_first_step_scaling_by_hand():
    """One step on a right-projected weight: ``s_i = ||N_i|| / (||R_i|| + 1e-8)`` per row; at
    t = 1 ``N = R / (|R| + eps)`` elementwise (bias-corrected step size ``lr``)."""
    torch.manual_seed(0)
    w0 = torch.randn(12, 6, dtype=torch.float64)
    g = torch.randn(12, 6, dtype=torch.float64)
    ours, _ = run(lambda q: FiraAdamW([{"params": [q], "rank": 2, "scale": 1.0}], lr=0.1, eps=0.0), w0, [g])
    vh = torch.linalg.svd(g, full_matrices=False)[2][:2]
    r = g @ vh.T
    n = r.sign()  # m / sqrt(v) at t = 1 with eps = 0: (0.1 r) / sqrt(0.001 r^2) / (0.1 / sqrt(0.001))
    s = n.norm(dim=1) / (r.norm(dim=1) + 1e-8)
    want = w0 - 0.1 * (n @ vh + s[:, None] * (g - r @ vh))
    torch.testing.assert_close(ours.detach(), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- bucketed step, checkpoints
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 20), torch.nn.Linear(20, 48), torch.nn.Linear(48, 20)).to(dtype)


def _groups(model, **kw):
    ws = [p for p in model.parameters() if p.dim() == 2]
    return [{"params": ws, "rank": 4, "update_proj_gap": 3, **kw},
            {"params": [p for p in model.parameters() if p.dim() == 1]}]


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + t)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("extra", [dict(projector="svd"), dict(projector="dct"), dict(moment_bits=8, min_8bit_size=16,
                                                                                   block_size=32),
                                   dict(moment_bits=16), dict(compat="fira"), dict(gamma=None),
                                   dict(projector="dct", gamma=1.5, proj_type="left")])
def test_bucketed_step_bit_identical_to_per_parameter(extra, monkeypatch):
    calls = []
    real = ops.foreach_fira_update_
    monkeypatch.setattr(ops, "foreach_fira_update_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    outs = []
    for fe in (True, False):
        model = _model()
        opt = FiraAdamW(_groups(model), lr=1e-2, weight_decay=0.1, foreach=fe, **extra)
        _train(model, opt, 7)
        outs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # steps 2, 3, 5, 6 (no refresh) of the foreach run: one call per side bucket, several weights in one
    assert calls and max(calls) >= 2


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_checkpoint_roundtrip_continues_bitwise(projector):
    make = lambda m: FiraAdamW(_groups(m), lr=1e-2, weight_decay=0.1, projector=projector)  # noqa: E731
    full = _model()
    opt = make(full)
    _train(full, opt, 8)
    half = _model()
    opt1 = make(half)
    _train(half, opt1, 4)
    saved = roundtrip(opt1.state_dict())
    opt2 = make(half)
    opt2.load_state_dict(saved)
    assert torch.isfinite(opt2.state[half[0].weight]["residual_norm"])
    _train(half, opt2, 4, start=4)
    for a, b in zip(full.parameters(), half.parameters()):
        assert torch.equal(a, b)


def test_bfloat16_weights_train():
    model = _model(torch.bfloat16)
    opt = FiraAdamW(_groups(model), lr=1e-2, projector="dct")
    w0 = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 4)
    for p, q in zip(model.parameters(), w0):
        assert torch.isfinite(p).all() and not torch.equal(p, q)


# --------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("kw, msg", [
    (dict(proj_type="full"), "proj_type must be one of 'std', 'reverse_std', 'left', 'right', got 'full'"),
    (dict(projector="qr"), "projector must be 'svd' or 'dct', got 'qr'"),
    (dict(gamma=0.5), "gamma must be a finite float >= 1 or None, got 0.5"),
    (dict(gamma=float("inf")), "gamma must be a finite float >= 1 or None"),
    (dict(norm=3), "norm must be 1 or 2, got 3"),
    (dict(svd="qr"), "svd must be 'exact' or 'lowrank'"),
    (dict(compat="galore-torch"), "compat must be .*'fira'.*got 'galore-torch'"),
])
def test_bad_values_raise_and_add_nothing(kw, msg):
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=msg):
        FiraAdamW([{"params": [p], "rank": 2, **kw}])
    opt = FiraAdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [p], "rank": 2, **kw})
    assert len(opt.param_groups) == 1


def test_unknown_keyword_and_capturable_refused():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError, match="FiraAdamW.__init__\\(\\) got an unexpected keyword argument 'alpha'"):
        FiraAdamW([p], alpha=0.25)
    with pytest.raises((ValueError, TypeError), match="capturable"):
        FiraAdamW([{"params": [p], "rank": 2, "capturable": True}])


def test_state_of_another_optimizer_refused():
    model = _model()
    g = GaLoreAdamW(_groups(model), lr=1e-2)
    _train(model, g, 1)
    opt = FiraAdamW(_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match="saved by another optimizer"):
        opt.load_state_dict(g.state_dict())


def _moments_after(cls, w0, grads, **kw):
    p, opt = run(lambda q: cls([{"params": [q], "rank": 4, "update_proj_gap": 3}], lr=1e-2, eps=1e-6, **kw),
                 w0, grads)
    st = opt.state[p]
    return st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st.get("projector", st.get("indices"))


@pytest.mark.parametrize("kw", [dict(moment_transport=True), dict(refresh="sample", refresh_seed=3),
                                dict(refresh="random", random_after=2, refresh_seed=5),
                                dict(refresh="random", moment_transport=True)])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_galore_refresh_options_carry_over(kw, shape):
    """Fira's low-rank Adam state follows GaLore's: on weight-independent gradients, with the
    refresh options and moment transport, its projector and moments are GaLore's (refreshes at
    steps 1, 4, 7), and they differ from the default refresh's."""
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 8, torch.float64)
    m, v, proj = _moments_after(FiraAdamW, w0, grads, **kw)
    gm, gv, gproj = _moments_after(GaLoreAdamW, w0, grads, **kw)
    torch.testing.assert_close(proj, gproj, rtol=0, atol=0)
    torch.testing.assert_close(m, gm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, gv, rtol=1e-12, atol=1e-14)
    dm, _, _ = _moments_after(FiraAdamW, w0, grads)
    assert (dm - m).abs().max() > 1e-3


def test_dct_moment_transport_reindexes_like_dctadamw():
    """projector='dct' with moment_transport=True moves the moments of kept DCT rows as
    DCTAdamW(moment_transport=True) does, on the same gradients."""
    from lowrank_kernels.optim import DCTAdamW
    shape = (24, 40)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 8, torch.float64, seed=4)
    m, v, idx = _moments_after(FiraAdamW, w0, grads, projector="dct", moment_transport=True)
    dm, dv, didx = _moments_after(DCTAdamW, w0, grads, moment_transport=True)
    assert torch.equal(idx, didx)
    torch.testing.assert_close(m, dm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, dv, rtol=1e-12, atol=1e-14)
    km, _, _ = _moments_after(FiraAdamW, w0, grads, projector="dct")
    assert (km - m).abs().max() > 1e-3


def test_dct_projector_refuses_svd_refresh_options():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="refresh='sample'.*projector='dct'"):
        FiraAdamW([{"params": [p], "rank": 2}], projector="dct", refresh="sample")
