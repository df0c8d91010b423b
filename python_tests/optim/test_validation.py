"""Bad input: clear errors naming the group, the parameter and the problem; nothing half-updated.
Non-finite gradients: the parameter is skipped, everything else is updated."""
import pytest
import torch
from torch import nn

from lowrank_kernels.optim import APOLLOAdamW, FrugalAdamW, GaLoreAdamW, lowrank_param_groups

OPTIMIZERS = {
    "galore": (GaLoreAdamW, {"rank": 4}),
    "apollo": (APOLLOAdamW, {"rank": 4}),
    "frugal": (FrugalAdamW, {"density": 0.25}),
}


@pytest.fixture(params=list(OPTIMIZERS))
def optimizer(request):
    return OPTIMIZERS[request.param]


def P(*shape, device="cpu"):
    return nn.Parameter(torch.randn(*shape, device=device))


def test_non_2d_in_lowrank_group(optimizer):
    cls, key = optimizer
    with pytest.raises(ValueError, match=r"param group 0: parameter 1 has shape \(7,\).*2-D"):
        cls([{"params": [P(10, 8), P(7)], **key}])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(2, 3, 4\)"):
        cls([{"params": [P(2, 3, 4)], **key}])


@pytest.mark.parametrize("rank", [9, 0, -1])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([{"params": [P(10, 8)], "rank": rank}])
    with pytest.raises(ValueError, match="rank"):
        APOLLOAdamW([{"params": [P(8, 10)], "rank": rank}])


def test_rank_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"rank 9 is out of range for parameter 0 of shape \(10, 8\).*min\(m, n\) = 8"):
        GaLoreAdamW([{"params": [P(10, 8)], "rank": 9}])
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 2.5"):
        GaLoreAdamW([{"params": [P(10, 8)], "rank": 2.5}])
    with pytest.raises(ValueError, match="density must be a float in"):
        FrugalAdamW([{"params": [P(10, 8)], "density": 1.5}])
    with pytest.raises(ValueError, match="rank 9 is out of range"):
        FrugalAdamW([{"params": [P(10, 8)], "rank": 9}])


def test_mixed_device_group(optimizer):
    cls, key = optimizer
    with pytest.raises(ValueError, match="several devices.*cpu.*meta|several devices.*meta.*cpu"):
        cls([{"params": [P(10, 8), P(10, 8, device="meta")], **key}])
    with pytest.raises(ValueError, match="several devices"):  # plain groups too
        cls([{"params": [P(5), P(5, device="meta")], "rank": None, "density": None}])


@pytest.mark.parametrize("bad,match", [
    ({"lr": -1.0}, "lr must be"), ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"betas": 0.9}, "betas must be"),
    ({"eps": -1e-8}, "eps must be"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"update_proj_gap": 0}, "update_proj_gap"), ({"proj_type": "diag"}, "proj_type"),
    ({"scale": float("nan")}, "scale"), ({"svd": "qr"}, "svd must be"),
])
def test_bad_hyperparameters_galore(bad, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [P(10, 8)], "rank": 4, **bad}])


def test_bad_hyperparameters_apollo_frugal():
    with pytest.raises(ValueError, match="scale_type"):
        APOLLOAdamW([{"params": [P(10, 8)], "rank": 4, "scale_type": "row"}])
    with pytest.raises(ValueError, match="proj='svd' is not supported"):
        APOLLOAdamW([{"params": [P(10, 8)], "rank": 4, "proj": "svd"}])
    with pytest.raises(ValueError, match="proj_type"):
        APOLLOAdamW([{"params": [P(10, 8)], "rank": 4, "proj_type": "full"}])
    with pytest.raises(ValueError, match="update must be"):
        FrugalAdamW([{"params": [P(10, 8)], "density": 0.5, "update": "adam"}])
    with pytest.raises(ValueError, match="inactive_lr_scale"):
        FrugalAdamW([{"params": [P(10, 8)], "density": 0.5, "inactive_lr_scale": -1.0}])
    with pytest.raises(ValueError, match="projection must be one of"):
        FrugalAdamW([{"params": [P(10, 8)], "density": 0.5, "projection": "dct-not-registered"}])


def test_bad_group_added_later_leaves_optimizer_unchanged(optimizer):
    cls, key = optimizer
    p = P(10, 8)
    opt = cls([{"params": [p], **key}])
    before = len(opt.param_groups)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [P(3)], **key})
    assert len(opt.param_groups) == before
    p.grad = torch.randn(10, 8)
    opt.step()  # still usable


def test_sparse_gradient_rejected():
    p = P(10, 8)
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = torch.randn(10, 8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_only_that_parameter(optimizer, bad):
    """The documented behaviour: the parameter with a non-finite gradient keeps its weight, moments,
    projector and step count; the others step exactly as if it were absent."""
    cls, key = optimizer
    torch.manual_seed(0)
    a, b, c = P(30, 20), P(20, 30), P(6)
    a2, c2 = nn.Parameter(a.detach().clone()), nn.Parameter(c.detach().clone())
    groups = lambda x, y=None: [{"params": [x] + ([y] if y is not None else []), **key}, {"params": [c if y is not None else c2], "rank": None, "density": None}]  # noqa: E501,E731
    opt = cls(groups(a, b), lr=1e-2)
    ctl = cls(groups(a2), lr=1e-2)
    for t in range(5):
        ga, gc = torch.randn(30, 20), torch.randn(6)
        gb = torch.randn(20, 30)
        if t >= 2:  # b's gradient goes bad after two good steps
            gb[3, 4] = bad
        b_before = b.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state[b].items()}
        a.grad, b.grad, c.grad = ga.clone(), gb, gc.clone()
        a2.grad, c2.grad = ga.clone(), gc.clone()
        opt.step()
        ctl.step()
        assert torch.equal(a, a2) and torch.equal(c, c2)
        if t >= 2:
            assert torch.equal(b, b_before)
            assert state_before.keys() == opt.state[b].keys()
            assert all(torch.equal(v, opt.state[b][k]) for k, v in state_before.items())
    assert torch.isfinite(b).all()
    assert opt.nonfinite_skips == 3
    assert int(opt.state[b]["step"]) == 2


def test_nonfinite_first_gradient_creates_no_state():
    p = P(10, 8)
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    g = torch.randn(10, 8)
    g[0, 0] = float("nan")
    p.grad = g
    opt.step()
    assert len(opt.state[p]) == 0 and torch.isfinite(p).all()


def test_skip_nonfinite_false_propagates_like_adamw():
    """Opting out of the check (no host sync) gives torch.optim.AdamW's behaviour: NaN flows into the weights."""
    p = P(6)
    with pytest.warns(UserWarning):
        opt = GaLoreAdamW([p], skip_nonfinite=False)
    p.grad = torch.full((6,), float("nan"))
    opt.step()
    assert torch.isnan(p).all()


def test_rank_default_applies_to_groups_without_rank():
    with pytest.raises(ValueError, match="2-D weights only.*lowrank_param_groups"):
        GaLoreAdamW([P(10, 8), P(8)], rank=4)
    opt = GaLoreAdamW([{"params": [P(10, 8)]}, {"params": [P(8)], "rank": None}], rank=4)
    assert opt.param_groups[0]["rank"] == 4 and opt.param_groups[1]["rank"] is None


def test_lowrank_param_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.attn = nn.ModuleDict({"q": nn.Linear(16, 16), "o": nn.Linear(16, 16, bias=False)})
            self.mlp = nn.Sequential(nn.Linear(16, 40), nn.Linear(40, 16))
            self.tiny_mlp = nn.Linear(16, 3)  # min dim 3 <= rank: stays plain
            self.head = nn.Linear(16, 50)
            self.frozen_mlp = nn.Linear(16, 16)
            self.frozen_mlp.weight.requires_grad_(False)
            self.head.weight = self.embed.weight  # tied

    net = Net()
    groups = lowrank_param_groups(net, rank=4, update_proj_gap=50, scale=0.25, proj_type="std")
    low, plain = groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in low["params"]] == ["attn.q.weight", "attn.o.weight", "mlp.0.weight", "mlp.1.weight"]
    assert low["rank"] == 4 and low["update_proj_gap"] == 50 and low["scale"] == 0.25 and low["proj_type"] == "std"
    assert plain["rank"] is None and plain["density"] is None
    low_ids = {id(p) for p in low["params"]}
    expected_plain = [p for p in net.parameters() if p.requires_grad and id(p) not in low_ids]
    assert [id(p) for p in plain["params"]] == [id(p) for p in expected_plain]
    assert id(net.frozen_mlp.weight) not in {id(p) for g in groups for p in g["params"]}
    opt = GaLoreAdamW(groups, lr=1e-2)
    assert len(opt.param_groups) == 2
    # all Linear modules, FRUGAL's density
    groups = lowrank_param_groups(net, target_modules=None, density=0.5)
    assert "rank" not in groups[0] and groups[0]["density"] == 0.5
    FrugalAdamW(groups)
    with pytest.raises(TypeError, match="nn.Module"):
        lowrank_param_groups([P(3, 3)])
