"""``torch.library.opcheck`` for every registered op, on its sample inputs.

Each op family module (``lowrank_kernels/ops/<family>.py``) ends with ``sample_inputs()``:
``(op name, label, args)`` covering the op's variants (projector kinds, sides, dtypes,
moment formats, the list ops). Every sample is checked through the public op under each
backend that can run here (reference, C++, Triton under ``TRITON_INTERPRET=1``), and on the
C++ kernel's private op (``torch.ops._lowrank_kernels.<op>_cpu``) called directly: schema (mutated inputs declared), autograd
registration, fake (meta) impl against the real outputs, and AOT dispatch with dynamic
shapes (what ``torch.compile`` needs).
"""
import importlib

import pytest
import torch

from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from ..conftest import require_backend

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
FAMILIES = sorted({op.family for op in reg.OPS.values()})


def _samples(family):
    """The family's samples, made afresh (the ops write into their arguments)."""
    return importlib.import_module(f"lowrank_kernels.ops.{family}").sample_inputs()


CASES = [(name, label) for family in FAMILIES for name, label, _ in _samples(family)]
IDS = [f"{name}[{label}]" for name, label in CASES]


def _args(name, label):
    for n, lab, args in _samples(reg.OPS[name].family):
        if (n, lab) == (name, label):
            return args
    raise KeyError((name, label))


def test_every_registered_op_has_samples():
    named = {name for name, _ in CASES}
    assert named == set(reg.OPS), (
        f"ops without samples: {sorted(set(reg.OPS) - named)}; samples of unregistered ops: "
        f"{sorted(named - set(reg.OPS))}")
    assert len(set(CASES)) == len(CASES), "sample labels must be unique per op"
    for family in FAMILIES:
        for name, _, _ in _samples(family):
            assert reg.OPS[name].family == family, (name, family)


@pytest.mark.parametrize("backend", reg.BACKENDS)
@pytest.mark.parametrize("name,label", CASES, ids=IDS)
def test_opcheck(name, label, backend):
    require_backend(name, backend)
    args = _args(name, label)
    with use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.lowrank_kernels, name).default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("name,label", CASES, ids=IDS)
def test_opcheck_cpp_op_directly(name, label):
    op = reg.OPS[name]
    if not op.has_cpp or not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    args = _args(name, label)
    torch.library.opcheck(op.cpp_op(), args, test_utils=OPCHECK_TESTS)
