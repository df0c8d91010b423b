"""FrugalAdamW: density 1 == AdamW, density 0 == signSGD, independent float64 math, moment reset."""
import math

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import FrugalAdamW

from .._numerics import assert_change_close
from ._helpers import grad_sequence, rel_change_err, run


def groups(p, **kw):
    g = dict(update_proj_gap=3)
    g.update(kw)
    return [{"params": [p], **g}]


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_density_one_columns_is_adamw(shape):
    """All columns selected: P is the identity and the residual is empty. Within one subspace period
    (a change resets the moments) this is AdamW up to where eps enters (tiny eps here)."""
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 5)
    kw = dict(lr=1e-2, weight_decay=0.1, eps=1e-12)
    ours, opt = run(lambda p: FrugalAdamW(groups(p, density=1.0, projection="columns", update_proj_gap=100), **kw),
                    w0, grads)
    ref, _ = run(lambda p: torch.optim.AdamW([p], **kw), w0, grads)
    assert torch.equal(opt.state[ours]["projector"], torch.eye(min(shape)))
    assert rel_change_err(ours, ref, w0) < 2e-6


@pytest.mark.parametrize("update", ["signsgd", "sgd"])
@pytest.mark.parametrize("projection", ["svd", "random", "columns"])
def test_density_zero_is_state_free(projection, update):
    shape = (25, 40)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 4)
    lr, wd, ils = 1e-2, 0.1, 0.5
    ours, opt = run(lambda p: FrugalAdamW(groups(p, density=0.0, projection=projection, update=update,
                                                 inactive_lr_scale=ils), lr=lr, weight_decay=wd), w0, grads)
    w = w0.clone()
    for g in grads:
        w.mul_(1 - lr * wd)
        w.add_(g.sign() if update == "signsgd" else g, alpha=-lr * ils)
    assert torch.equal(ours.detach(), w)
    assert set(opt.state[ours]) == {"step", "side", "subspace_step"}  # no moments at all


def frugal_float64(w0, grads, projs, *, gap, lr, betas, eps, wd, ils, side, update):
    """FRUGAL in float64 given the projector of each subspace period (orthonormal)."""
    w = w0.double().clone()
    b1, b2 = betas
    m = v = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            p = projs[(t - 1) // gap].double()
            m = v = None
            k = 0
        k += 1
        r = g @ p.T if side == "right" else p.T @ g
        back = (lambda x: x @ p) if side == "right" else (lambda x: p @ x)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        n = m / (v.sqrt() + eps)
        resid = g - back(r)
        step = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
        free = resid.sign() if update == "signsgd" else resid
        w = w * (1 - lr * wd) - step * back(n) - lr * ils * free
    return w


class Recording(FrugalAdamW):
    """Keeps every projector it made, to replay them in the float64 model."""

    made = None

    def _compute_projector(self, p, grad, state, group, step):
        proj = super()._compute_projector(p, grad, state, group, step)
        self.made = (self.made or []) + [proj.clone()]
        return proj


@pytest.mark.parametrize("projection", ["svd", "random", "columns"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_matches_independent_float64_math(shape, projection):
    """7 steps, gap 3: subspaces change at steps 4 and 7 (moments zeroed, bias correction restarts).
    sgd as the state-free update: sign() of a residual that is ~0 in exact arithmetic would be noise."""
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 7, dtype=torch.float64)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    ours, opt = run(lambda p: Recording(groups(p, density=0.25, projection=projection, update="sgd",
                                               inactive_lr_scale=0.3), **kw), w0, grads)
    assert len(opt.made) == 3
    side = "right" if shape[0] >= shape[1] else "left"
    for proj in opt.made:  # orthonormal rows (right) / columns (left)
        gram = proj @ proj.T if side == "right" else proj.T @ proj
        torch.testing.assert_close(gram, torch.eye(6, dtype=torch.float64))
    expect = frugal_float64(w0, grads, opt.made, gap=3, side=side, update="sgd", ils=0.3, lr=1e-2,
                            betas=(0.9, 0.99), eps=1e-6, wd=0.05)
    assert rel_change_err(ours, expect, w0) < 1e-10


def test_signsgd_residual_independent_math():
    shape = (24, 40)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 4, dtype=torch.float64)
    ours, opt = run(lambda p: Recording(groups(p, density=0.5, projection="random"), lr=1e-2), w0, grads)
    expect = frugal_float64(w0, grads, opt.made, gap=3, side="left", update="signsgd", ils=1.0, lr=1e-2,
                            betas=(0.9, 0.999), eps=1e-8, wd=0.01)
    assert rel_change_err(ours, expect, w0) < 1e-10


def test_moments_reset_at_subspace_change():
    shape = (30, 20)
    grads = grad_sequence(shape, 4)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = FrugalAdamW(groups(p, rank=5, projection="random"), lr=1e-2)
    for g in grads[:3]:
        p.grad = g
        opt.step()
    state = opt.state[p]
    assert int(state["subspace_step"]) == 3
    old_proj = state["projector"].clone()
    p.grad = grads[3]
    opt.step()  # step 4: new subspace
    assert int(state["subspace_step"]) == 1 and int(state["step"]) == 4
    assert not torch.equal(state["projector"], old_proj)
    r = grads[3] @ state["projector"].T
    torch.testing.assert_close(state["exp_avg"], 0.1 * r)  # zeroed, then one update
    torch.testing.assert_close(state["exp_avg_sq"], 0.001 * r * r)


def test_register_projection_hook():
    calls = []

    class WithFixed(FrugalAdamW):
        pass

    def first_rows(opt, p, grad, state, group, step, rank, side):
        calls.append((step, rank, side))
        return torch.eye(p.shape[1])[:rank] if side == "right" else torch.eye(p.shape[0])[:, :rank]

    WithFixed.register_projection("first", first_rows)
    assert "first" not in FrugalAdamW.projections  # the base class is untouched
    p = torch.nn.Parameter(torch.randn(30, 20))
    opt = WithFixed(groups(p, rank=4, projection="first"), lr=1e-2)
    p.grad = torch.randn(30, 20)
    opt.step()
    assert calls == [(1, 4, "right")]
    assert torch.equal(opt.state[p]["projector"], torch.eye(20)[:4])
    with pytest.raises(ValueError, match="projection must be one of"):
        FrugalAdamW(groups(torch.nn.Parameter(torch.randn(30, 20)), rank=4, projection="first"))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_every_backend_matches_float64(backend, shape):
    """float32 on each backend vs the float64 model (sgd residual: no sign of near-zero values)."""
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 5)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    with use_backend(backend):
        ours, opt = run(lambda p: Recording(groups(p, density=0.25, projection="random", update="sgd"), **kw),
                        w0, grads)
    side = "right" if shape[0] >= shape[1] else "left"
    expect = frugal_float64(w0, grads, opt.made, gap=3, side=side, update="sgd", ils=1.0, lr=1e-2,
                            betas=(0.9, 0.99), eps=1e-6, wd=0.05)
    assert_change_close(ours.detach(), w0, expect, f"{backend} vs float64 model")


def test_dct_projection_is_in_frugals_own_table():
    """``projection="dct"`` is an entry of FrugalAdamW's table, defined in frugal.py (no
    registration as a side effect of importing the DCT optimizer)."""
    from lowrank_kernels.optim import dct, frugal

    fn = FrugalAdamW.__dict__["projections"]["dct"]
    assert fn is frugal.dct_projection and fn.__module__ == "lowrank_kernels.optim.frugal"
    assert dct.dct_projection is fn  # the old import path still works
