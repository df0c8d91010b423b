"""The code test_owlore_ddp.py runs in each of its 2 gloo processes (CPU).

Each rank writes ``{check: [ok, detail]}`` to ``<outdir>/rank<r>.json``.
"""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from torch import nn

from .._dist import rank_session

STEPS = 6
PERIOD = 2
GAMMA = 2
TOL = 1e-4  # ||W_ddp - W_single|| / ||W_single - W_0||: only the gradient's summation order differs


class Block(nn.Module):
    def __init__(self, d=8, h=12):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, h)
        self.out = nn.Linear(h, d)

    def forward(self, x):
        return x + self.out(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))


class Net(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        for b in self.layers:
            h = b(h)
        return self.head(h)


def make_model():
    torch.manual_seed(0)
    return Net()


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)) for _ in range(STEPS)]


def run(model, layers, batches, state, check=None):
    from lowrank_kernels.owlore import LayerSampler, sampling_probs

    # torch's AdamW: the parity below then isolates the sampler under DDP. (GaLore's own DDP
    # parity is python_tests/distributed; here a refresh's SVD of a weight with nearly equal
    # singular values turns the 1e-7 summation-order difference into a different subspace.)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sampler = LayerSampler(layers, sampling_probs([1.0, 2.0, 3.0, 4.0]), gamma=GAMMA, period=PERIOD, seed=111,
                           state=state, optimizer=opt)
    for step, (x, y) in enumerate(batches):
        sampler.on_step(step)
        before = [p.detach().clone() for p in layers.parameters()]
        ((model(x) - y) ** 2).mean().backward()
        if check is not None:
            check(step, sampler, opt, before, "after backward")
        opt.step()
        if check is not None:
            check(step, sampler, opt, before, "after step")
        opt.zero_grad(set_to_none=True)
    return opt, sampler


def check_ddp(rank, ws, results):
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = data()
    lo, hi = rank * 8 // ws, (rank + 1) * 8 // ws
    single = make_model()
    init = [p.detach().clone() for p in single.parameters()]
    run(single, single.layers, batches, "drop")
    ref = [p.detach().clone() for p in single.parameters()]

    ddp = DDP(make_model(), find_unused_parameters=True)
    layers = ddp.module.layers
    problems = []

    def check(step, sampler, opt, before, when):
        for li, layer in enumerate(layers):
            if li in sampler.active:
                continue
            for p in layer.parameters():
                if p.grad is not None:
                    problems.append(f"step {step} {when}: frozen layer {li} has a gradient")
                if p in opt.state:
                    problems.append(f"step {step} {when}: frozen layer {li} kept optimizer state")
        if when == "after step":
            flat = list(layers.parameters())
            i = 0
            for li, layer in enumerate(layers):
                for p in layer.parameters():
                    if li not in sampler.active and not torch.equal(p, before[i]):
                        problems.append(f"step {step}: frozen layer {li} changed")
                    i += 1
            assert i == len(flat)

    _, sampler = run(ddp, layers, [(x[lo:hi], y[lo:hi]) for x, y in batches], "drop", check)
    got = [p.detach() for p in ddp.module.parameters()]
    num = sum((a - b).norm() ** 2 for a, b in zip(got, ref)) ** 0.5
    den = sum((b - a).norm() ** 2 for a, b in zip(init, ref)) ** 0.5
    err = float(num / den)
    # every rank trained the same layers: the weights agree across ranks bit for bit
    flat = torch.cat([p.detach().reshape(-1) for p in got])
    other = flat.clone()
    dist.broadcast(other, src=0)
    same = torch.equal(flat, other)
    ok = err < TOL and not problems and same
    results["ddp_find_unused"] = [ok, f"rel err {err:.2e} (tol {TOL:.0e}); ranks equal: {same}; "
                                      f"problems: {problems[:3]}; active at the end: {sampler.active}"]


def check_ddp_without_find_unused(rank, ws, results):
    """Plain DDP (find_unused_parameters=False) refuses the second iteration once layers
    are frozen: this is why the sampler needs find_unused_parameters=True."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    batches = data()
    lo, hi = rank * 8 // ws, (rank + 1) * 8 // ws
    try:
        run(ddp, ddp.module.layers, [(x[lo:hi], y[lo:hi]) for x, y in batches[:3]], "keep")
    except RuntimeError as e:
        results["ddp_plain_refuses"] = ["find_unused_parameters" in str(e), str(e)[:300]]
    else:
        results["ddp_plain_refuses"] = [False, "no error"]


def worker(rank, ws, port, outdir):
    with rank_session(rank, ws, port, outdir) as results:
        for name, fn in (("ddp_find_unused", check_ddp), ("ddp_plain_refuses", check_ddp_without_find_unused)):
            try:
                fn(rank, ws, results)
            except Exception:
                results[name] = [False, traceback.format_exc()]
