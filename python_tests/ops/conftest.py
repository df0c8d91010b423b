"""Kernel tests run with poisoned allocations.

Every tensor made by ``torch.empty`` from Python during an ops test (that is where the
Triton launchers and the references allocate their outputs) is filled with garbage
first: NaN for floating dtypes, an out-of-range value for integers. An output element a
kernel forgets to write then fails the comparison with the reference instead of
passing by luck on zeroed memory.
"""
import pytest
import torch
import torch.utils._device

_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.numel() and t.device.type != "meta" and "out" not in kwargs:
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xAB)
        elif t.dtype != torch.bool:
            t.fill_(-7)
    return t


# torch caches its list of factory functions (for `with torch.device(...)`) the first
# time a device context is entered; built while torch.empty is patched, the cache would
# hold the patched function and later meta-device contexts would silently allocate on
# the CPU. Build it now, before any patching.
torch.utils._device._device_constructors()


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    yield
