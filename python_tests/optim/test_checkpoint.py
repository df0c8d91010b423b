"""State dicts: tensors only, torch.load(weights_only=True), and bit-identical resume across a refresh."""
import pytest
import torch

from lowrank_kernels.optim import APOLLOAdamW, FrugalAdamW, GaLoreAdamW

from ._helpers import roundtrip

SHAPES = [(37, 21), (19, 45), (13,)]

MAKERS = {
    "galore": lambda ps: GaLoreAdamW(_groups(ps, rank=5), lr=1e-2, weight_decay=0.1),
    "galore_lowrank_svd": lambda ps: GaLoreAdamW(_groups(ps, rank=5, svd="lowrank"), lr=1e-2),
    "galore_full": lambda ps: GaLoreAdamW(_groups(ps, rank=5, proj_type="full"), lr=1e-2),
    "apollo": lambda ps: APOLLOAdamW(_groups(ps, rank=5), lr=1e-2, weight_decay=0.1),
    "apollo_mini": lambda ps: APOLLOAdamW.mini(_groups(ps), update_proj_gap=3),
    "frugal_random": lambda ps: FrugalAdamW(_groups(ps, density=0.25, projection="random"), lr=1e-2),
    "frugal_svd": lambda ps: FrugalAdamW(_groups(ps, density=0.25, projection="svd"), lr=1e-2),
}


def _groups(ps, **kw):
    """2-D params in a low-rank group (gap 3), the 1-D one plain."""
    low = {"params": [p for p in ps if p.dim() == 2], "update_proj_gap": 3, **kw}
    return [low, {"params": [p for p in ps if p.dim() != 2], "rank": None, "density": None}]


def _params(dtype):
    gen = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(steps, dtype):
    gen = torch.Generator().manual_seed(6)
    return [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(steps)]


def _step(opt, ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_identical_across_refresh(name, dtype):
    """Stop after step 2, save, load into a fresh optimizer on fresh parameters, run to step 8:
    refreshes at steps 4 and 7 happen after the resume; the weights equal the uninterrupted run bit for bit."""
    make = MAKERS[name]
    grads = _grads(8, dtype)
    ps = _params(dtype)
    opt = make(ps)
    for g in grads:
        _step(opt, ps, g)

    qs = _params(dtype)
    opt_q = make(qs)
    for g in grads[:2]:
        _step(opt_q, qs, g)
    saved = roundtrip(opt_q.state_dict())
    weights = [q.detach().clone() for q in qs]
    del opt_q

    rs = [torch.nn.Parameter(w) for w in weights]
    opt_r = make(rs)
    opt_r.load_state_dict(saved)
    for g in grads[2:]:
        _step(opt_r, rs, g)
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)
    for p, r in zip(ps, rs):
        for key, value in opt.state[p].items():
            other = opt_r.state[r][key]
            assert other.dtype == value.dtype and other.device == value.device, key
            assert torch.equal(value, other), key


def test_state_is_tensors_only_and_keeps_dtypes_and_host_keys():
    ps = _params(torch.bfloat16)
    opt = GaLoreAdamW(_groups(ps, rank=5), lr=1e-2)
    _step(opt, ps, _grads(1, torch.bfloat16)[0])
    # A float32 moment for a bfloat16 parameter (what a subclass keeping fp32 moments stores):
    # torch's default load would cast it to bfloat16; ours keeps it.
    opt.state[ps[0]]["exp_avg"] = opt.state[ps[0]]["exp_avg"].float() + 1e-3
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())
    loaded = roundtrip(sd)
    qs = _params(torch.bfloat16)
    opt_q = GaLoreAdamW(_groups(qs, rank=5), lr=1e-2)
    opt_q.load_state_dict(loaded)
    st = opt_q.state[qs[0]]
    assert st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], opt.state[ps[0]]["exp_avg"])
    assert st["step"].device.type == "cpu" and st["side"].dtype == torch.int8
    assert opt_q.param_groups[0]["rank"] == 5


def test_apollo_state_dict_holds_no_projection():
    ps = _params(torch.float32)
    opt = APOLLOAdamW(_groups(ps, rank=5), lr=1e-2)
    _step(opt, ps, _grads(1, torch.float32)[0])
    for pid, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            assert v.numel() <= max(5 * 45, 13), key  # moments (r x max dim) at most; no r x n projection
        if "seed" in st:
            assert st["seed"].dtype == torch.int64
