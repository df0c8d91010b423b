"""DCTAdamW: parity with an independent float64 reimplementation over several refreshes
(every moment rule, both sides, both norms), backends agree, state-dict round trip,
zero gradient choice, state memory (indices only), parameter routing, bad input;
FrugalAdamW(projection="dct")."""
import math
import warnings

import numpy as np
import pytest
import scipy.fft
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import DCTAdamW, FrugalAdamW

from .._numerics import assert_change_close
from ._helpers import grad_sequence, rel_change_err, roundtrip, run
from ..conftest import require_backend


def dct_adamw_float64(w0, grads, *, rank, gap, scale, lr, betas, eps, wd, side, norm, moment_refresh):
    """DCT-AdamW written independently (numpy/scipy, float64)."""
    w = w0.double().numpy().copy()
    m_, n_ = w.shape
    s = n_ if side == "right" else m_
    C = scipy.fft.dct(np.eye(s), norm="ortho", axis=0)
    b1, b2 = betas
    M = V = idx = None
    for t, g in enumerate(grads, start=1):
        G = g.double().numpy()
        if (t - 1) % gap == 0:
            S = G @ C.T if side == "right" else C @ G
            A = np.abs(S) if norm == 1 else S * S
            score = A.sum(axis=0 if side == "right" else 1)
            new = np.lexsort((np.arange(s), -score))[:rank]
            if M is None:
                shape = (m_, rank) if side == "right" else (rank, n_)
                M, V = np.zeros(shape), np.zeros(shape)
            elif moment_refresh == "reset":
                M, V = np.zeros_like(M), np.zeros_like(V)
            elif moment_refresh == "reindex":
                M2, V2 = np.zeros_like(M), np.zeros_like(V)
                for j, k in enumerate(new):
                    hit = np.nonzero(idx == k)[0]
                    if hit.size:
                        if side == "right":
                            M2[:, j], V2[:, j] = M[:, hit[0]], V[:, hit[0]]
                        else:
                            M2[j], V2[j] = M[hit[0]], V[hit[0]]
                M, V = M2, V2
            idx = new
        P = C[idx]  # r x s
        R = G @ P.T if side == "right" else P @ G
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        N = M / (np.sqrt(V) + eps)
        back = N @ P if side == "right" else P.T @ N
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w * (1 - lr * wd) - step * scale * back
    return torch.from_numpy(w), idx


HYPER = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, wd=0.1, scale=0.5)


def make(rank, gap, norm, moment_refresh, proj_type="std", **kw):
    return lambda p: DCTAdamW(
        [p], lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], weight_decay=HYPER["wd"], rank=rank,
        update_proj_gap=gap, scale=HYPER["scale"], proj_type=proj_type, norm=norm, moment_refresh=moment_refresh, **kw
    )


@pytest.mark.parametrize("moment_refresh", ["keep", "reindex", "reset"])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("shape", [(40, 24), (19, 33)])  # right side, left side
def test_matches_float64_reimplementation(shape, norm, moment_refresh):
    rank, gap, steps = 6, 3, 8  # refreshes at t = 1, 4, 7
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, steps, torch.float64, growing=True)
    p, opt = run(make(rank, gap, norm, moment_refresh), w0, grads)
    side = "right" if shape[0] >= shape[1] else "left"
    expect, idx = dct_adamw_float64(
        w0, grads, rank=rank, gap=gap, side=side, norm=norm, moment_refresh=moment_refresh, **HYPER
    )
    assert rel_change_err(p, expect, w0) < 1e-10
    assert opt.state[p]["indices"].tolist() == idx.tolist()


def test_refresh_every_step_float32_vs_float64():
    shape, rank, steps = (30, 20), 5, 6
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, steps)
    p, opt = run(make(rank, 1, 1, "reindex"), w0, grads)
    expect, idx = dct_adamw_float64(
        w0, grads, rank=rank, gap=1, side="right", norm=1, moment_refresh="reindex", **HYPER
    )
    # float32 weights: each step rounds W (~1) while it moves by ~1e-2.
    assert rel_change_err(p, expect, w0) < 1e-4
    assert opt.state[p]["indices"].tolist() == idx.tolist()


def test_reindex_changes_the_result_when_indices_move():
    """The three moment rules really differ once the selected set changes."""
    shape, rank = (24, 16), 4
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 4, torch.float64, seed=3)
    outs = {mr: run(make(rank, 2, 1, mr), w0, grads)[0].detach() for mr in ("keep", "reindex", "reset")}
    assert not torch.equal(outs["keep"], outs["reindex"])
    assert not torch.equal(outs["reindex"], outs["reset"])


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_backends_agree_with_reference(backend):
    require_backend("projection_project_update_backproject", backend)
    for shape, dtype in [((37, 22), torch.float32), ((18, 29), torch.bfloat16)]:
        w0 = torch.randn(shape).to(dtype)
        grads = grad_sequence(shape, 4, dtype)
        with use_backend("reference"):
            pr, optr = run(make(5, 2, 2, "reindex"), w0, grads)
        with use_backend(backend):
            pb, optb = run(make(5, 2, 2, "reindex"), w0, grads)
        assert torch.equal(optr.state[pr]["indices"], optb.state[pb]["indices"])
        assert_change_close(pb.detach(), w0, pr.detach(), f"{backend} {dtype}")  # elementwise, by the change


def test_state_dict_round_trip():
    shape, rank = (32, 20), 5
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 9)
    # Uninterrupted run.
    p_full, _ = run(make(rank, 3, 1, "reindex"), w0, grads)
    # Interrupted after 5 steps, saved, loaded into a fresh optimizer, continued.
    p, opt = run(make(rank, 3, 1, "reindex"), w0, grads[:5])
    sd = roundtrip(opt.state_dict())
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = make(rank, 3, 1, "reindex")(p2)
    opt2.load_state_dict(sd)
    st = opt2.state[p2]
    assert st["indices"].dtype == torch.int32 and st["step"].device.type == "cpu"
    for g in grads[5:]:
        p2.grad = g.clone()
        opt2.step()
    assert torch.equal(p2.detach(), p_full.detach())


def _corrupt(sd, key, value):
    sd = roundtrip(sd)
    sd["state"][0][key] = value
    return sd


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda idx: idx.to(torch.int64), TypeError, "must be int32"),
        (lambda idx: idx.float(), TypeError, "must be int32"),
        (lambda idx: idx[:-1].clone(), ValueError, r"shape \(5,\)"),
        (lambda idx: torch.cat([idx, idx[:1]]), ValueError, r"shape \(5,\)"),
        (lambda idx: idx.view(1, -1).clone(), ValueError, r"shape \(5,\)"),
        (lambda idx: torch.where(idx == idx.max(), torch.tensor(20, dtype=torch.int32), idx), ValueError, r"\[0, 20\)"),
        (lambda idx: torch.where(idx == idx.min(), torch.tensor(-1, dtype=torch.int32), idx), ValueError, r"\[0, 20\)"),
        (lambda idx: torch.cat([idx[:-1], idx[:1]]), ValueError, "distinct"),
        (lambda idx: "not a tensor", TypeError, "must be a Tensor"),
    ],
)
def test_load_state_dict_rejects_bad_indices(bad, exc, match):
    """Wrong dtype, shape, range (CUDA gathers are unchecked) or repeated indices: a clear error
    naming the parameter, raised before anything is loaded (the live state is unchanged)."""
    shape, rank = (32, 20), 5
    w0 = torch.randn(shape)
    p, opt = run(make(rank, 3, 1, "keep"), w0, grad_sequence(shape, 2))
    sd = opt.state_dict()
    good = roundtrip(sd)
    p2, opt2 = run(make(rank, 3, 1, "keep"), w0, grad_sequence(shape, 1, seed=9))
    before = {k: v.clone() for k, v in opt2.state[p2].items()}
    hp_before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt2.param_groups]
    with pytest.raises(exc, match=match) as info:
        opt2.load_state_dict(_corrupt(sd, "indices", bad(good["state"][0]["indices"])))
    assert "param group 0, parameter 0" in str(info.value) and "(32, 20)" in str(info.value)
    after = opt2.state[p2]
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt2.param_groups] == hp_before
    # The untouched state dict still loads.
    opt2.load_state_dict(good)
    assert torch.equal(opt2.state[p2]["indices"], good["state"][0]["indices"])


def test_load_state_dict_checks_range_against_the_saved_side():
    """Left side (m < n): the indices index the order-m basis; a value in [m, n) is rejected."""
    shape, rank = (12, 30), 4
    w0 = torch.randn(shape)
    p, opt = run(make(rank, 3, 1, "keep"), w0, grad_sequence(shape, 1))
    assert int(opt.state[p]["side"]) == 1
    sd = roundtrip(opt.state_dict())
    idx = sd["state"][0]["indices"].clone()
    idx[0] = 20  # < n but >= m
    sd["state"][0]["indices"] = idx
    with pytest.raises(ValueError, match=r"\[0, 12\) \(the DCT basis order of the left side\)"):
        opt.load_state_dict(sd)
    sd["state"][0]["indices"] = idx.clone().fill_(0).add_(torch.arange(rank, dtype=torch.int32))
    sd["state"][0]["side"] = torch.tensor(3, dtype=torch.int8)
    with pytest.raises(ValueError, match="saved side"):
        opt.load_state_dict(sd)


def test_zero_gradient_selects_first_indices():
    p = torch.nn.Parameter(torch.randn(20, 12))
    opt = DCTAdamW([p], rank=4, update_proj_gap=1)
    p.grad = torch.zeros_like(p)
    w0 = p.detach().clone()
    opt.step()
    assert opt.state[p]["indices"].tolist() == [0, 1, 2, 3]
    assert torch.equal(p.detach(), w0)  # zero gradient, zero weight decay: no move


def test_state_memory_indices_only():
    """Per projected layer: moments + int indices; no float tensor of the projector's size."""
    shapes = [(64, 40), (40, 64), (48, 48)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    rank = 8
    opt = DCTAdamW(params, rank=rank, update_proj_gap=2)
    for _ in range(3):
        for q in params:
            q.grad = torch.randn_like(q)
        opt.step()
    for q in params:
        st = opt.state[q]
        m, n = q.shape
        side = "right" if m >= n else "left"
        assert set(st) == {"step", "side", "indices", "exp_avg", "exp_avg_sq"}
        assert st["indices"].dtype == torch.int32 and st["indices"].shape == (rank,)
        low = ops.lowrank_shape(m, n, rank, side)
        assert st["exp_avg"].shape == low and st["exp_avg_sq"].shape == low
        proj_numel = rank * (n if side == "right" else m)
        float_numel = sum(t.numel() for t in st.values() if t.is_floating_point())
        assert float_numel == 2 * math.prod(low) + 1  # the moments and the step counter
        assert all(t.numel() != proj_numel or not t.is_floating_point() or k.startswith("exp_avg")
                   for k, t in st.items())


def test_routing_1d_large_and_small_params_to_adamw():
    """A weight with a dimension >= max_dim is plain AdamW; a 1-D parameter or a weight with
    min(m, n) < rank in a low-rank group is refused (as GaLoreAdamW does), never a quiet fallback."""
    emb = torch.nn.Parameter(torch.randn(32000, 8) * 0.01)  # a dim >= 32000: plain AdamW
    bias = torch.nn.Parameter(torch.randn(24))
    tiny = torch.nn.Parameter(torch.randn(3, 24))  # min dim 3 < rank
    w = torch.nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(24,\): a low-rank group takes 2-D weights only"):
        DCTAdamW([emb, bias, w], lr=0.01, rank=4)
    with pytest.raises(ValueError, match=r"rank 4 is out of range for parameter 1 of shape \(3, 24\)"):
        DCTAdamW([emb, tiny, w], lr=0.01, rank=4)
    params = [emb, bias, tiny, w]
    clones = [torch.nn.Parameter(q.detach().clone()) for q in params[:3]]
    opt = DCTAdamW([{"params": [emb, w]}, {"params": [bias, tiny], "rank": None}], lr=0.01, rank=4,
                   weight_decay=0.1)
    ref = torch.optim.AdamW(clones, lr=0.01, weight_decay=0.1, eps=1e-6)
    for _ in range(3):
        for q, c in zip(params, clones + [None]):
            g = torch.randn_like(q)
            q.grad = g
            if c is not None:
                c.grad = g.clone()
        opt.step()
        ref.step()
    for q, c in zip(params[:3], clones):
        assert torch.equal(q.detach(), c.detach())
        assert "indices" not in opt.state[q]
    assert opt.state[w]["indices"].shape == (4,)
    # max_dim=None projects the embedding too.
    emb2 = torch.nn.Parameter(torch.randn(32000, 8) * 0.01)
    opt2 = DCTAdamW([emb2], rank=4, max_dim=None)
    emb2.grad = torch.randn_like(emb2)
    opt2.step()
    assert opt2.state[emb2]["exp_avg"].shape == (32000, 4)


def test_bad_input():
    p = torch.nn.Parameter(torch.randn(10, 8))
    with pytest.raises(ValueError, match="norm must be 1 or 2"):
        DCTAdamW([p], rank=2, norm=3)
    with pytest.raises(ValueError, match="moment_refresh must be one of"):
        DCTAdamW([p], rank=2, moment_refresh="rotate")
    with pytest.raises(ValueError, match="update_proj_gap must be an int >= 1"):
        DCTAdamW([p], rank=2, update_proj_gap=0)
    with pytest.raises(ValueError, match="proj_type must be one of"):
        DCTAdamW([p], rank=2, proj_type="full")
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        DCTAdamW([p], rank=0)
    with pytest.raises(ValueError, match="max_dim must be a positive int or None"):
        DCTAdamW([p], rank=2, max_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DCTAdamW([p], rank=2)
    with pytest.raises(ValueError, match="norm must be 1 or 2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "norm": 0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_frugal_dct_projection(shape):
    """FrugalAdamW(projection="dct") uses the DCT top-k subspace: its state-full part equals
    FRUGAL with the same subspace built by hand."""
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = grad_sequence(shape, 3, torch.float64)
    with use_backend("reference"):  # the subspace choice is under test here, not the kernels
        p, opt = run(lambda q: FrugalAdamW([q], rank=5, projection="dct", update_proj_gap=2, lr=0.01), w0, grads)
    side = "right" if shape[0] >= shape[1] else "left"
    s = shape[1] if side == "right" else shape[0]
    idx = ops.dct_score_topk(grads[2], 5, side=side)  # last refresh at t = 3
    expect = ops.DCTProjector(ops.dct_basis(s, torch.float64), idx).dense(side)
    torch.testing.assert_close(opt.state[p]["projector"], expect, rtol=0, atol=1e-12)
    assert p.detach().sub(w0).abs().max() > 0
