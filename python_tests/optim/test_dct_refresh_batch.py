"""DCTAdamW refreshes by bucket: at a refresh step every weight due for a refresh is scored
through one ``dct_foreach_score_topk`` call per bucket of same-shape gradients (same side,
dtype, rank and norm) instead of one ``dct_score_topk`` per weight.

The indices (hence weights and moments) must be bitwise those of the per-parameter refresh
(``foreach=False``) on every backend, across refreshes, with every moment_refresh mode,
with a non-finite gradient at a refresh, with weights that have no gradient; the op calls
are counted."""
import warnings

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import DCTAdamW, layerwise
from .._opcount import CountOps

FOREACH = "lowrank_kernels.dct_foreach_score_topk"
SINGLE = "lowrank_kernels.dct_score_topk"
# std: tall -> right (basis n), wide -> left (basis m). Buckets (side, shape, dtype), across the
# two param groups: 3 x (23, 11) right, 2 x (11, 23) left, (17, 17) right, (9, 30) left, and a
# bf16 (23, 11) weight (_params(bf16_last=True)) in a bucket of its own.
SHAPES = [(23, 11), (11, 23), (23, 11), (17, 17), (11, 23), (9, 30), (23, 11)]
N_BUCKETS = 5
STEPS = 7  # refreshes at steps 1, 4, 7 (update_proj_gap=3)


def _params(seed=0, bf16_last=False):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    if bf16_last:
        ws.append(torch.nn.Parameter(torch.randn(23, 11, generator=gen).to(torch.bfloat16)))
    return ws


def _grads(ws, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(w.shape, generator=gen).to(w.dtype) for w in ws] for _ in range(STEPS)]


def _make(ws, foreach, moment_refresh="keep", norm=1):
    groups = [dict(params=ws[:4], rank=3, update_proj_gap=3, foreach=foreach, moment_refresh=moment_refresh, norm=norm,
                   weight_decay=0.1),
              dict(params=ws[4:], rank=3, update_proj_gap=3, foreach=foreach, moment_refresh=moment_refresh, norm=norm,
                   lr=3e-3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DCTAdamW(groups, lr=1e-2, scale=0.5)


def _run(backend, foreach, grads=None, moment_refresh="keep", norm=1, nonfinite=None, missing=None, count=False):
    ws = _params(bf16_last=True)
    grads = grads or _grads(ws)
    opt = _make(ws, foreach, moment_refresh, norm)
    counts = []
    with use_backend(backend):
        for t, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(ws, gs)):
                p.grad = None if (missing is not None and (t, i) == missing) else g.clone()
            if nonfinite is not None and nonfinite[0] == t:
                ws[nonfinite[1]].grad[1, 2] = float("inf")
            if count:
                with CountOps() as mode:
                    opt.step()
                counts.append(mode.counts)
            else:
                opt.step()
    return ws, opt, counts


def _assert_same(a, b):
    (wa, oa, _), (wb, ob, _) = a, b
    for x, y in zip(wa, wb):
        assert torch.equal(x, y)
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("moment_refresh,norm", [("keep", 1), ("reindex", 2), ("reset", 1)])
def test_batched_refresh_equals_per_parameter(backend, moment_refresh, norm):
    batched = _run(backend, None, moment_refresh=moment_refresh, norm=norm)
    single = _run(backend, False, moment_refresh=moment_refresh, norm=norm)
    _assert_same(batched, single)
    ws0 = _params(bf16_last=True)
    assert all(not torch.equal(w, w0) for w, w0 in zip(batched[0], ws0))  # every weight moved
    # The indices change across refreshes (the comparison covers several selections).
    ws, opt, _ = _run(backend, None, grads=_grads(_params(bf16_last=True))[:1], moment_refresh=moment_refresh, norm=norm)
    assert not all(torch.equal(opt.state[a]["indices"], batched[1].state[b]["indices"]) for a, b in zip(ws, batched[0]))


def test_one_scoring_call_per_bucket(backend):
    _, _, counts = _run(backend, None, count=True)
    _, _, per_param = _run(backend, False, count=True)
    n = len(SHAPES) + 1
    for t in range(STEPS):
        refresh = t % 3 == 0
        assert counts[t].get(FOREACH, 0) == (N_BUCKETS if refresh else 0), (t, counts[t])
        assert counts[t].get(SINGLE, 0) == 0, (t, counts[t])
        assert per_param[t].get(FOREACH, 0) == 0 and per_param[t].get(SINGLE, 0) == (n if refresh else 0)


def test_nonfinite_gradient_at_a_refresh(backend):
    """The weight with an infinite gradient is skipped at the refresh (its indices unchanged);
    the others of its bucket refresh exactly as per parameter."""
    batched = _run(backend, None, nonfinite=(3, 2))
    single = _run(backend, False, nonfinite=(3, 2))
    _assert_same(batched, single)
    assert batched[1].nonfinite_skips == 1
    assert int(batched[1].state[batched[0][2]]["step"]) == STEPS - 1


def test_weight_without_gradient_at_a_refresh(backend):
    """A weight with no gradient at its first step is left out and starts (and refreshes) later."""
    batched = _run(backend, None, missing=(0, 1))
    single = _run(backend, False, missing=(0, 1))
    _assert_same(batched, single)
    assert int(batched[1].state[batched[0][1]]["step"]) == STEPS - 1


def test_subclass_with_its_own_projector_is_not_batched():
    class Own(DCTAdamW):
        def _compute_projector(self, p, grad, state, group, step):
            return super()._compute_projector(p, grad, state, group, step)

    ws = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Own([dict(params=ws, rank=3)], lr=1e-2)
    for p, g in zip(ws, _grads(ws)[0]):
        p.grad = g
    with CountOps() as mode:
        opt.step()
    assert mode.counts.get(FOREACH, 0) == 0 and mode.counts.get(SINGLE, 0) == len(ws)


def test_layerwise_still_steps_each_weight():
    """layerwise: one optimizer per weight, each refresh through a bucket of one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 12))
    ref_model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 12))
    ref_model.load_state_dict(model.state_dict())

    def groups(m):
        return [dict(params=[m[0].weight, m[2].weight], rank=4, update_proj_gap=2),
                dict(params=[m[0].bias, m[2].bias], rank=None)]

    lw = layerwise(groups(model), lambda g: DCTAdamW(g, lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DCTAdamW(groups(ref_model), lr=1e-2, foreach=False)
    x = torch.randn(8, 12)
    for _ in range(3):
        model(x).square().mean().backward()
        lw.step()
        opt.zero_grad()
        ref_model(x).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
