"""layerwise(): same trajectory as the standard optimizer, with accumulation, schedulers, checkpoints."""
import copy

import pytest
import torch
from torch import nn

from lowrank_kernels.optim import APOLLOAdamW, FrugalAdamW, GaLoreAdamW, layerwise, lowrank_param_groups

from ._helpers import roundtrip


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(24, 36)
        self.mlp = nn.Sequential(nn.Linear(36, 40), nn.GELU(), nn.Linear(40, 24))
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(self.mlp(self.attn(x)))


FACTORIES = {
    "galore": lambda groups: GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01),
    "apollo": lambda groups: APOLLOAdamW(groups, lr=1e-2),
    "frugal": lambda groups: FrugalAdamW(groups, lr=1e-2, projection="random"),  # seeded per parameter
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
}


def _groups(model, name):
    if name == "adamw":
        return [{"params": list(model.parameters())}]
    extra = {"density": 0.25} if name == "frugal" else {"rank": 4}
    return lowrank_param_groups(model, update_proj_gap=2, **extra)


def _data(n):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 24, generator=gen), torch.randn(8, 24, generator=gen)) for _ in range(n)]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("name", ["galore", "apollo", "frugal", "adamw"])
def test_layerwise_equals_standard(name, accumulation):
    torch.manual_seed(0)
    model = Block()
    twin = copy.deepcopy(model)
    factory = FACTORIES[name]
    opt = factory(_groups(model, name))
    lw = layerwise(_groups(twin, name), factory, accumulation_steps=accumulation)
    data = _data(4 * accumulation)  # 4 optimizer steps: refreshes at 1 and 3 with gap 2
    for i in range(0, len(data), accumulation):
        for x, y in data[i:i + accumulation]:
            _loss(model, x, y).backward()
            _loss(twin, x, y).backward()
        opt.step()
        opt.zero_grad()
        lw.step()
        lw.zero_grad()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
        assert q.grad is None  # freed inside backward
    changed = [not torch.equal(p, q) for p, q in zip(Block().parameters(), model.parameters())]
    assert all(changed)


def test_gradients_are_freed_during_backward_and_kept_while_accumulating():
    torch.manual_seed(0)
    model = Block()
    lw = layerwise(_groups(model, "galore"), FACTORIES["galore"], accumulation_steps=2)
    x, y = _data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # first micro-batch: accumulating
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())  # second: stepped and freed
    assert not any(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_scheduler_steps_once_per_optimizer_step():
    torch.manual_seed(0)
    model = Block()
    twin = copy.deepcopy(model)
    sched_fn = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))  # noqa: E731
    opt = FACTORIES["galore"](_groups(model, "galore"))
    sched = sched_fn(opt)
    lw = layerwise(_groups(twin, "galore"), FACTORIES["galore"], accumulation_steps=2, scheduler_factory=sched_fn)
    data = _data(6)
    for i in range(0, 6, 2):
        for x, y in data[i:i + 2]:
            _loss(model, x, y).backward()
            _loss(twin, x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert all(s.last_epoch == 3 for s in lw.schedulers)
    assert lw.get_last_lr() == pytest.approx([1e-2 / 4] * len(lw.optimizers))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_clip_grad_norm_raises():
    lw = layerwise(Block(), FACTORIES["adamw"])
    with pytest.raises(RuntimeError, match="clipping by global norm is impossible"):
        lw.clip_grad_norm_(1.0)


def test_state_dict_round_trip_and_resume():
    torch.manual_seed(0)
    model = Block()
    twin = copy.deepcopy(model)
    data = _data(5)
    lw = layerwise(_groups(model, "apollo"), FACTORIES["apollo"])
    for x, y in data:
        _loss(model, x, y).backward()

    lw2 = layerwise(_groups(twin, "apollo"), FACTORIES["apollo"])
    for x, y in data[:2]:
        _loss(twin, x, y).backward()
    saved = roundtrip(lw2.state_dict())
    lw2.remove_hooks()
    fresh = copy.deepcopy(twin)
    lw3 = layerwise(_groups(fresh, "apollo"), FACTORIES["apollo"])
    lw3.load_state_dict(saved)
    for x, y in data[2:]:
        _loss(fresh, x, y).backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="accumulation_steps"):
        layerwise(Block(), FACTORIES["adamw"], accumulation_steps=0)
    with pytest.raises(TypeError, match="optimizer_factory must return"):
        layerwise(Block(), lambda groups: None)
    with pytest.raises(TypeError, match="nn.Module"):
        layerwise([1, 2], FACTORIES["adamw"])
