"""``LowRankOptimizer.init_state()``: the state a checkpoint loader loads into, made without
training (torchtitan's zero-gradient, lr=0 step): the weights do not move, no projector is
computed from the zero gradient (no SVD), the state has every key a trained state has, and
training afterwards is bitwise training without it (the first real step refreshes)."""
import warnings

import pytest
import torch

from lowrank_kernels import optim as lo

CASES = {
    "galore": lambda ps: lo.GaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.1),
    "galore_full_8bit": lambda ps: lo.GaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2, proj_type="full",
                                                  moment_bits=8, min_8bit_size=0, block_size=4),
    "qgalore": lambda ps: lo.QGaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2, quant_group_size=8),
    "dct": lambda ps: lo.DCTAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2, moment_refresh="reindex"),
    "apollo": lambda ps: lo.APOLLOAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2),
    "frugal": lambda ps: lo.FrugalAdamW(ps, lr=1e-2, density=0.25, update_proj_gap=2),
    "gradnormlorp": lambda ps: lo.GradNormLoRPAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2),
    "adafactor": lambda ps: lo.GaLoreAdafactor(ps, rank=2, update_proj_gap=2),  # relative step: lr None
}


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(12, 8), (6, 10), (10,)]]


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "rank": None, "density": None}]


def _train(opt, ps, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _quiet(fn, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a)


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_state_then_training_is_bitwise_training(name, monkeypatch):
    ps, ref = _params(), _params()
    opt, ref_opt = _quiet(CASES[name], _groups(ps)), _quiet(CASES[name], _groups(ref))
    before = [p.detach().clone() for p in ps]
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    opt.init_state()
    assert not calls, "init_state ran an SVD"
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(p.grad is None for p in ps)
    assert all(float(st["step"]) == 0 for st in opt.state.values())
    _train(ref_opt, ref, 1)
    assert {id(p): sorted(st) for p, st in zip(ps, (opt.state[p] for p in ps))} == \
        {id(p): sorted(ref_opt.state[q]) for p, q in zip(ps, ref)}  # every key a trained state has
    opt.init_state()  # a no-op now
    _train(opt, ps, 4)
    _train(ref_opt, ref, 3, start=1)
    for p, q in zip(ps, ref):
        assert torch.equal(p, q)
    for p, q in zip(ps, ref):
        a, b = opt.state[p], ref_opt.state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_state_saved_after_init_state_loads_and_trains_as_new():
    ps, ref = _params(), _params()
    opt = CASES["galore"](_groups(ps))
    opt.init_state()
    sd = opt.state_dict()
    fresh_ps = _params()
    loaded = CASES["galore"](_groups(fresh_ps))
    loaded.load_state_dict(sd)
    ref_opt = CASES["galore"](_groups(ref))
    _train(loaded, fresh_ps, 3)
    _train(ref_opt, ref, 3)
    assert all(torch.equal(p, q) for p, q in zip(fresh_ps, ref))
