"""GaLoreAdamW: parity with galore-torch, independent float64 math, AdamW controls, SVD failures."""
import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import GaLoreAdamW, resolve_side

from .._numerics import assert_change_close
from ._helpers import galore_float64, grad_sequence, rel_change_err, run



def _galore_torch():
    """galore-torch, or skip the calling test only (the other tests of this module need nothing)."""
    return pytest.importorskip("galore_torch")

SHAPES = [(123, 77), (64, 300)]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def groups(p, **kw):
    g = dict(rank=8, update_proj_gap=3, scale=0.5, proj_type="std")
    g.update(kw)
    return [{"params": [p], **g}]


# --------------------------------------------------------------------------- parity with galore-torch
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_fp32(shape, proj_type):
    """8 steps, gap 3: projector refreshes at steps 1, 4, 7; weight decay 0 (the references decay after the update)."""
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 8)
    # "full" at a refresh step: R = U^T G V^T is diagonal up to rounding noise, and Adam's first step
    # turns that noise into +-1/sqrt(1 - beta2) unless eps dominates it.
    kw = dict(lr=1e-2, eps=1e-3 if proj_type == "full" else 1e-6)
    ours, opt = run(lambda p: GaLoreAdamW(groups(p, proj_type=proj_type), **kw), w0, grads)
    ref, ref_opt = run(lambda p: _galore_torch().GaLoreAdamW(groups(p, proj_type=proj_type), **kw), w0, grads)
    # full: the r x r moments see rounding noise of the diagonal R at refresh steps, hence a looser bound.
    assert rel_change_err(ours, ref, w0) < (1e-4 if proj_type == "full" else 1e-5)
    state, ref_state = opt.state[ours], ref_opt.state[ref]
    assert int(state["step"]) == ref_state["step"] == 8
    ref_proj = ref_state["projector"].ortho_matrix
    if proj_type == "full":
        torch.testing.assert_close(state["projector"], ref_proj[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state["projector_right"], ref_proj[1], rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(state["projector"], ref_proj, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-4, atol=1e-8)


def test_parity_fp32_every_backend(backend):
    shape = (123, 77)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 7)
    ref, _ = run(lambda p: _galore_torch().GaLoreAdamW(groups(p), lr=1e-2), w0, grads)
    with use_backend(backend):
        ours, _ = run(lambda p: GaLoreAdamW(groups(p), lr=1e-2), w0, grads)
    assert_change_close(ours.detach(), w0, ref.detach(), f"{backend} vs galore-torch")


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_bf16(shape):
    """bfloat16: both implementations against galore-torch run in float64 on the same bf16 data;
    ours must be at least as accurate as the reference (within 1.5x + a small floor)."""
    w0 = (0.05 * torch.randn(shape)).bfloat16()
    grads = grad_sequence(shape, 8, dtype=torch.bfloat16)
    make_ref = lambda p: _galore_torch().GaLoreAdamW(groups(p), lr=2e-2)  # noqa: E731
    ideal, _ = run(make_ref, w0, grads, torch.float64)
    ref, _ = run(make_ref, w0, grads, torch.bfloat16)
    ours, opt = run(lambda p: GaLoreAdamW(groups(p), lr=2e-2), w0, grads, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert opt.state[ours]["projector"].dtype == torch.bfloat16  # stored in the parameter's dtype, as galore-torch
    err_ours = rel_change_err(ours, ideal, w0)
    err_ref = rel_change_err(ref, ideal, w0)
    assert err_ours <= 1.5 * err_ref + 5e-3, (err_ours, err_ref)
    assert rel_change_err(ours, ref, w0) < 0.1


# --------------------------------------------------------------------------- independent float64 math
@pytest.mark.parametrize("shape,proj_type,rank", [((123, 77), "std", 5), ((64, 300), "std", 64),
                                                  ((40, 90), "reverse_std", 40), ((90, 40), "reverse_std", 40),
                                                  ((50, 50), "left", 50)])
def test_float64_matches_independent_math(shape, proj_type, rank):
    """Includes rank == min(m, n) with reverse_std, where galore-torch picks the back-projection side
    from the moment's shape (it crashes or back-projects on the wrong side): we store the side once."""
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 7, dtype=torch.float64)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ours, opt = run(lambda p: GaLoreAdamW(groups(p, rank=rank, proj_type=proj_type), **kw), w0, grads)
    side = resolve_side(shape, proj_type)
    expect = galore_float64(w0, grads, rank=rank, gap=3, scale=0.5, side=side, wd=0.1, lr=1e-2,
                            betas=(0.9, 0.99), eps=1e-6)
    assert rel_change_err(ours, expect, w0) < 1e-6
    assert opt._side(opt.state[ours]) == side


def test_reverse_std_full_rank_fixed_where_reference_fails():
    shape = (40, 90)  # reverse_std -> right side, rank 40 = m: the reference's back-projection picks the left side
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 2)
    with pytest.raises(RuntimeError):
        run(lambda p: _galore_torch().GaLoreAdamW(groups(p, rank=40, proj_type="reverse_std"), lr=1e-2), w0, grads)
    ours, _ = run(lambda p: GaLoreAdamW(groups(p, rank=40, proj_type="reverse_std"), lr=1e-2), w0, grads)
    assert torch.isfinite(ours).all() and not torch.equal(ours.detach(), w0)


# --------------------------------------------------------------------------- AdamW controls
def test_plain_group_is_torch_adamw_bit_identical():
    w0 = [torch.randn(30, 7), torch.randn(11)]
    grads = [grad_sequence(w.shape, 5, seed=i + 3) for i, w in enumerate(w0)]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    with pytest.warns(UserWarning, match="no parameter group is low-rank"):
        ours = GaLoreAdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-8)
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, eps=1e-8)
    for t in range(5):
        for p, q, g in zip(ps, qs, grads):
            p.grad = g[t].clone()
            q.grad = g[t].clone()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


class IdentityGaLore(GaLoreAdamW):
    """The control: the projector is the identity, so the projected step is AdamW."""

    def _compute_projector(self, p, grad, state, group, step):
        k = min(p.shape)
        return torch.eye(k, dtype=p.dtype)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_identity_projector_is_adamw(shape):
    """Same math as torch.optim.AdamW except where eps enters (N = M / (sqrt(V) + eps), then the bias
    correction; torch adds eps after it): with eps tiny the trajectories agree to float32 rounding."""
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 6)
    kw = dict(lr=1e-2, weight_decay=0.1, eps=1e-12)
    ours, _ = run(lambda p: IdentityGaLore(groups(p, rank=min(shape), scale=1.0), **kw), w0, grads)
    ref, _ = run(lambda p: torch.optim.AdamW([p], **kw), w0, grads)
    assert rel_change_err(ours, ref, w0) < 2e-6


# --------------------------------------------------------------------------- SVD options and failures
def test_lowrank_svd_close_to_exact_and_reproducible():
    shape = (123, 77)
    # A gradient with a clear spectral gap, so the top-8 subspace is well defined.
    u = torch.linalg.qr(torch.randn(123, 8))[0]
    v = torch.linalg.qr(torch.randn(77, 8))[0]
    g = u @ torch.diag(torch.linspace(10, 5, 8)) @ v.T + 0.01 * torch.randn(shape)
    w0 = torch.randn(shape)
    exact, oe = run(lambda p: GaLoreAdamW(groups(p), lr=1e-2), w0, [g])
    low, ol = run(lambda p: GaLoreAdamW(groups(p, svd="lowrank"), lr=1e-2), w0, [g])
    low2, _ = run(lambda p: GaLoreAdamW(groups(p, svd="lowrank"), lr=1e-2), w0, [g])
    assert torch.equal(low, low2)  # seeded: a resumed run makes the same projector
    pe, pl = oe.state[exact]["projector"], ol.state[low]["projector"]
    overlap = (pe @ pl.T).norm() ** 2 / 8  # subspace overlap, 1 = same span
    assert overlap > 0.999


def _steps(opt, p, grads):
    for g in grads:
        p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_failed_svd_keeps_previous_projector(monkeypatch, failure):
    shape = (64, 40)
    grads = grad_sequence(shape, 5)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW(groups(p), lr=1e-2)
    _steps(opt, p, grads[:3])
    proj = opt.state[p]["projector"].clone()
    real_svd = torch.linalg.svd

    def broken(a, full_matrices=True):
        if failure == "raise":
            raise torch.linalg.LinAlgError("did not converge")
        u, s, vh = real_svd(a, full_matrices=full_matrices)
        return u * float("nan"), s, vh * float("nan")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    before = p.detach().clone()
    _steps(opt, p, grads[3:4])  # step 4 is a refresh step
    assert opt.failed_refreshes == 1
    assert torch.equal(opt.state[p]["projector"], proj)  # previous projector kept ...
    assert int(opt.state[p]["step"]) == 4  # ... and the step taken with it
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)


def test_failed_svd_on_first_step_leaves_parameter_untouched(monkeypatch):
    p = torch.nn.Parameter(torch.randn(30, 20))
    before = p.detach().clone()
    opt = GaLoreAdamW(groups(p), lr=1e-2)

    def broken(a, full_matrices=True):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    p.grad = torch.randn(30, 20)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert len(opt.state[p]) == 0  # no half-made state
    monkeypatch.undo()
    opt.step()  # works once the SVD does
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(p.detach(), before)


def test_state_holds_tensors_only_and_side_is_stored():
    p = torch.nn.Parameter(torch.randn(40, 90))
    opt = GaLoreAdamW(groups(p, proj_type="reverse_std"), lr=1e-2)
    p.grad = torch.randn(40, 90)
    opt.step()
    state = opt.state[p]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["side"].device.type == "cpu" and state["side"].dtype == torch.int8
    assert opt._side(state) == "right"
    assert state["projector"].shape == (8, 90) and state["exp_avg"].shape == (40, 8)
