"""The multi-tensor ops refuse lists that span devices, before anything runs.

Each entry of a list may be consistent on its own (its parameter, gradient, projector and
moments on one device) while the entries sit on different devices: one grouped launch cannot
read both. Every multi-tensor op (``projection_foreach_project_update_backproject``,
``adam_foreach_update``, ``dct_foreach_score_topk``) raises a ValueError naming the first
tensor on another device and the first tensor of the call (``grads[1] is on meta, params[0] on
cpu``), whichever list or optional argument it is in, and writes nothing.
"""
import pytest
import torch

from lowrank_kernels import ops

META = torch.device("meta")


def _gen():
    return torch.Generator().manual_seed(0)


def _proj_lists(moments="plain", count=3):
    gen = _gen()
    params, grads, projs, eas, easqs, mas, vas = [], [], [], [], [], [], []
    for m, n, r in [(12, 9, 2), (8, 6, 3), (5, 7, 1)][:count]:
        params.append(torch.randn(m, n, generator=gen))
        grads.append(torch.randn(m, n, generator=gen))
        projs.append(torch.linalg.qr(torch.randn(n, r, generator=gen))[0].T.contiguous())
        if moments == "q8":
            st = ops.moments8_zeros((m, r), block_size=16)
            eas.append(st["exp_avg"])
            easqs.append(st["exp_avg_sq"])
            mas.append(st["m_absmax"])
            vas.append(st["v_absmax"])
        else:
            eas.append(0.1 * torch.randn(m, r, generator=gen))
            easqs.append(0.01 * torch.rand(m, r, generator=gen))
    return dict(params=params, grads=grads, projs=projs, exp_avgs=eas, exp_avg_sqs=easqs), \
        (dict(m_absmax=mas, v_absmax=vas, block_size=16) if moments == "q8" else {})


def _snapshot(lists):
    return [t.clone() for xs in lists for t in xs if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def _unchanged(lists, snap):
    now = [t for xs in lists for t in xs if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    assert len(now) == len(snap) and all(torch.equal(a, b) for a, b in zip(now, snap)), "an entry was written"


# (what moves to meta, the message): a whole entry (each entry consistent on its own), one
# tensor of one list, an 8-bit absmax, the device flags
PROJ_CASES = [
    ("entry 1", r"params\[1\] is on meta, params\[0\] on cpu"),
    ("grads[2]", r"grads\[2\] is on meta, params\[0\] on cpu"),
    ("projs[1]", r"projs\[1\] is on meta, params\[0\] on cpu"),
    ("exp_avgs[0]", r"exp_avgs\[0\] is on meta, params\[0\] on cpu"),
    ("exp_avg_sqs[2]", r"exp_avg_sqs\[2\] is on meta, params\[0\] on cpu"),
    ("m_absmax[1]", r"m_absmax\[1\] is on meta, params\[0\] on cpu"),
    ("skip", r"skip is on meta, params\[0\] on cpu"),
    ("coeffs", r"coeffs is on meta, params\[0\] on cpu"),
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("where,match", PROJ_CASES, ids=[c[0] for c in PROJ_CASES])
def test_projection_foreach_refuses_lists_across_devices(where, match, backend):
    lists, extra = _proj_lists("q8" if "absmax" in where else "plain")
    kw = {}
    if where == "entry 1":
        for name in lists:
            lists[name][1] = lists[name][1].to(META)
    elif where in ("skip", "coeffs"):
        kw[where] = torch.zeros(3, dtype=torch.bool, device=META) if where == "skip" else \
            torch.zeros(3, 2, device=META)
    else:
        name, i = where[:-3], int(where[-2])
        (extra if name == "m_absmax" else lists)[name][i] = (extra if name == "m_absmax" else lists)[name][i].to(META)
    snap = _snapshot(list(lists.values()) + [extra.get("m_absmax", []), extra.get("v_absmax", [])])
    with ops.use_backend(backend), pytest.raises(ValueError, match="all tensors must be on one device: " + match):
        ops.foreach_project_update_backproject_(*lists.values(), side="right", lr=0.01, step=1, **extra, **kw)
    _unchanged(list(lists.values()) + [extra.get("m_absmax", []), extra.get("v_absmax", [])], snap)


ADAM_CASES = [
    ("entry 1", r"r\[1\] is on meta, r\[0\] on cpu"),
    ("r[2]", r"r\[2\] is on meta, r\[0\] on cpu"),
    ("exp_avg[1]", r"exp_avg\[1\] is on meta, r\[0\] on cpu"),
    ("exp_avg_sq[0]", r"exp_avg_sq\[0\] is on meta, r\[0\] on cpu"),
    ("v_absmax[2]", r"v_absmax\[2\] is on meta, r\[0\] on cpu"),
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("where,match", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
def test_adam_foreach_refuses_lists_across_devices(where, match, backend):
    gen = _gen()
    shapes = [(4, 32), (3, 16), (2, 48)]
    rs = [torch.randn(s, generator=gen) for s in shapes]
    extra = {}
    if "absmax" in where:
        st = [ops.moments8_zeros(s, block_size=16) for s in shapes]
        ms, vs = [x["exp_avg"] for x in st], [x["exp_avg_sq"] for x in st]
        extra = dict(m_absmax=[x["m_absmax"] for x in st], v_absmax=[x["v_absmax"] for x in st], block_size=16)
    else:
        ms = [0.1 * torch.randn(s, generator=gen) for s in shapes]
        vs = [0.01 * torch.rand(s, generator=gen) for s in shapes]
    lists = {"r": rs, "exp_avg": ms, "exp_avg_sq": vs, **{k: v for k, v in extra.items() if k != "block_size"}}
    if where == "entry 1":
        for name in lists:
            lists[name][1] = lists[name][1].to(META)
    else:
        name, i = where[:-3], int(where[-2])
        lists[name][i] = lists[name][i].to(META)
    snap = _snapshot(lists.values())
    with ops.use_backend(backend), pytest.raises(ValueError, match="all tensors must be on one device: " + match):
        ops.foreach_adam_update_(rs, ms, vs, **extra)
    _unchanged(lists.values(), snap)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_dct_foreach_refuses_lists_across_devices(backend):
    gen = _gen()
    grads = [torch.randn(12, 8, generator=gen) for _ in range(3)]
    basis = ops.dct_basis(8)
    with ops.use_backend(backend):
        for i in (1, 2):
            bad = list(grads)
            bad[i] = bad[i].to(META)
            with pytest.raises(ValueError, match=rf"all tensors must be on one device: grads\[{i}\] is on meta, "
                                                 r"grads\[0\] on cpu"):
                ops.foreach_dct_score_topk(bad, 3, side="right", basis=basis)
        with pytest.raises(ValueError, match=r"basis is on meta, grads\[0\] on cpu"):
            ops.foreach_dct_score_topk(grads, 3, side="right", basis=basis.to(META))
        # the default basis follows grads[0]: a later gradient elsewhere is named
        bad = [grads[0], grads[1].to(META)]
        with pytest.raises(ValueError, match=r"grads\[1\] is on meta, grads\[0\] on cpu"):
            ops.foreach_dct_score_topk(bad, 3, side="right")


def test_check_list_devices_helper():
    from lowrank_kernels.ops import _checks as C

    cpu = torch.zeros(2)
    C.check_list_devices("op", [("a", [cpu, cpu]), ("b", None), ("c", []), ("d", cpu)])
    C.check_list_devices("op", [("a", []), ("b", [torch.zeros(1, device=META)])])  # one device: meta
    with pytest.raises(ValueError, match=r"^op: all tensors must be on one device: d is on meta, a\[0\] on cpu$"):
        C.check_list_devices("op", [("a", [cpu, cpu]), ("b", None), ("d", torch.zeros(1, device=META))])
    with pytest.raises(ValueError, match=r"b\[0\] is on cpu, a\[1\] on meta"):
        C.check_list_devices("op", [("a", [None, torch.zeros(1, device=META)]), ("b", (cpu,))])
