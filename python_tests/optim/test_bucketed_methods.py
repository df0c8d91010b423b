"""Every projecting optimizer steps by bucket: the non-refresh steps of a bucket are one
multi-tensor op call, bit-identical on CPU to the per-parameter path (``foreach=False``),
for every moment format the optimizer takes.

Bitwise: weights and every state tensor after steps that mix refreshes (per parameter) and
bucketed steps. Op counts (not timing): at most ``bench.host_cost.MAX_LK_OPS``
``lowrank_kernels`` op calls in a non-refresh step of the host-cost benchmark's 28-weight
stack, and one multi-tensor op call per bucket.
"""
import warnings

import pytest
import torch

from bench import host_cost
from bench import optimizers as O

from .._opcount import CountOps

RANK = 4
GAP = 3  # refreshes at steps 1, 4: steps 2, 3 and 5 are bucketed
STEPS = 5
#: registry name (bench provider label) -> the constructor keywords of the bench row.
METHODS = {
    "qgalore": ("ours-QGaLoreAdamW", {}),
    "apollo": ("ours-APOLLOAdamW", {}),
    "apollo-mini": ("ours-APOLLO-Mini", {}),
    "frugal": ("ours-FrugalAdamW", {}),
    "adafactor": ("ours-GaLoreAdafactor", {}),
    "adafactor-beta1": ("ours-GaLoreAdafactor-beta1", {"beta1": 0.9}),
    "fira": ("ours-FiraAdamW", {}),
    "fira-dct": ("ours-FiraAdamW-DCT", {}),
    "trion": ("ours-Trion", {}),
    "gradnormlorp": ("ours-GradNormLoRPAdamW", {}),
}
#: the registry name of a METHODS key that is not one (a bench row with other constructor keywords).
REGISTERED = {"adafactor-beta1": "adafactor"}
#: the moment formats each method is checked with (``min_8bit_size=1`` so 8-bit applies to tiny moments;
#: GaLore-Adafactor's format is its first moment's, kept only with ``beta1``).
BITS = {"qgalore": (32, 16, 8), "apollo": (32, 16, 8), "apollo-mini": (32, 16, 8), "frugal": (32, 16, 8),
        "adafactor": (32,), "adafactor-beta1": (32, 16, 8), "fira": (32, 16, 8), "fira-dct": (32, 16, 8),
        "gradnormlorp": (32, 16, 8), "trion": (32,)}  # Trion's low-rank groups keep a 32-bit (or parameter-dtype) momentum only


def _stack(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = host_cost.stack_shapes(d=24, f=40, layers=1)
    return shapes, [0.02 * torch.randn(s, generator=gen) for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _build(name, weights, bits, foreach):
    _, kw = METHODS[name]
    ps = [torch.nn.Parameter(w.clone()) for w in weights]
    keys = dict(moment_bits=bits, min_8bit_size=1, block_size=16) if bits != 32 else {}
    if foreach is False:
        keys["foreach"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = O._ours(REGISTERED.get(name, name), **kw)(ps, RANK, GAP, **keys)
    return opt, ps


def _run(opt, ps, grads, count_at=None):
    modes = {}
    for t, gs in enumerate(grads, 1):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        if t == count_at:
            with CountOps() as mode:
                opt.step()
            modes[t] = mode
        else:
            opt.step()
    return modes


CASES = [(n, b) for n in METHODS for b in BITS[n]]


@pytest.mark.parametrize("name,bits", CASES, ids=[f"{n}-{b}bit" for n, b in CASES])
def test_bucketed_equals_per_parameter(name, bits):
    """Weights and state bitwise equal to the per-parameter path across refreshes; the bucketed
    run's non-refresh step makes one op call per bucket (fewer than the parameters)."""
    shapes, w0 = _stack()
    grads = _grads(shapes, STEPS)
    oa, pa = _build(name, w0, bits, foreach=None)
    ob, pb = _build(name, w0, bits, foreach=False)
    ma = _run(oa, pa, grads, count_at=2)[2]
    mb = _run(ob, pb, grads, count_at=2)[2]
    assert mb.total("lowrank_kernels") >= len(shapes)  # the reference path: per parameter
    assert ma.total("lowrank_kernels") <= 2, ma.counts  # one call per bucket (right, left)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"{name} {bits}-bit: weight {i} differs (max |d| = {(a - b).abs().max():.3g})"
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), f"{name} {bits}-bit: weight {i} state {k} differs"


@pytest.mark.parametrize("name", list(METHODS))
def test_host_cost_stack_op_calls(name):
    """bench/host_cost.py's 28-weight stack: at most MAX_LK_OPS lowrank_kernels op calls per
    non-refresh step, and no host read of a tensor value beyond the non-finite probe."""
    provider = METHODS[name][0]
    opts, skipped = host_cost.make_optimizers(names=[provider])
    assert not skipped, skipped
    opt, _ = opts[provider]
    opt.step()  # the refresh step
    opt.step()
    with CountOps() as mode:
        opt.step()
    assert mode.custom <= host_cost.MAX_LK_OPS, mode.names
    assert mode.reads <= 1, mode.names


def _compare(make, shapes, w0, grads):
    out = []
    for foreach in (None, False):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make(ps, foreach)
        modes = _run(opt, ps, grads, count_at=2)
        out.append((opt, ps, modes[2]))
    (oa, pa, ma), (ob, pb, mb) = out
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"weight {i} differs (max |d| = {(a - b).abs().max():.3g})"
        for k, va in oa.state[a].items():
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, ob.state[b][k]), f"weight {i} state {k} differs"
    return ma, mb


APOLLO_CONFIGS = {
    "decay": dict(weight_decay=0.1),
    "compat": dict(weight_decay=0.1, compat="apollo-torch"),
    "scale-front": dict(scale_front=True, scale=4.0),
    "no-limiter": dict(disable_nl=True),
    "tensor-left": dict(scale_type="tensor", proj_type="left"),
    "mixed-groups": None,
}


@pytest.mark.parametrize("config", list(APOLLO_CONFIGS))
def test_apollo_configurations_bucketed_equal_per_parameter(config):
    """APOLLO's options (decay, apollo-torch compat, scale_front, limiter off, tensor scaling,
    groups with different lr and scale) keep the bucketed step bit-identical."""
    from lowrank_kernels.optim import APOLLOAdamW

    shapes, w0 = _stack()
    grads = _grads(shapes, STEPS)
    kw = APOLLO_CONFIGS[config]

    def make(ps, foreach):
        fe = {} if foreach is None else {"foreach": foreach}
        if kw is None:
            groups = [dict(params=ps[:3], rank=RANK, update_proj_gap=GAP, scale=2.0, **fe),
                      dict(params=ps[3:], rank=2, update_proj_gap=GAP, lr=3e-3, weight_decay=0.01, **fe)]
            return APOLLOAdamW(groups, lr=1e-2)
        kw2 = dict(kw)
        group = dict(params=ps, rank=RANK, update_proj_gap=GAP, **fe)
        for k in ("scale", "scale_type", "proj_type"):
            if k in kw2:
                group[k] = kw2.pop(k)
        return APOLLOAdamW([group], lr=1e-2, **kw2)

    ma, mb = _compare(make, shapes, w0, grads)
    assert ma.total("lowrank_kernels") < mb.total("lowrank_kernels")


ADAFACTOR_CONFIGS = {
    "relative-scaled-decay": dict(relative_step=True, scale_parameter=True, weight_decay=0.1),
    "relative-warmup": dict(relative_step=True, warmup_init=True, scale_parameter=False),
    "lr-decay-clip": dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.05,
                          clip_threshold=0.01),
    "scaled-beta1-8bit": dict(relative_step=True, scale_parameter=True, weight_decay=0.1, beta1=0.8, moment_bits=8,
                              min_8bit_size=1, block_size=16),
    "beta1-16bit-left": dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, moment_bits=16,
                             proj_type="left"),
    "mixed-groups": None,
}


@pytest.mark.parametrize("config", list(ADAFACTOR_CONFIGS))
def test_adafactor_configurations_bucketed_equal_per_parameter(config):
    """GaLore-Adafactor's options (relative step, parameter scale, warm-up, weight decay, update
    clipping, the first moment in each format, left projections, groups with different lr,
    scale and decay rate) keep the bucketed step bit-identical."""
    from lowrank_kernels.optim import GaLoreAdafactor

    shapes, w0 = _stack()
    grads = _grads(shapes, STEPS)
    kw = ADAFACTOR_CONFIGS[config]

    def make(ps, foreach):
        fe = {} if foreach is None else {"foreach": foreach}
        if kw is None:
            groups = [dict(params=ps[:3], rank=RANK, update_proj_gap=GAP, scale=2.0, **fe),
                      dict(params=ps[3:], rank=2, update_proj_gap=GAP, lr=3e-3, weight_decay=0.01, decay_rate=-0.5,
                           **fe)]
            return GaLoreAdafactor(groups, lr=1e-2, relative_step=False, scale_parameter=False)
        kw2 = dict(kw)
        group = dict(params=ps, rank=RANK, update_proj_gap=GAP, **fe)
        if "proj_type" in kw2:
            group["proj_type"] = kw2.pop("proj_type")
        return GaLoreAdafactor([group], **kw2)

    ma, mb = _compare(make, shapes, w0, grads)
    assert ma.total("lowrank_kernels") <= 2, ma.counts
    assert ma.total("lowrank_kernels") < mb.total("lowrank_kernels")


def test_adafactor_full_and_bfloat16_stay_per_parameter():
    """``proj_type="full"`` and bfloat16 weights take the per-parameter step (no bucket key), with
    ``foreach`` left on: the same numbers and op calls as ``foreach=False``."""
    from lowrank_kernels.optim import GaLoreAdafactor

    shapes, w0 = _stack()
    grads = _grads(shapes, 3)
    for proj_type, dtype in (("full", torch.float32), ("std", torch.bfloat16)):
        def make(ps, foreach):
            fe = {} if foreach is None else {"foreach": foreach}
            return GaLoreAdafactor([dict(params=ps, rank=RANK, update_proj_gap=GAP, proj_type=proj_type, **fe)],
                                   lr=1e-2, relative_step=False, scale_parameter=False)

        ma, mb = _compare(make, shapes, [w.to(dtype) for w in w0], [[g.to(dtype) for g in gs] for gs in grads])
        assert ma.total("lowrank_kernels") == mb.total("lowrank_kernels"), (proj_type, dtype)


TRION_CONFIGS = {
    "decay-kimi": dict(weight_decay=0.1, scaling_type="kimi"),
    "muon-coefficients": dict(ns_coefficients="muon", momentum=0.9),
    "left": dict(proj_type="left"),
    "reverse-std-none": dict(proj_type="reverse_std", scaling_type="none"),
    "moment-dtype-param": dict(moment_dtype="param"),
    "mixed-groups": None,
}


@pytest.mark.parametrize("config", list(TRION_CONFIGS))
def test_trion_configurations_bucketed_equal_per_parameter(config):
    """Trion's options (decay, scalings, schedules, sides, parameter-dtype momentum, groups with
    different lr, momentum, rank and scaling) keep the bucketed step bit-identical, with one op
    call per bucket (weights of one basis size share a bucket whatever their other dimension)."""
    from lowrank_kernels.optim import Trion

    shapes, w0 = _stack()
    grads = _grads(shapes, STEPS)
    kw = TRION_CONFIGS[config]

    def make(ps, foreach):
        fe = {} if foreach is None else {"foreach": foreach}
        if kw is None:
            groups = [dict(params=ps[:3], rank=RANK, momentum=0.8, **fe),
                      dict(params=ps[3:], rank=2, lr=3e-3, weight_decay=0.01, scaling_type="dion", **fe)]
            return Trion(groups, lr=1e-2)
        kw2 = dict(kw)
        group = dict(params=ps, rank=RANK, **fe)
        if "proj_type" in kw2:
            group["proj_type"] = kw2.pop("proj_type")
        return Trion([group], lr=1e-2, **kw2)

    ma, mb = _compare(make, shapes, w0, grads)
    # per parameter: the list op on a one-entry list (the same arithmetic as the bucketed step)
    assert mb.total("lowrank_kernels") == len(shapes), mb.counts
    assert {n for n in mb.counts if n.startswith("lowrank_kernels")} == {"lowrank_kernels.trion_foreach_update"}
    # (side, basis size, rank): 2 buckets; reverse_std and the mixed groups' second rank make 3
    buckets = {"mixed-groups": 3, "reverse-std-none": 3}.get(config, 2)
    assert ma.total("lowrank_kernels") == buckets, ma.counts
    assert {n for n in ma.counts if n.startswith("lowrank_kernels")} == {"lowrank_kernels.trion_foreach_update"}


GNL_CONFIGS = {
    "decay": dict(weight_decay=0.1),
    "eps0": dict(eps=0.0),
    "left": dict(proj_type="left"),
    "lowrank-svd": dict(svd="lowrank"),
    "mixed-groups": None,
}


@pytest.mark.parametrize("config", list(GNL_CONFIGS))
def test_gradnormlorp_configurations_bucketed_equal_per_parameter(config):
    """GradNormLoRP's options (decay, eps = 0, left projections, the randomized SVD, groups with
    different lr, scale and rank) keep the bucketed step bit-identical, a zero row included."""
    from lowrank_kernels.optim import GradNormLoRPAdamW

    shapes, w0 = _stack()
    w0[1][3] = 0.0
    grads = _grads(shapes, STEPS)
    kw = GNL_CONFIGS[config]

    def make(ps, foreach):
        fe = {} if foreach is None else {"foreach": foreach}
        if kw is None:
            groups = [dict(params=ps[:3], rank=RANK, update_proj_gap=GAP, scale=2.0, **fe),
                      dict(params=ps[3:], rank=2, update_proj_gap=GAP, lr=3e-3, weight_decay=0.01, **fe)]
            return GradNormLoRPAdamW(groups, lr=1e-2)
        kw2 = dict(kw)
        group = dict(params=ps, rank=RANK, update_proj_gap=GAP, **fe)
        if "proj_type" in kw2:
            group["proj_type"] = kw2.pop("proj_type")
        return GradNormLoRPAdamW([group], lr=1e-2, **kw2)

    ma, mb = _compare(make, shapes, w0, grads)
    assert ma.total("lowrank_kernels") <= 4 < mb.total("lowrank_kernels")
