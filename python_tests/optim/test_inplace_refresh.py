"""Projector refreshes write the optimizer state in place.

A captured CUDA graph replays fixed addresses, so after the first refresh (the step that
creates the state) every later refresh must copy its new projector, indices, quantized
panels and reset / re-indexed moments into the tensors already there: their ``data_ptr``
never changes. Checked on CPU for every optimizer that refreshes, across several refreshes.
"""
import pytest
import torch

from lowrank_kernels.optim import (APOLLOAdamW, DCTAdamW, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW,
                                   GradNormLoRPAdamW, QGaLoreAdamW)
from lowrank_kernels.optim.common import assign_

GAP = 2
STEPS = 6

# (id, optimizer class, group keys, weight shape)
CASES = [
    ("galore-right", GaLoreAdamW, dict(proj_type="right"), (24, 16)),
    ("galore-left", GaLoreAdamW, dict(proj_type="left"), (24, 16)),
    ("galore-full", GaLoreAdamW, dict(proj_type="full"), (24, 16)),
    ("galore-8bit", GaLoreAdamW, dict(moment_bits=8, min_8bit_size=0, block_size=16), (24, 16)),
    ("galore-transport-right", GaLoreAdamW, dict(proj_type="right", moment_transport=True), (24, 16)),
    ("galore-transport-left", GaLoreAdamW, dict(proj_type="left", moment_transport=True), (24, 16)),
    ("galore-transport-full", GaLoreAdamW, dict(proj_type="full", moment_transport=True), (24, 16)),
    ("galore-transport-8bit", GaLoreAdamW, dict(moment_transport=True, moment_bits=8, min_8bit_size=0,
                                                block_size=16), (24, 16)),
    ("galore-transport-16bit", GaLoreAdamW, dict(moment_transport=True, moment_bits=16), (24, 16)),
    ("galore-sample", GaLoreAdamW, dict(refresh="sample"), (24, 16)),
    ("galore-random", GaLoreAdamW, dict(refresh="random", proj_type="full"), (24, 16)),
    ("qgalore-random", QGaLoreAdamW, dict(quant=True, quant_group_size=16, refresh="random"), (32, 32)),
    ("dct-transport", DCTAdamW, dict(moment_transport=True), (24, 16)),
    ("dct-keep", DCTAdamW, dict(moment_refresh="keep"), (24, 16)),
    ("dct-reset", DCTAdamW, dict(moment_refresh="reset"), (24, 16)),
    ("dct-reindex-right", DCTAdamW, dict(moment_refresh="reindex"), (24, 16)),
    ("dct-reindex-left", DCTAdamW, dict(moment_refresh="reindex"), (16, 24)),
    ("dct-reindex-8bit", DCTAdamW, dict(moment_refresh="reindex", moment_bits=8, min_8bit_size=0, block_size=16),
     (24, 16)),
    ("qgalore-quant", QGaLoreAdamW, dict(quant=True, quant_group_size=16), (32, 32)),
    ("qgalore-dense", QGaLoreAdamW, dict(quant=False), (32, 32)),
    ("qgalore-overlap", QGaLoreAdamW, dict(quant=True, quant_group_size=16, similarity="overlap"), (32, 32)),
    ("frugal-svd", FrugalAdamW, dict(projection="svd"), (24, 16)),
    ("frugal-random", FrugalAdamW, dict(projection="random"), (24, 16)),
    ("frugal-dct", FrugalAdamW, dict(projection="dct"), (24, 16)),
    ("apollo", APOLLOAdamW, dict(), (24, 16)),
    ("gradnormlorp", GradNormLoRPAdamW, dict(), (24, 16)),
    ("galore-adafactor", GaLoreAdafactor, dict(), (24, 16)),
    ("galore-adafactor-full", GaLoreAdafactor, dict(proj_type="full"), (24, 16)),
    ("fira-svd", FiraAdamW, dict(), (24, 16)),
    ("fira-svd-left", FiraAdamW, dict(), (16, 24)),
    ("fira-dct", FiraAdamW, dict(projector="dct"), (24, 16)),
    ("fira-transport", FiraAdamW, dict(moment_transport=True), (24, 16)),
    ("fira-dct-transport", FiraAdamW, dict(projector="dct", moment_transport=True), (24, 16)),
    ("fira-8bit", FiraAdamW, dict(moment_bits=8, min_8bit_size=0, block_size=16), (24, 16)),
    ("fira-random", FiraAdamW, dict(refresh="random"), (24, 16)),
]

#: state tensors a step (not a refresh) replaces by design: APOLLO's norm-growth memory.
PER_STEP = {"scaled_grad_norm"}


def _ptrs(state):
    return {k: v.data_ptr() for k, v in state.items() if isinstance(v, torch.Tensor) and k not in PER_STEP}


@pytest.mark.parametrize("name,cls,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_refresh_keeps_state_storage(name, cls, kw, shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    extra = {} if cls is GaLoreAdafactor else dict(lr=1e-2)  # Adafactor: its relative step size
    opt = cls([{"params": [p], "rank": 4, "update_proj_gap": GAP, **kw}], **extra)
    grads = [torch.randn(shape) for _ in range(STEPS)]
    p.grad = grads[0]
    opt.step()  # the first refresh creates the state
    first = _ptrs(opt.state[p])
    assert first, name
    refreshes = 0
    for t in range(1, STEPS):
        p.grad = grads[t]
        before = opt.failed_refreshes
        opt.step()
        refreshes += t % GAP == 0
        assert opt.failed_refreshes == before
        now = _ptrs(opt.state[p])
        assert set(now) == set(first), (name, t + 1)
        moved = sorted(k for k in first if now[k] != first[k])
        assert not moved, f"{name}: step {t + 1} replaced {moved}"
    assert refreshes >= 2


def test_assign_copies_only_a_matching_tensor():
    state = {"a": torch.zeros(3)}
    a = state["a"]
    assert assign_(state, "a", torch.ones(3)) is a and torch.equal(a, torch.ones(3))
    other = torch.ones(4)  # another shape: replaced
    assert assign_(state, "a", other) is other and state["a"] is other
    half = torch.ones(4, dtype=torch.float16)  # another dtype: replaced
    assert assign_(state, "a", half) is half
    t = torch.ones(2, 2).t()  # other strides: replaced
    state["b"] = torch.zeros(2, 2)
    assert assign_(state, "b", t) is t
    new = torch.full((2,), 7.0)  # a missing key: stored
    assert assign_(state, "c", new) is new
