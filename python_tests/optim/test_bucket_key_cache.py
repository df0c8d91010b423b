"""The per-parameter memo of bucket keys (``_cached_bucket_key``): reused while the parameter,
its state objects, its side tensor and its group's values (but ``lr``) are the same, computed
again after any change, and always equal to a fresh ``_bucket_key``."""
import pytest
import torch

from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW


def _opt(cls):
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(12, 10)), torch.nn.Parameter(torch.randn(8, 14))]
    opt = cls([{"params": ws, "rank": 3, "update_proj_gap": 50}], lr=0.01)
    for _ in range(2):
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
    return opt, ws


def _check(opt, w):
    group = opt.param_groups[0]
    opt._steps.new_step(len(opt._param_index), len(opt.param_groups))  # as a new step does
    got = opt._cached_bucket_key(w, opt.state[w], group)
    assert got == opt._bucket_key(w, opt.state[w], group)
    return got


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_reused_while_unchanged(cls, monkeypatch):
    opt, ws = _opt(cls)
    key = _check(opt, ws[0])
    calls = []
    real = type(opt)._bucket_key
    monkeypatch.setattr(type(opt), "_bucket_key", lambda self, *a: calls.append(1) or real(self, *a))
    for _ in range(3):
        opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.5  # a scheduler: no key reads lr
        opt._steps.new_step(len(opt._param_index), len(opt.param_groups))
        assert opt._cached_bucket_key(ws[0], opt.state[ws[0]], opt.param_groups[0]) is key
    assert not calls


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_recomputed_after_any_change(cls):
    opt, ws = _opt(cls)
    w = ws[0]
    group, state = opt.param_groups[0], opt.state[w]
    k0 = _check(opt, w)
    group["betas"] = (0.8, 0.99)
    k1 = _check(opt, w)
    assert k1 != k0 and 0.8 in k1
    group["eps"] = 1e-6
    assert 1e-6 in _check(opt, w)
    state["exp_avg"] = state["exp_avg"].to(torch.float64)  # a replaced state object
    state["exp_avg_sq"] = state["exp_avg_sq"].to(torch.float64)
    assert torch.float64 in _check(opt, w)
    state["side"].fill_(1 - int(state["side"]))  # changed in place: its version counter moves
    assert _check(opt, w) is not None
    w.data = w.data.to(torch.float64)  # the parameter's dtype
    assert torch.float64 in _check(opt, w)
    state["extra"] = torch.zeros(1)  # one more state entry
    _check(opt, w)
    del state["extra"]
    _check(opt, w)


def test_steps_follow_a_betas_change_per_group():
    """Two groups, one bucket each after the other's betas change: both step as the
    per-parameter path does (bitwise)."""
    torch.manual_seed(1)
    ws = [torch.nn.Parameter(torch.randn(12, 10)) for _ in range(4)]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    groups = lambda ps, **kw: [{"params": ps[:2], "rank": 3, **kw}, {"params": ps[2:], "rank": 3, **kw}]
    a = GaLoreAdamW(groups(ws), lr=0.01)
    b = GaLoreAdamW(groups(ref, foreach=False), lr=0.01)
    for step in range(5):
        if step == 3:
            a.param_groups[1]["betas"] = b.param_groups[1]["betas"] = (0.5, 0.9)
        gs = [torch.randn(12, 10) for _ in ws]
        for w, r, g in zip(ws, ref, gs):
            w.grad, r.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for w, r in zip(ws, ref):
            assert torch.equal(w.detach(), r.detach()), step
