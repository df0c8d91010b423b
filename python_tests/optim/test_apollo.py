"""APOLLOAdamW: parity with apollo-torch (channel, tensor, Mini), seed-only state, regeneration."""
import math

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import APOLLOAdamW

from .._numerics import assert_change_close
from ._helpers import grad_sequence, rel_change_err, run



def _apollo_torch():
    """apollo-torch, or skip the calling test only (the other tests of this module need nothing)."""
    mod = pytest.importorskip("apollo_torch")
    pytest.importorskip("apollo_torch.random_projector")
    return mod


class ReferenceSeeds(APOLLOAdamW):
    """Takes apollo-torch's seed sequence; the projection itself (randn from a generator seeded on the
    parameter's device, divided by sqrt(r)) is the one both implementations draw."""

    @staticmethod
    def _next_seed(seed):
        return _apollo_torch().random_projector.next_seed(seed)


SHAPES = [(123, 77), (64, 300)]


def groups(p, **kw):
    g = dict(rank=8, update_proj_gap=3, scale=2.0, proj_type="std", scale_type="channel", proj="random")
    g.update(kw)
    return [{"params": [p], **g}]


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_fp32(shape, scale_type):
    """9 steps, gap 3 (refreshes at 1, 4, 7), gradients growing in norm so the norm-growth limiter acts."""
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 9, growing=True)
    ours, opt = run(lambda p: ReferenceSeeds(groups(p, scale_type=scale_type), lr=1e-2), w0, grads)
    ref, ref_opt = run(lambda p: _apollo_torch().APOLLOAdamW(groups(p, scale_type=scale_type), lr=1e-2), w0, grads)
    assert rel_change_err(ours, ref, w0) < 1e-5
    state, ref_state = opt.state[ours], ref_opt.state[ref]
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=1e-4, atol=1e-6)
    # The seed of the current projection and the regenerated projector match the reference's.
    assert int(state["seed"]) != 1  # advanced twice
    torch.testing.assert_close(opt._get_projector(ours, state, opt.param_groups[0]), ref_state["projector"].ortho_matrix)
    torch.testing.assert_close(state["scaled_grad_norm"], ref_state["scaled_grad"].float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_bf16(shape, scale_type):
    w0 = (0.05 * torch.randn(shape)).bfloat16()
    grads = grad_sequence(shape, 9, dtype=torch.bfloat16, growing=True)
    make_ref = lambda p: _apollo_torch().APOLLOAdamW(groups(p, scale_type=scale_type), lr=2e-2)  # noqa: E731
    ideal, _ = run(make_ref, w0, grads, torch.float64)
    ref, _ = run(make_ref, w0, grads, torch.bfloat16)
    ours, _ = run(lambda p: ReferenceSeeds(groups(p, scale_type=scale_type), lr=2e-2), w0, grads, torch.bfloat16)
    err_ours = rel_change_err(ours, ideal, w0)
    err_ref = rel_change_err(ref, ideal, w0)
    assert err_ours <= 1.5 * err_ref + 5e-3, (err_ours, err_ref)
    assert rel_change_err(ours, ref, w0) < 0.1


def test_mini_preset_matches_reference_mini():
    shape = (64, 300)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 7, growing=True)
    ref_group = dict(rank=1, update_proj_gap=3, scale=128.0, proj_type="std", scale_type="tensor", proj="random")
    ours, opt = run(lambda p: ReferenceSeeds.mini([p], lr=1e-2, update_proj_gap=3), w0, grads)
    ref, _ = run(lambda p: _apollo_torch().APOLLOAdamW([{"params": [p], **ref_group}], lr=1e-2), w0, grads)
    g = opt.param_groups[0]
    assert (g["rank"], g["scale_type"], g["scale"]) == (1, "tensor", 128.0)
    assert rel_change_err(ours, ref, w0) < 1e-5


def test_only_a_seed_is_stored_and_projection_is_regenerated():
    p = torch.nn.Parameter(torch.randn(40, 90))
    opt = APOLLOAdamW(groups(p), lr=1e-2)
    grads = grad_sequence((40, 90), 4)
    p.grad = grads[0]
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "side", "seed", "exp_avg", "exp_avg_sq", "scaled_grad_norm"}
    assert state["scaled_grad_norm"].dim() == 0
    assert state["seed"].dtype == torch.int64 and state["seed"].device.type == "cpu"
    assert int(state["seed"]) == 1  # the parameter's position, as apollo-torch
    p1 = opt._get_projector(p, state, opt.param_groups[0])
    assert torch.equal(p1, opt._get_projector(p, state, opt.param_groups[0]))  # deterministic
    assert p1.shape == (40, 8)  # left side for m < n
    assert abs(p1.float().pow(2).mean().item() * 8 - 1) < 0.2  # variance 1/r
    for g in grads[1:]:
        p.grad = g
        opt.step()  # step 4 is a refresh: the seed advances
    assert int(state["seed"]) == APOLLOAdamW._next_seed(1)
    assert not torch.equal(opt._get_projector(p, state, opt.param_groups[0]), p1)


def test_channel_scaling_independent_math():
    """One step in float64 against the formulas: s_j = ||N_j|| / (||R_j|| + 1e-8) along the rank dim."""
    shape = (30, 12)  # right side: R is 30 x r, one factor per row
    w0 = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    ours, opt = run(lambda p: APOLLOAdamW(groups(p, rank=4, scale=4.0), lr=0.1, betas=(0.9, 0.99), eps=1e-6), w0, [g])
    proj = opt._get_projector(ours, opt.state[ours], opt.param_groups[0]).double()
    r = g @ proj.T
    m, v = 0.1 * r, 0.01 * r * r
    n = m / (v.sqrt() + 1e-6)
    s = n.norm(dim=1) / (r.norm(dim=1) + 1e-8)
    step = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)
    expect = w0 - step * math.sqrt(4.0) * g * s[:, None]
    assert rel_change_err(ours, expect, w0) < 1e-10


@pytest.mark.parametrize("flags", [dict(scale_front=True), dict(disable_nl=True)])
def test_parity_reference_flags(flags):
    shape = (64, 300)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 7, growing=True)
    ours, opt = run(lambda p: ReferenceSeeds(groups(p, scale=9.0), lr=1e-2, **flags), w0, grads)
    ref, ref_opt = run(lambda p: _apollo_torch().APOLLOAdamW(groups(p, scale=9.0), lr=1e-2, **flags), w0, grads)
    assert rel_change_err(ours, ref, w0) < 1e-5
    if "disable_nl" in flags:
        assert "scaled_grad_norm" not in opt.state[ours]
    else:  # the limiter's memory includes sqrt(scale) = 3 with scale_front
        torch.testing.assert_close(opt.state[ours]["scaled_grad_norm"], ref_opt.state[ref]["scaled_grad"].float(),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_parity_fp32_every_backend(backend, scale_type):
    shape = (123, 77)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 5, growing=True)
    ref, _ = run(lambda p: _apollo_torch().APOLLOAdamW(groups(p, scale_type=scale_type), lr=1e-2), w0, grads)
    with use_backend(backend):
        ours, _ = run(lambda p: ReferenceSeeds(groups(p, scale_type=scale_type), lr=1e-2), w0, grads)
    assert_change_close(ours.detach(), w0, ref.detach(), f"{backend} vs apollo-torch")
