"""GradNormLoRPAdamW (our interpretation): weight-norm gradients vs autograd, identity projector ==
torch.optim.Adam on weight_norm's (g, V), an independent float64 implementation that keeps V,
row norms without an m x n temporary, zero rows, state bytes, checkpoints, bf16, bad input."""
import math
import warnings

import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import GaLoreAdamW, GradNormLoRPAdamW
from lowrank_kernels.optim import gradnormlorp as gnl
from lowrank_kernels.reference import gradnormlorp as gnl_ref

from ._helpers import rel_change_err, roundtrip

SHAPES = [(37, 21), (19, 45)]  # std: right side, left side


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


class EyeGradNormLoRP(GradNormLoRPAdamW):
    """The identity projector (rank = min(m, n)) through the ``_compute_projector`` extension point."""

    def _compute_projector(self, p, grad, state, group, step):
        m, n = p.shape
        return torch.eye(n if self._side(state) == "right" else m, dtype=p.dtype, device=p.device)


def _problem(m, n, dtype, seed=0):
    """A smooth non-quadratic loss of W (the gradient depends on W)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(17, n, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(17, m, generator=gen, dtype=torch.float64).to(dtype)
    return lambda w: 0.5 * ((x @ w.T - y) ** 2).sum() / 17 + 0.05 * (w ** 3).sum()


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


# --------------------------------------------------------------------------- a, Gv vs autograd
@pytest.mark.parametrize("shape", SHAPES + [(1, 7), (6, 1)])
@pytest.mark.parametrize("panel", [None, 10])
def test_weight_norm_grads_match_autograd(shape, panel, monkeypatch):
    """a = dL/dg and Gv = dL/dV through torch's weight_norm(dim=0), with negative g and ||V|| != |g|,
    computed from W and dL/dW only (several row panels when panel is small)."""
    if panel is not None:
        monkeypatch.setattr(gnl_ref, "PANEL_ELEMS", panel)
    m, n = shape
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(m, n, generator=gen, dtype=torch.float64) * 3.0
    g = torch.randn(m, generator=gen, dtype=torch.float64)
    lin = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)
    weight_norm(lin, dim=0)
    pw = lin.parametrizations.weight
    pw.original0.data.copy_(g[:, None])
    pw.original1.data.copy_(v)
    gw = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w = lin.weight
    (w * gw).sum().backward()
    a, gv, s, wsq = gnl.weight_norm_grads(w.detach(), gw, g, v.norm(dim=1))
    torch.testing.assert_close(a, pw.original0.grad.squeeze(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(gv, pw.original1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, g.abs(), rtol=0, atol=1e-12)
    torch.testing.assert_close(wsq, g * g, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- identity projector == Adam on (g, V)
def _reference_weight_norm(w0, loss, opt_cls, **kw):
    m, n = w0.shape
    lin = torch.nn.Linear(n, m, bias=False, dtype=w0.dtype)
    lin.weight.data.copy_(w0)
    weight_norm(lin, dim=0)  # g = ||W||_row, V = W
    return lin, opt_cls(lin.parameters(), **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_identity_projector_equals_torch_adam(shape, wd):
    """rank = min(m, n), identity projector, eps 0: 20 steps equal torch.optim.Adam (AdamW with
    weight decay) on the (g, V) parameters of a weight_norm copy, to 1e-10 in float64."""
    m, n = shape
    loss = _problem(m, n, torch.float64)
    w0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_cls = torch.optim.AdamW if wd else torch.optim.Adam
    lin, ref = _reference_weight_norm(w0, loss, ref_cls, lr=2e-2, eps=0.0, weight_decay=wd)
    p = torch.nn.Parameter(w0.clone())
    opt = EyeGradNormLoRP([{"params": [p], "rank": min(m, n)}], lr=2e-2, eps=0.0, weight_decay=wd)
    for _ in range(20):
        ref.zero_grad()
        loss(lin.weight).backward()
        ref.step()
        p.grad = None
        loss(p).backward()
        opt.step()
    pw = lin.parametrizations.weight
    st = opt.state[p]
    assert int(st["step"]) == 20 and gnl.GradNormLoRPAdamW._side(opt, st) == ("right" if m >= n else "left")
    torch.testing.assert_close(p.detach(), lin.weight.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(st["wn_g"], pw.original0.detach().squeeze(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(st["wn_vnorm"], pw.original1.detach().norm(dim=1), rtol=0, atol=1e-10)
    # The weights moved far more than the tolerance (the test can fail).
    assert (p.detach() - w0).abs().max() > 0.1


# eps 0: the Triton interpreter evaluates 0/0 in the masked-off lanes of partial tiles (discarded).
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_identity_projector_every_backend(backend):
    """The same control on each backend of the projection ops, in float32 (the Triton
    interpreter and the C++ kernels too): close to torch.optim.Adam on (g, V)."""
    m, n = 23, 11
    loss = _problem(m, n, torch.float32)
    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    lin, ref = _reference_weight_norm(w0, loss, torch.optim.Adam, lr=1e-2, eps=1e-8)
    p = torch.nn.Parameter(w0.clone())
    with use_backend(backend):
        opt = EyeGradNormLoRP([{"params": [p], "rank": n}], lr=1e-2, eps=0.0)
        for _ in range(10):
            ref.zero_grad()
            loss(lin.weight).backward()
            ref.step()
            p.grad = None
            loss(p).backward()
            opt.step()
    assert rel_change_err(p, lin.weight, w0) < 1e-4


# --------------------------------------------------------------------------- independent float64 math, keeping V
def gradnormlorp_keeping_v(w0, loss, steps, *, rank, gap, scale, lr, betas, eps, wd, side):
    """GradNormLoRP written independently: V kept as an m x n matrix, autograd through
    weight_norm for dL/dg and dL/dV, GaLore (exact SVD of dL/dV) on V, Adam on g."""
    m, n = w0.shape
    g = w0.norm(dim=1).clone()
    v = w0.clone()
    b1, b2 = betas
    mg = torch.zeros_like(g)
    vg = torch.zeros_like(g)
    mom = vmom = proj = None
    for t in range(1, steps + 1):
        gg = g.clone().requires_grad_(True)
        vv = v.clone().requires_grad_(True)
        w = torch._weight_norm(vv, gg[:, None], 0)
        loss(w).backward()
        a, gv = gg.grad, vv.grad
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(gv, full_matrices=False)
            proj = vh[:rank] if side == "right" else u[:, :rank]
        r = gv @ proj.T if side == "right" else proj.T @ gv
        if mom is None:
            mom, vmom = torch.zeros_like(r), torch.zeros_like(r)
        mom = b1 * mom + (1 - b1) * r
        vmom = b2 * vmom + (1 - b2) * r * r
        nn_ = mom / (vmom.sqrt() + eps)
        back = nn_ @ proj if side == "right" else proj @ nn_
        c = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        mg = b1 * mg + (1 - b1) * a
        vg = b2 * vg + (1 - b2) * a * a
        g = g * (1 - lr * wd) - c * mg / (vg.sqrt() + eps)
        v = v * (1 - lr * wd) - c * scale * back
    return torch._weight_norm(v, g[:, None], 0), g, v.norm(dim=1)


@pytest.mark.parametrize("shape,proj_type,rank", [((37, 21), "std", 5), ((19, 45), "std", 7),
                                                  ((30, 12), "reverse_std", 4), ((12, 30), "right", 3)])
def test_matches_independent_float64_math_keeping_v(shape, proj_type, rank):
    """A real low-rank projector (refreshes at steps 1, 4, 7): equal to the version that keeps V."""
    m, n = shape
    loss = _problem(m, n, torch.float64, seed=4)
    w0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    p = torch.nn.Parameter(w0.clone())
    opt = GradNormLoRPAdamW([{"params": [p], "rank": rank, "update_proj_gap": 3, "scale": 0.5,
                              "proj_type": proj_type}], **kw)
    for _ in range(9):
        p.grad = None
        loss(p).backward()
        opt.step()
    side = gnl.GradNormLoRPAdamW._side(opt, opt.state[p])
    ref_w, ref_g, ref_vn = gradnormlorp_keeping_v(w0, loss, 9, rank=rank, gap=3, scale=0.5, lr=1e-2,
                                                  betas=(0.9, 0.99), eps=1e-6, wd=0.05, side=side)
    torch.testing.assert_close(p.detach(), ref_w, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.state[p]["wn_g"], ref_g, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.state[p]["wn_vnorm"], ref_vn, rtol=0, atol=1e-10)
    assert rel_change_err(p, ref_w, w0) < 1e-8


@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_lowers_the_loss(svd):
    m, n = 40, 24
    loss = _problem(m, n, torch.float32, seed=8)
    p = torch.nn.Parameter(0.3 * torch.randn(m, n, generator=torch.Generator().manual_seed(9)))
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 4, "update_proj_gap": 10}], lr=1e-2, svd=svd)
    first = None
    for _ in range(60):
        p.grad = None
        val = loss(p)
        first = first if first is not None else val.item()
        val.backward()
        opt.step()
    assert loss(p).item() < 0.8 * first


# --------------------------------------------------------------------------- row norms and apply without temporaries
def _direct_new_norms(w, n_, proj, side, vd, sg, s, cs):
    vh = sg[:, None] * w.double() / s.double()[:, None]
    back = n_.double() @ proj.double() if side == "right" else proj.double() @ n_.double()
    return (vd.double()[:, None] * vh - cs * back).norm(dim=1) ** 2


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_new_row_norms_without_temporary_match_direct(side, dtype, monkeypatch):
    """The projector identity (float32/64 P with orthonormal rows, right), the Gram of a 16-bit P
    (right) and the Gram N N^T (left, any P) equal a direct norm of V'; a zero row included."""
    monkeypatch.setattr(gnl_ref, "PANEL_ELEMS", 64)  # several panels
    m, n, r = 29, 17, 6
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w[3] = 0.0
    q, _ = torch.linalg.qr(torch.randn(n if side == "right" else m, r, generator=gen, dtype=torch.float64))
    proj = (q.T if side == "right" else q).to(dtype)
    w = w.to(dtype)
    n_ = torch.randn(*((m, r) if side == "right" else (r, n)), generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wsq = gnl.row_dots(w, w, acc)
    s = wsq.sqrt().clamp_min(gnl.NORM_FLOOR)
    sg = torch.sign(torch.randn(m, generator=gen, dtype=torch.float64)).to(acc)
    vd = (torch.rand(m, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    cs = 0.3
    got = gnl.new_row_norms_sq(w, n_, proj, side, vd=vd, sg=sg, s=s, wsq=wsq, cs=cs)
    want = _direct_new_norms(w, n_, proj, side, vd, sg, s, cs)
    assert got.dtype == acc
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("panel", [None, 40])
def test_apply_rows_equals_diag_form(side, dtype, panel, backend, monkeypatch):
    """W <- diag(d) W + diag(b) back(N) through backproject_apply_ on each backend (change compared);
    a bf16 W is rounded once (float32 row panels; several when panel is small), not twice."""
    if panel is not None:
        monkeypatch.setattr(gnl_ref, "PANEL_ELEMS", panel)
    m, n, r = 31, 19, 5
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(m, n, generator=gen).to(dtype)
    proj = torch.randn(*((r, n) if side == "right" else (m, r)), generator=gen).to(dtype)
    n_ = torch.randn(*((m, r) if side == "right" else (r, n)), generator=gen).to(dtype)
    d = torch.rand(m, generator=gen) + 0.5
    b = torch.randn(m, generator=gen)
    d[4] = 0.0
    back = n_.double() @ proj.double() if side == "right" else proj.double() @ n_.double()
    want = d.double()[:, None] * w.double() + b.double()[:, None] * back
    out = w.clone()
    with use_backend(backend):
        gnl.apply_rows(out, n_, proj, side, decay=d, alpha=b)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close((out - w).double(), want - w.double(), rtol=1e-5, atol=1e-5)
    else:  # bf16: one rounding to nearest of the float32 result: at most half an ulp, 2^-8 relative
        assert ((out.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-5).all()


# --------------------------------------------------------------------------- radial gradients, zero rows, zero biases
def test_purely_radial_gradient_moves_g_every_step():
    """G = lambda_i W_i / ||W_i|| (radial per row, for the current W): dL/dV = 0, so the direction
    never turns, while g moves every step, downhill, crosses zero (W flips sign, sign(g) = -1 is
    handled) and keeps moving. (A fixed G = lambda unit0 with lambda g > 0 would not do: that
    direction is a maximum of <G, W>, and Adam amplifies rounding noise away from it.)"""
    m, n = 12, 8
    gen = torch.Generator().manual_seed(13)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    lam = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    p = torch.nn.Parameter(w0.clone())
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 3, "update_proj_gap": 5}], lr=0.1)
    unit0 = w0 / w0.norm(dim=1, keepdim=True)
    prev = w0.norm(dim=1)
    for _ in range(60):
        p.grad = lam[:, None] * p.detach() / p.detach().norm(dim=1, keepdim=True)  # dL/dg = lambda sign(g)
        opt.step()
        g = opt.state[p]["wn_g"].clone()
        assert ((g - prev).abs() > 1e-6).all()  # every row's magnitude moved
        if (prev > 0).all() and (opt.state[p]["exp_avg_g"] > 0).all():
            assert (g < prev).all()  # downhill while no g has crossed zero
        prev = g
        torch.testing.assert_close(p.detach(), g[:, None] * unit0, rtol=0, atol=1e-9)  # W = g * unit0
    assert (prev < 0).any()  # some magnitudes crossed zero; W flipped with them, still finite
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_rows_and_zero_biases_never_nan(shape):
    """A Linear whose weight has zero rows and whose bias is zero (plain AdamW group): no NaN,
    zero rows of W stay zero with a right projector, everything finite for 30 steps."""
    m, n = shape
    torch.manual_seed(14)
    lin = torch.nn.Linear(n, m)
    with torch.no_grad():
        lin.weight[[0, 5, m - 1]] = 0.0
        lin.bias.zero_()
    opt = GradNormLoRPAdamW([{"params": [lin.weight], "rank": 4, "update_proj_gap": 7},
                             {"params": [lin.bias]}], lr=1e-2)
    x = torch.randn(16, n)
    for _ in range(30):
        opt.zero_grad()
        (lin(x) ** 2).mean().backward()
        opt.step()
        assert torch.isfinite(lin.weight).all() and torch.isfinite(lin.bias).all()
        for v in opt.state[lin.weight].values():
            assert torch.isfinite(v).all()
    st = opt.state[lin.weight]
    assert (st["wn_g"][[0, 5, m - 1]] == 0).all()
    assert not lin.weight[[0, 5, m - 1]].any()  # g = 0: the row is zero whatever V does
    assert lin.weight[1:5].abs().sum() > 0 and lin.bias.abs().sum() > 0  # the rest trained


def test_all_zero_weight_and_zero_grad_rows():
    p = torch.nn.Parameter(torch.zeros(10, 6))
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 2}], eps=0.0)
    g = torch.randn(10, 6)
    g[2] = 0.0
    p.grad = g
    opt.step()
    assert torch.isfinite(p).all() and not p.any()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


# --------------------------------------------------------------------------- state, checkpoints
def test_state_bytes_are_galore_plus_16m():
    shapes = [(37, 21), (19, 45), (64, 64)]
    gen = torch.Generator().manual_seed(15)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    opts = []
    for cls in (GaLoreAdamW, GradNormLoRPAdamW):
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = cls([{"params": ps, "rank": 4}])
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        opts.append(opt)
    galore, ours = opts
    assert _state_bytes(ours) - _state_bytes(galore) == 16 * sum(m for m, _ in shapes)
    for st in ours.state.values():
        extra = {k: v for k, v in st.items() if k.startswith(("wn_", "exp_avg_g", "exp_avg_sq_g"))}
        assert sorted(extra) == ["exp_avg_g", "exp_avg_sq_g", "wn_g", "wn_vnorm"]
        assert all(v.dtype == torch.float32 and v.dim() == 1 for v in extra.values())
        assert all(v.dim() == 2 for k, v in st.items() if k not in extra and k not in ("step", "side"))


MAKERS = {
    "exact": lambda ps: GradNormLoRPAdamW(_groups(ps), lr=1e-2, weight_decay=0.1),
    "lowrank": lambda ps: GradNormLoRPAdamW(_groups(ps, svd="lowrank"), lr=1e-2),
    "reverse_std": lambda ps: GradNormLoRPAdamW(_groups(ps, proj_type="reverse_std"), lr=1e-2),
}
CK_SHAPES = [(37, 21), (19, 45), (13,)]


def _groups(ps, **kw):
    low = {"params": [p for p in ps if p.dim() == 2], "rank": 5, "update_proj_gap": 3, **kw}
    return [low, {"params": [p for p in ps if p.dim() != 2]}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_checkpoint_roundtrip_weights_only_bit_identical(name, dtype):
    """Save after step 2 (torch.load(weights_only=True)), resume on fresh params to step 8 across the
    refreshes at 4 and 7: weights and state equal the uninterrupted run bit for bit; dtypes kept."""
    gen = torch.Generator().manual_seed(16)
    w0 = [torch.randn(s, generator=gen).to(dtype) for s in CK_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in CK_SHAPES] for _ in range(8)]

    def params():
        return [torch.nn.Parameter(w.clone()) for w in w0]

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()

    ps = params()
    opt = MAKERS[name](ps)
    for gs in grads:
        step(opt, ps, gs)
    qs = params()
    opt_q = MAKERS[name](qs)
    for gs in grads[:2]:
        step(opt_q, qs, gs)
    saved = roundtrip(opt_q.state_dict())
    rs = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    opt_r = MAKERS[name](rs)
    opt_r.load_state_dict(saved)
    for p in rs[:2]:
        assert opt_r.state[p]["wn_g"].dtype == torch.float32 and opt_r.state[p]["exp_avg"].dtype == torch.promote_types(dtype, torch.float32)
    for gs in grads[2:]:
        step(opt_r, rs, gs)
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt_r.state[r][k]), k


# --------------------------------------------------------------------------- bf16, plain groups, defaults
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_params_track_float64_run(shape):
    """bf16 weights: float32 state vectors, bf16 moments/projector (as GaLore); against the same
    optimizer in float64 on the same data, the error is at most 2x GaLoreAdamW's own bf16 error in
    the same setting (flash-attention's rule, with GaLore as the plain 16-bit baseline)."""
    m, n = shape
    gen = torch.Generator().manual_seed(17)
    w0 = (0.5 * torch.randn(m, n, generator=gen)).bfloat16()
    grads = [torch.randn(m, n, generator=gen).bfloat16() for _ in range(8)]
    errs, last = {}, {}
    for cls in (GradNormLoRPAdamW, GaLoreAdamW):
        runs = {}
        for dt in (torch.float64, torch.bfloat16):
            p = torch.nn.Parameter(w0.to(dt).clone())  # w0.to(bf16) alone would share w0's storage
            opt = cls([{"params": [p], "rank": 6, "update_proj_gap": 4, "scale": 1.0}], lr=2e-2)
            for g in grads:
                p.grad = g.to(dt)
                opt.step()
            runs[dt] = p
        errs[cls] = rel_change_err(runs[torch.bfloat16], runs[torch.float64], w0)
        last[cls] = (runs[torch.bfloat16], opt)
    ours, opt = last[GradNormLoRPAdamW]
    st = opt.state[ours]
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert st["projector"].dtype == torch.bfloat16 and st["exp_avg"].dtype == torch.float32  # float32 moments by default
    assert st["wn_g"].dtype == torch.float32
    assert errs[GradNormLoRPAdamW] <= 2 * errs[GaLoreAdamW] + 5e-3, errs


def test_plain_groups_are_torch_adamw_bit_identical():
    gen = torch.Generator().manual_seed(18)
    w = [torch.randn(7, 5, generator=gen), torch.randn(9, generator=gen)]
    grads = [[torch.randn_like(x) for x in w] for _ in range(4)]
    ps = [torch.nn.Parameter(x.clone()) for x in w]
    qs = [torch.nn.Parameter(x.clone()) for x in w]
    ours = _quiet(lambda: GradNormLoRPAdamW(ps, lr=1e-2, weight_decay=0.1))
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, eps=1e-6)
    for gs in grads:
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_defaults():
    p = torch.nn.Parameter(torch.randn(6, 4))
    d = GradNormLoRPAdamW([{"params": [p], "rank": 2}]).defaults
    assert (d["lr"], d["betas"], d["eps"], d["update_proj_gap"], d["scale"], d["proj_type"], d["svd"]) == \
        (1e-3, (0.9, 0.999), 1e-6, 200, 1.0, "std", "exact")


def test_nonfinite_grad_skips_the_parameter():
    gen = torch.Generator().manual_seed(19)
    ps = [torch.nn.Parameter(torch.randn(8, 5, generator=gen)) for _ in range(2)]
    opt = GradNormLoRPAdamW([{"params": ps, "rank": 2}], lr=1e-2)
    for p in ps:
        p.grad = torch.randn(8, 5, generator=gen)
    opt.step()
    before = ps[0].detach().clone()
    st0 = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    other = ps[1].detach().clone()
    ps[0].grad[2, 3] = float("nan")
    ps[1].grad = torch.randn(8, 5, generator=gen)
    opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(ps[0], before)
    assert all(torch.equal(v, opt.state[ps[0]][k]) for k, v in st0.items())
    assert not torch.equal(ps[1], other)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0), "lr must be a float >= 0"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(eps=-1e-8), "eps must be a float >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be a float >= 0"),
    (dict(rank=9), r"rank 9 is out of range for parameter 0 of shape \(10, 8\)"),
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=4, proj_type="full"), "proj_type must be one of"),
    (dict(rank=4, svd="qr"), "svd must be 'exact' or 'lowrank'"),
    (dict(rank=4, scale=float("nan")), "scale must be a finite float"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap must be an int >= 1"),
])
def test_bad_hyper_parameters_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GradNormLoRPAdamW([torch.nn.Parameter(torch.randn(10, 8))], **kw)


def test_bad_group_leaves_the_optimizer_unchanged():
    p = torch.nn.Parameter(torch.randn(10, 8))
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 2}])
    with pytest.raises(ValueError, match=r"param group 1: parameter 0 has shape \(7,\).*2-D"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(7))], "rank": 2})
    assert len(opt.param_groups) == 1


def test_layerwise_and_model_groups_equal_the_standard_step():
    """lowrank_param_groups on a model (biases and norms plain AdamW, zero-initialised biases
    included) and layerwise(): the same trajectory as the standard optimizer, bit for bit."""
    import copy

    from lowrank_kernels.optim import layerwise, lowrank_param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 36), torch.nn.GELU(), torch.nn.Linear(36, 24),
                                torch.nn.LayerNorm(24))
    with torch.no_grad():
        model[0].bias.zero_()
    twin = copy.deepcopy(model)

    def groups(m):
        return lowrank_param_groups(m, rank=4, update_proj_gap=2, target_modules=None)  # every Linear

    def factory(g):
        return GradNormLoRPAdamW(g, lr=1e-2, weight_decay=0.01)

    opt = factory(groups(model))
    assert sum(len(g["params"]) for g in opt.param_groups if g.get("rank")) == 2
    lw = layerwise(groups(twin), factory)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(8, 24, generator=gen), torch.randn(8, 24, generator=gen)
        ((model(x) - y) ** 2).mean().backward()
        ((twin(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        lw.step()
        lw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name


def test_projector_is_made_from_the_direction_gradient_and_a_failed_first_refresh_changes_nothing():
    """The refresh sees dL/dV (not dL/dW); when the first refresh fails, the weight and the state stay untouched."""
    seen = []

    class Spy(GradNormLoRPAdamW):
        fail = False

        def _compute_projector(self, p, grad, state, group, step):
            seen.append(grad.clone())
            return None if self.fail else super()._compute_projector(p, grad, state, group, step)

    gen = torch.Generator().manual_seed(20)
    w0 = torch.randn(14, 9, generator=gen, dtype=torch.float64)
    grad = torch.randn(14, 9, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = Spy([{"params": [p], "rank": 3}])
    opt.fail = True
    p.grad = grad.clone()
    opt.step()
    assert torch.equal(p, w0) and len(opt.state[p]) == 0 and opt.failed_refreshes == 1
    opt.fail = False
    opt.step()
    _, gv, _, _ = gnl.weight_norm_grads(w0, grad, w0.norm(dim=1), w0.norm(dim=1))
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], gv, rtol=0, atol=1e-14)
    assert not torch.allclose(seen[1], grad)
    assert not torch.equal(p, w0) and int(opt.state[p]["step"]) == 1
