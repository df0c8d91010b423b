"""Old public names kept for one release: a module-level ``__getattr__`` that warns.

Usage, at the end of a module that renamed ``old_name`` to ``new_name``::

    __getattr__ = deprecated_names(__name__, {"old_name": "new_name"})

``module.old_name`` (and ``from module import old_name``) then returns the object bound
to ``new_name`` in that module and emits a ``DeprecationWarning`` naming the new spelling.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Mapping


def deprecated_names(module: str, renamed: Mapping[str, str]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` serving each old name of ``renamed`` (old -> new)."""
    renamed = dict(renamed)

    def __getattr__(name: str) -> Any:
        new = renamed.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; use {module}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], new)

    return __getattr__
