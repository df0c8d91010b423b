"""The method-step list ops refuse lists that span devices, before anything runs.

As the projection, Adam and DCT list ops do (``test_foreach_devices.py``): one grouped launch
cannot read entries on two devices, so ``foreach_apollo_update_``, ``foreach_frugal_update_``,
``foreach_adafactor_update_``, ``foreach_gradnormlorp_update_``, ``foreach_fira_update_``,
``foreach_trion_update_`` and ``foreach_newton_schulz`` raise a ValueError naming the first
tensor on another device, whichever list it is in, and write nothing.
"""
import pytest
import torch

from lowrank_kernels import ops

from .test_fira_ops import _fira_args
from .test_method_steps import _adafactor_args, _apollo_args, _frugal_args, _gradnormlorp_args
from .test_trion_foreach import _args as _trion_args

META = torch.device("meta")

# op name -> (op, args builder, names of its positional lists)
OPS = {
    "apollo": (ops.foreach_apollo_update_, lambda: _apollo_args("right", True, True, 32),
               ["params", "grads", None, "exp_avg", "exp_avg_sq"]),
    "frugal": (ops.foreach_frugal_update_, lambda: _frugal_args("left", True, 32),
               ["params", "grads", "projs", "exp_avg", "exp_avg_sq"]),
    "adafactor": (ops.foreach_adafactor_update_, lambda: _adafactor_args("right", 32, True),
                  ["params", "grads", "projs", "exp_avg_sq_row", "exp_avg_sq_col"]),
    "gradnormlorp": (ops.foreach_gradnormlorp_update_, lambda: _gradnormlorp_args("right", 32),
                     ["params", "grads", "projs", "exp_avg", "exp_avg_sq", "wn_g", "wn_vnorm", "exp_avg_g",
                      "exp_avg_sq_g"]),
    "fira": (ops.foreach_fira_update_, lambda: _fira_args("right", False, True, 32),
             ["params", "grads", "projs", "exp_avg", "exp_avg_sq"]),
    "trion": (ops.foreach_trion_update_, lambda: _trion_args("right"), ["params", "grads", "momentum"]),
}
CASES = [(op, i) for op, (_, _, names) in OPS.items() for i, n in enumerate(names) if n is not None]


def _cpu_tensors(args):
    out = []
    for a in args:
        for t in (a if isinstance(a, list) else [a]):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                out.append(t)
    return out


@pytest.mark.parametrize("op,which", CASES, ids=[f"{o}-{OPS[o][2][i]}" for o, i in CASES])
def test_list_spanning_devices_is_refused_before_any_write(op, which):
    fn, make, names = OPS[op]
    *args, kw = make()
    args[which][1] = torch.empty_like(args[which][1], device=META)
    cpu = _cpu_tensors(args) + _cpu_tensors(list(kw.values()))
    before = [t.clone() for t in cpu]
    with pytest.raises(ValueError, match=rf"{names[which]}\[1\] is on meta, params\[0\] on cpu"):
        fn(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(cpu, before)), f"{op}: an entry was written"


def test_newton_schulz_list_spanning_devices_is_refused():
    xs = [torch.randn(5, 7), torch.randn(5, 7, device=META), torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"xs\[1\] is on meta, xs\[0\] on cpu"):
        ops.foreach_newton_schulz(xs, "dion")


# (op, args builder, keyword list moved) for the lists passed by keyword
KW_CASES = [
    ("apollo", lambda: _apollo_args("right", True, True, 32), "prev_norm"),
    ("apollo", lambda: _apollo_args("right", True, True, 8), "m_absmax"),
    ("frugal", lambda: _frugal_args("right", True, 8), "v_absmax"),
    ("adafactor", lambda: _adafactor_args("left", 32, False), "exp_avg"),
    ("gradnormlorp", lambda: _gradnormlorp_args("left", 8), "m_absmax"),
    ("fira", lambda: _fira_args("left", True, True, 32), "indices"),
    ("fira", lambda: _fira_args("right", False, True, 32), "prev_norm"),
]


@pytest.mark.parametrize("op,make,key", KW_CASES, ids=[f"{o}-{k}" for o, _, k in KW_CASES])
def test_keyword_list_spanning_devices_is_refused_before_any_write(op, make, key):
    fn = OPS[op][0]
    *args, kw = make()
    kw[key][1] = torch.empty_like(kw[key][1], device=META)
    cpu = _cpu_tensors(args) + _cpu_tensors(list(kw.values()))
    before = [t.clone() for t in cpu]
    with pytest.raises(ValueError, match=rf"{key}\[1\] is on meta, params\[0\] on cpu"):
        fn(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(cpu, before)), f"{op}: an entry was written"


def test_trion_basis_on_another_device_is_refused():
    ps, gs, ms, basis, kw = _trion_args("left")
    with pytest.raises(ValueError, match=r"basis is on meta, params\[0\] on cpu"):
        ops.foreach_trion_update_(ps, gs, ms, basis.to(META), **kw)


def test_trion_halves_spanning_devices_are_refused_before_any_write():
    ps, gs, ms, basis, kw = _trion_args("right")
    okw = dict(side=kw["side"], rank=kw["rank"], mu=kw["mu"], coefficients=kw["coefficients"], norm=kw["norm"])
    before = [t.clone() for t in ms]
    with pytest.raises(ValueError, match=r"momentum\[1\] is on meta, grads\[0\] on cpu"):
        ops.foreach_trion_orth_(gs, [ms[0], ms[1].to(META), ms[2]], basis, **okw)
    assert all(torch.equal(a, b) for a, b in zip(before, ms)), "a momentum buffer was written"
    orths, idx = ops.foreach_trion_orth_(gs, ms, basis, **okw)
    before = [t.clone() for t in ps]
    with pytest.raises(ValueError, match=r"orths\[2\] is on meta, params\[0\] on cpu"):
        ops.foreach_trion_apply_(ps, orths[:2] + [orths[2].to(META)], idx, basis, side="right", alpha=kw["alpha"],
                                 decay=kw["decay"])
    assert all(torch.equal(a, b) for a, b in zip(before, ps)), "a weight was written"
