"""Loads the C++ extension ``lowrank_kernels._C`` if it was built.

Importing the shared library runs its static initializers, which register the
C++ CPU kernels with the dispatcher as the CPU kernels of the private ops
``_lowrank_kernels::<family>_<op>_cpu`` (csrc/registration.cpp). The package works
without it (reference and Triton backends); ``python -m lowrank_kernels`` says which
case holds.
"""
from __future__ import annotations

import importlib
from typing import Optional

_loaded = False
_error: Optional[str] = None
_tried = False


def load() -> bool:
    """Import the extension once; return whether it is available."""
    global _loaded, _error, _tried
    if _tried:
        return _loaded
    _tried = True
    try:
        importlib.import_module("lowrank_kernels._C")
    except ImportError as e:
        _error = str(e) or type(e).__name__
        _loaded = False
    else:
        _loaded = True
    return _loaded


def loaded() -> bool:
    return load()


def load_error() -> Optional[str]:
    load()
    return _error


def extension_path() -> Optional[str]:
    if not load():
        return None
    return getattr(importlib.import_module("lowrank_kernels._C"), "__file__", None)
