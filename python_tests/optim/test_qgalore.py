"""QGaLoreAdamW: INT4 projector vs q-galore-torch's quantizer on the same SVD, the GaLore
control, the adaptive gap, INT8 QLinear weights, state-dict round trip, training."""
import importlib.util
import math
import os
import warnings

import pytest
import torch
from torch import nn

import lowrank_kernels
from lowrank_kernels import ops
from lowrank_kernels.nn import QLinear, quantize_linear_layers
from lowrank_kernels.optim import GaLoreAdamW, QGaLoreAdamW, lowrank_param_groups
from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim.qgalore import projector_similarity

from .._numerics import assert_change_close
from ._helpers import grad_sequence, roundtrip, run


def _qgalore_projector_class():
    """q-galore-torch's GaLoreProjector, loaded from its file (the package __init__
    imports bitsandbytes, which is slow and irrelevant here)."""
    spec = importlib.util.find_spec("q_galore_torch")
    if spec is None:
        pytest.skip("q-galore-torch is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "q_galore_projector.py")
    mod_spec = importlib.util.spec_from_file_location("_qgalore_projector_ref", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.GaLoreProjector


def _fixed_official_dequant(p, group_size, n_bit=4):
    """q-galore-torch's asymmetric quantizer with the documented fix (the integer zero
    point is not clamped to [0, 2^b - 1]), dequantized."""
    w = p.reshape(-1, group_size)
    mx, mn = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
    s = (mx - mn).clamp(min=1e-5) / (2**n_bit - 1)
    z = -torch.round(mn / s)
    q = torch.clamp(torch.round(w / s) + z, 0, 2**n_bit - 1)
    return ((q - z) * s).reshape(p.shape), s


@pytest.mark.parametrize("m,n", [(300, 64), (64, 300)])
def test_projector_quantization_vs_q_galore_torch_same_svd(m, n):
    GaLoreProjector = _qgalore_projector_class()
    torch.manual_seed(0)
    gs, rank = 64, 16
    # a positive mean makes the top singular vector one-signed: a group the official
    # quantizer clips (its zero point is clamped to [0, 15]).
    grad = torch.randn(m, n) + 2.0
    official = GaLoreProjector(rank, update_proj_gap=200, quant=True, group_size=gs, n_bit=4)
    r_official = official.project(grad.clone(), 0)
    p_official = (official.ortho_matrix_scales * (official.ortho_matrix.float() - official.ortho_matrix_zeros)).reshape(
        official.ortho_matrix_shape)

    side = "right" if m >= n else "left"
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)  # the same SVD call as both optimizers
    p_float = vh[:rank] if side == "right" else u[:, :rank]

    w = nn.Parameter(torch.zeros(m, n))
    opt = QGaLoreAdamW([{"params": [w], "rank": rank}], lr=0.0, quant_group_size=gs, betas=(0.5, 0.9))
    w.grad = grad.clone()
    opt.step()
    st = opt.state[w]
    assert st["proj_packed"].numel() == p_float.numel() // 2
    p_ours = opt._get_projector(w, st, opt.param_groups[0]).dequantize()

    # ours: within half a step of the float projector everywhere
    steps = st["proj_scale"].repeat_interleave(gs).view(p_float.shape)
    assert ((p_ours - p_float).abs() <= steps / 2 * (1 + 1e-4) + 1e-7).all()
    # the fixed official quantizer on the same SVD agrees with ours to one step
    p_fixed, s_fixed = _fixed_official_dequant(p_float, gs)
    torch.testing.assert_close(s_fixed.flatten(), st["proj_scale"], rtol=1e-6, atol=0)
    assert ((p_fixed - p_ours).abs() <= steps * (1 + 1e-4)).all()
    if side == "right":
        # row 0 (the top singular vector) is one group and one-signed: the unfixed
        # official quantizer clips it by more than a step
        assert ((p_official - p_float).abs() > 1.5 * steps).any()
    # the projected gradient (exp_avg = (1 - beta1) R after one step) matches the fixed
    # official projection as closely as the two quantizers agree, and the float one
    r_ours = st["exp_avg"] / 0.5
    r_fixed = grad @ p_fixed.T if side == "right" else p_fixed.T @ grad
    r_float = grad @ p_float.T if side == "right" else p_float.T @ grad
    err_ours = ((r_ours - r_float).norm() / r_float.norm()).item()
    err_fixed = ((r_fixed - r_float).norm() / r_float.norm()).item()
    err_official = ((r_official - r_float).norm() / r_float.norm()).item()
    assert err_ours < 0.05 and err_ours <= 1.5 * err_fixed + 1e-6
    assert err_ours < (err_official if side == "right" else 1.5 * err_official)


def test_unquantized_with_fixed_gap_is_galore(backend):
    """Control: quant=False and a gap that never adapts is exactly GaLoreAdamW."""
    w0 = torch.randn(40, 30)
    grads = grad_sequence((40, 30), 7)
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    group = {"rank": 5, "update_proj_gap": 3, "scale": 0.25}
    with use_backend(backend):
        pq, _ = run(lambda p: QGaLoreAdamW([dict(group, params=[p])], quant=False, cos_threshold=2.0, **kw), w0, grads)
        pg, _ = run(lambda p: GaLoreAdamW([dict(group, params=[p])], **kw), w0, grads)
    assert torch.equal(pq, pg)


def test_every_backend_matches_reference(backend):
    """Three INT4 steps on a dense weight and on a QLinear weight (with SR): each backend
    against the reference backend. The INT8 levels may differ by one where float32
    rounding differs, so the QLinear weight is compared to within one step."""
    def go(b):
        torch.manual_seed(9)
        dense = nn.Parameter(torch.randn(50, 37))
        q = QLinear(37, 50, bias=False, group_size=64)
        grads = grad_sequence((50, 37), 3, seed=2)
        opt = QGaLoreAdamW([{"params": [dense, q.weight], "rank": 6, "update_proj_gap": 2}], lr=0.01,
                           quant_group_size=32, seed=1)
        with use_backend(b):
            for g in grads:
                dense.grad, q.weight.grad = g.clone(), g.T.contiguous().T.clone()
                opt.step()
        return dense.detach(), q
    d_ref, q_ref = go("reference")
    d_out, q_out = go(backend)
    torch.manual_seed(9)
    d_init = torch.randn(50, 37)  # go()'s initial dense weight
    assert_change_close(d_out, d_init, d_ref, "dense weight after 3 steps")
    w_ref, w_out = q_ref.dequantized_weight(), q_out.dequantized_weight()
    steps = q_ref.weight_scale.repeat_interleave(64)[: w_ref.numel()].view(w_ref.shape)
    assert ((w_out - w_ref).abs() <= steps * 1.01 + 1e-6).all()
    assert (q_out.weight_q != q_ref.weight_q).float().mean().item() < 0.01


def test_int4_step_is_galore_on_the_dequantized_projector():
    """One step: W' = (1 - lr wd) W - step_size * scale * back(N) with P = dequant(INT4)."""
    torch.manual_seed(1)
    w0 = torch.randn(30, 50, dtype=torch.float64)
    g = torch.randn(30, 50, dtype=torch.float64)
    p, opt = run(lambda p: QGaLoreAdamW([{"params": [p], "rank": 4}], lr=0.02, weight_decay=0.1, quant_group_size=32),
                 w0, [g])
    st = opt.state[p]
    P = opt._get_projector(p, st, opt.param_groups[0]).dequantize(torch.float64)  # left: 30 x 4
    R = P.T @ g
    M, V = 0.1 * R, 0.001 * R * R
    N = M / (V.sqrt() + 1e-8)
    step_size = 0.02 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expect = (1 - 0.02 * 0.1) * w0 - step_size * 0.25 * (P @ N)
    torch.testing.assert_close(p.detach(), expect, rtol=1e-10, atol=1e-10)


def test_adaptive_gap_doubles_and_clears_queue():
    """Constant gradient: every similarity is 1. Gap 1 -> refreshes at t = 1..6; the 5th
    similarity (t = 6) doubles the gap and clears the queue; then refreshes at
    (t - 1) % 2 == 0: 7, 9, 11, 13, 15 -> gap 4; 17, 21, 25, 29, 33 -> gap 8."""
    g = torch.randn(40, 30)
    p = nn.Parameter(torch.randn(40, 30))
    opt = QGaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 1}], lr=1e-3)
    gaps, counts = {}, {}
    for t in range(1, 36):
        p.grad = g.clone()
        opt.step()
        gaps[t] = int(opt.state[p]["proj_gap"])
        counts[t] = int(opt.state[p]["svd_count"])
    assert [gaps[t] for t in (5, 6, 14, 15, 32, 33)] == [1, 2, 2, 4, 4, 8]
    assert counts[6] == 6 and counts[15] == 11 and counts[33] == 16
    assert int(opt.state[p]["sim_count"]) == 0  # cleared after the last doubling
    assert opt.svd_count == 16
    assert opt.refresh_stats() == [{"param": 1, "shape": (40, 30), "proj_gap": 8, "svd_count": 16, "int8_weight": False}]


@pytest.mark.parametrize("similarity", ["abs_cos", "overlap"])
def test_random_gradients_keep_the_gap(similarity):
    grads = grad_sequence((60, 50), 12, seed=4)
    p, opt = run(lambda p: QGaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 2}], lr=1e-3,
                                        similarity=similarity), torch.randn(60, 50), grads)
    assert int(opt.state[p]["proj_gap"]) == 2 and int(opt.state[p]["svd_count"]) == 6


def test_similarity_is_sign_safe():
    torch.manual_seed(0)
    p = torch.linalg.qr(torch.randn(50, 6))[0]  # left projector 50 x 6
    flipped = p * torch.tensor([-1.0, 1, -1, 1, 1, -1])
    for kind in ("abs_cos", "overlap"):
        assert abs(projector_similarity(p, flipped, "left", kind).item() - 1.0) < 1e-5
        assert abs(projector_similarity(p.T, flipped.T, "right", kind).item() - 1.0) < 1e-5
    other = torch.linalg.qr(torch.randn(50, 6))[0]
    assert projector_similarity(p, other, "left", "overlap").item() < 0.5


def _qlinear_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 1))
    quantize_linear_layers(model, group_size=64)
    return model


def _make_opt(model):
    groups = lowrank_param_groups(model, target_modules=None, rank=8, update_proj_gap=10, scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QGaLoreAdamW(groups, lr=3e-3, quant_group_size=64, seed=11)


def _train(model, opt, X, Y, steps):
    losses = []
    for _ in range(steps):
        loss = ((model(X) - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlinear_model_trains():
    model = _qlinear_model()
    opt = _make_opt(model)
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(256, 32, generator=gen)
    Y = torch.sin(X[:, :1]) + 0.5 * X[:, 1:2]
    q_before = model[0].weight_q.clone()
    losses = _train(model, opt, X, Y, 60)
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert not torch.equal(model[0].weight_q, q_before)  # the INT8 weights moved
    stats = opt.refresh_stats()
    assert [s["int8_weight"] for s in stats] == [True, True] and all(s["svd_count"] == 6 for s in stats)
    # the last Linear (48 -> 1, min dim 1 <= rank) is a QLinear in the plain AdamW group
    assert "exp_avg" in opt.state[model[4].weight] and opt.state[model[4].weight]["exp_avg"].shape == (1, 48)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(64, 32, generator=gen)
    Y = X[:, :1] * 0.3
    model = _qlinear_model(1)
    opt = _make_opt(model)
    _train(model, opt, X, Y, 12)
    msd, osd = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    model2 = _qlinear_model(2)
    model2.load_state_dict(msd)
    opt2 = _make_opt(model2)
    opt2.load_state_dict(osd)
    assert opt2.state[model2[0].weight]["proj_packed"].dtype == torch.uint8
    la = _train(model, opt, X, Y, 10)  # crosses a refresh (step 21) and SR draws
    lb = _train(model2, opt2, X, Y, 10)
    assert la == lb
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_sr_weight_update_is_within_one_step_of_the_float_update():
    torch.manual_seed(2)
    q = QLinear(50, 40, bias=False, group_size=64)
    w0 = q.dequantized_weight().double()
    g = torch.randn(40, 50)
    opt = QGaLoreAdamW([{"params": [q.weight], "rank": 6}], lr=0.05, quant_group_size=32)
    q.weight.grad = g.clone()
    opt.step()
    P = opt._get_projector(q.weight, opt.state[q.weight], opt.param_groups[0]).dequantize(torch.float64)
    R = P.T @ g.double()  # 40 x 50 -> left, 6 x 50
    N = (0.1 * R) / ((0.001 * R * R).sqrt() + 1e-8)
    expect = w0 - 0.05 * math.sqrt(1 - 0.999) / 0.1 * 0.25 * (P @ N)
    got = q.dequantized_weight().double()
    steps = q.weight_scale.double().repeat_interleave(64)[: got.numel()].view(got.shape)
    assert ((got - expect).abs() <= steps * (1 + 1e-3) + 1e-6).all()


def test_bad_group_keys():
    p = nn.Parameter(torch.randn(20, 10))
    with pytest.raises(ValueError, match="quant_n_bit must be 4"):
        QGaLoreAdamW([{"params": [p], "rank": 2}], quant_n_bit=8)
    with pytest.raises(ValueError, match="quant_group_size must be a positive even int"):
        QGaLoreAdamW([{"params": [p], "rank": 2, "quant_group_size": 7}])
    with pytest.raises(ValueError, match="similarity must be one of"):
        QGaLoreAdamW([{"params": [p], "rank": 2}], similarity="cos")
    with pytest.raises(ValueError, match="gamma_proj must be a number >= 1"):
        QGaLoreAdamW([{"params": [p], "rank": 2}], gamma_proj=0.5)
    with pytest.raises(ValueError, match="proj_type must be one of"):
        QGaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "full"}])
