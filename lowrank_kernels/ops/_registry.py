"""The op registry: one schema per op, a fake impl, and three backends.

Every op ``lowrank_kernels::<family>_<op>`` is defined here from Python (schema,
fake impl) and implemented by a *router* registered as its
``CompositeExplicitAutograd`` kernel. The router picks one backend per call:

``reference``
    the pure-PyTorch specification in ``lowrank_kernels/reference/<family>.py``;
    serves every device.
``cpp``
    the C++ CPU kernel ``<family>_<op>_cpu`` (csrc/cpu/kernels.h) named by
    ``define_op(..., cpp=...)``. It is itself a dispatcher op in the private namespace
    ``_lowrank_kernels`` (so ``torch.ops.lowrank_kernels`` lists only the public ops):
    ``define_op`` defines ``_lowrank_kernels::<family>_<op>_cpu`` with the public op's
    schema and fake impl, and the extension registers the C++ function as its CPU kernel
    (``TORCH_LIBRARY_IMPL(_lowrank_kernels, CPU, m)`` in csrc/registration.cpp), so
    ``opcheck`` and ``torch.compile`` see it; serves CPU tensors when the extension
    ``lowrank_kernels._C`` is built.
``triton``
    the Triton launcher ``<family>_<op>_triton`` (``lowrank_kernels.kernels.<family>``)
    handed to ``define_op(..., triton=...)`` as a function that imports it on first use;
    serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (how CI runs the
    GPU kernels).

Without a forced backend the router takes ``triton`` on CUDA, ``cpp`` on CPU, and
the reference otherwise (or where the preferred one is missing). A backend is forced
with the environment variable ``LOWRANK_KERNELS_BACKEND=reference|cpp|triton`` or
the context manager :func:`use_backend`; forcing one that cannot serve the device
raises :class:`BackendUnavailableError`.

Why a router instead of C++ overriding the CPU key directly: a kernel registered
for the CPU dispatch key would always win over the reference, so the reference
could not be forced on CPU for tests and benchmarks. The router keeps every
backend reachable through one public op.

Validation can be cached per op (``define_op(..., cache_key=..., recheck=...,
remember=...)``): a validated call's *key* (its tensors' data pointers, shapes, strides,
dtypes and devices and the structural scalars: everything the validator's outcome depends
on, except what ``recheck`` covers) is remembered, and a later call with the same key runs
only ``recheck`` (scalar ranges, tensor values, the memory of tensors left out of the key).
The multi-tensor ops of the optimizers' steps pass the same parameters, moments and
projectors step after step (and new gradients, checked by ``recheck``), so their full
validation runs once per bucket.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

import torch

from ._checks import _PLAIN_TENSOR_TYPES, _native_helpers

NAMESPACE = "lowrank_kernels"
#: the private namespace of the C++ kernels' dispatcher ops (not for users)
CPP_NAMESPACE = "_lowrank_kernels"
BACKENDS = ("reference", "cpp", "triton")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_cpp_lib = torch.library.Library(CPP_NAMESPACE, "FRAGMENT")


class _State(threading.local):
    # A class-level default: reading ``_state.stack`` in a thread that never entered
    # use_backend finds None here instead of raising (and swallowing) AttributeError.
    stack: Optional[list] = None


_state = _State()

# os.environ reads, per op call. os.environ.get encodes the key and decodes the
# value on every call (~0.7 us); where CPython's mapping is available the key is
# encoded once and the raw mapping read directly. Both are the same live mapping
# (os.environ[...] = ... and monkeypatch.setenv update it), so changes still apply
# at the next call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_ENCODE = getattr(os.environ, "encodekey", None)
_ENV_DECODE = getattr(os.environ, "decodevalue", None)
_FAST_ENV = isinstance(_ENV_DATA, dict) and callable(_ENV_ENCODE) and callable(_ENV_DECODE)
_ENV_KEYS: Dict[str, object] = {}


def _getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, read at call time."""
    if not _FAST_ENV:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _ENV_ENCODE(name)
    raw = _ENV_DATA.get(key)
    return None if raw is None else _ENV_DECODE(raw)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve an op on the given device."""


@dataclass
class OpDef:
    """One registered op and where each backend's implementation lives."""

    name: str  # e.g. "projection_project_adam"
    family: str  # e.g. "projection"
    schema: str
    reference: Callable
    #: name of the C++ kernel (``<family>_<op>_cpu``, csrc/cpu/kernels.h), None without one
    cpp: Optional[str] = None
    #: a function returning the Triton launcher (imported on first use), None without one
    triton: Optional[Callable[[], Callable]] = field(default=None, repr=False)
    _triton_fn: Optional[Callable] = field(default=None, repr=False)
    _cpp_op: Optional[Callable] = field(default=None, repr=False)

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def has_cpp(self) -> bool:
        return self.cpp is not None

    @property
    def has_triton(self) -> bool:
        return self.triton is not None

    @property
    def cpp_name(self) -> Optional[str]:
        """The C++ kernel's name, also its private op's name in :data:`CPP_NAMESPACE`."""
        return self.cpp

    @property
    def cpp_qualname(self) -> Optional[str]:
        return None if self.cpp is None else f"{CPP_NAMESPACE}::{self.cpp}"

    def triton_fn(self) -> Callable:
        """The Triton launcher. Imported lazily: Triton decides at decoration time whether it
        runs in the interpreter, and nothing may touch CUDA at import time."""
        if self._triton_fn is None:
            if self.triton is None:
                raise BackendUnavailableError(f"{self.qualname} has no Triton kernel")
            self._triton_fn = self.triton()
        return self._triton_fn

    def cpp_op(self):
        """The C++ kernel's private dispatcher op (``torch.ops._lowrank_kernels.<cpp>.default``)."""
        if self._cpp_op is None:
            if self.cpp is None:
                raise BackendUnavailableError(f"{self.qualname} has no C++ kernel")
            self._cpp_op = getattr(getattr(torch.ops, CPP_NAMESPACE), self.cpp).default
        return self._cpp_op

    def cpp_registered(self) -> bool:
        """Whether the extension registered the C++ kernel (cached once true)."""
        if self._cpp_op is not None:
            return True
        if self.cpp is not None and torch._C._dispatch_has_kernel_for_dispatch_key(self.cpp_qualname, "CPU"):
            self.cpp_op()
            return True
        return False


OPS: Dict[str, OpDef] = {}


# --------------------------------------------------------------------------- backend choice
def _validate_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` (innermost) or the environment, else None.

    Read at every call (tests and users change both at run time).
    """
    stack = _state.stack
    if stack:
        return stack[-1]
    env = _getenv(ENV_VAR)
    if env:
        if env in BACKENDS:  # the common case, without the strip
            return env
        env = env.strip()
        if env:
            return _validate_backend_name(env, ENV_VAR)
    return None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op called inside the block to run on backend ``name``.

    ``name`` is ``"reference"``, ``"cpp"`` or ``"triton"``. Nested blocks stack; the
    setting is per thread. An op called on a device the backend cannot serve raises
    :class:`BackendUnavailableError` instead of silently falling back.
    """
    _validate_backend_name(name, "use_backend")
    stack = _state.stack
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


_ext_loaded: Optional[bool] = None
_triton_ok: Optional[bool] = None


def extension_loaded() -> bool:
    # _ext tries the import once and remembers the outcome, so this cannot change.
    global _ext_loaded
    if _ext_loaded is None:
        from lowrank_kernels import _ext

        _ext_loaded = _ext.loaded()
    return _ext_loaded


def triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
        except Exception:  # pragma: no cover - depends on the machine
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def triton_interpreting() -> bool:
    return _getenv("TRITON_INTERPRET") == "1"


def why_unavailable(op: OpDef, backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can serve ``op`` on ``device``, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if not op.has_cpp:
            return "it has no C++ kernel"
        if device.type != "cpu":
            return f"the C++ kernels serve CPU tensors only, got {device.type} tensors"
        if not extension_loaded():
            from lowrank_kernels import _ext

            return (
                "the C++ extension lowrank_kernels._C is not built "
                f"({_ext.load_error()}); run `make test` or "
                "`pip install --no-build-isolation -e .`"
            )
        if not op.cpp_registered():
            return f"the built extension has no {op.cpp_qualname} (rebuild it: `make build`)"
        return None
    if backend == "triton":
        if not op.has_triton:
            return "it has no Triton kernel"
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"Triton kernels serve CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
            f"got {device.type} tensors"
        )
    raise ValueError(f"unknown backend {backend!r}")


_PREFERRED = {"cuda": "triton", "cpu": "cpp"}


def resolve_backend(op: OpDef, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` now (forced, or the automatic choice)."""
    forced = forced_backend()
    if forced is not None:
        reason = why_unavailable(op, forced, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced but cannot run {op.qualname} on {device}: {reason}"
            )
        return forced
    preferred = _PREFERRED.get(device.type)
    if preferred is not None and why_unavailable(op, preferred, device) is None:
        return preferred
    return "reference"


def _first_device(args) -> Optional[torch.device]:
    """The device of the first tensor argument (looking into tensor lists too); None for a
    multi-tensor op called on empty lists."""
    has_list = False
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            has_list = True
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    if has_list:  # a multi-tensor op on empty lists: nothing to do on any device
        return None
    raise TypeError("an op was called without any tensor argument")


# --------------------------------------------------------------------------- definition
def fake_no_output(*args) -> None:
    """The fake impl of an op that returns nothing (its outputs are in-place)."""
    return None


def define_op(
    name: str,
    schema: str,
    *,
    family: str,
    reference: Callable,
    fake: Callable,
    validate: Optional[Callable] = None,
    cache_key: Optional[Callable] = None,
    recheck: Optional[Callable] = None,
    remember: Optional[Callable] = None,
    triton: Optional[Callable[[], Callable]] = None,
    cpp: Optional[str] = None,
) -> Callable:
    """Define ``lowrank_kernels::<name>`` and return a callable that invokes it.

    ``schema`` is the argument/return part, e.g. ``"(Tensor x, float a) -> Tensor"``.
    The backends: ``reference`` (the pure-PyTorch specification, every device);
    ``triton``, a function returning the Triton launcher, called once on first use so that
    the package imports without triton (e.g. ``lambda: _kernels().<family>_<op>_triton``);
    ``cpp``, the name of the C++ kernel (``"<family>_<op>_cpu"``, csrc/cpu/kernels.h):
    the op ``_lowrank_kernels::<cpp>`` is defined here with the same schema and fake impl,
    and the extension, when built, registers the C++ function as its CPU kernel
    (csrc/registration.cpp).
    ``validate(*args)`` raises a clear ``ValueError``/``TypeError`` on bad input; it
    runs in the fake impl (so ``torch.compile`` traces see it) and before any backend
    runs, so no backend ever sees (or half-updates) bad input. ``fake(*args)`` returns
    the outputs' shapes/dtypes. The backends take the op's arguments positionally.

    ``cache_key(*args)`` (optional, with ``validate``): a hashable key such that every
    call with that key passes ``validate`` exactly when it passes ``recheck(memo, *args)``
    (e.g. :func:`~lowrank_kernels.ops._checks.tensor_signature` of the tensors plus the
    scalars the structural checks read), or None (do not cache this call). After a call
    with key ``k`` passed ``validate``, ``memo = remember(*args)`` (None without
    ``remember``) is kept with ``k``, and later calls with key ``k`` run only
    ``recheck(memo, *args)``, which must raise ``validate``'s error when it fails (e.g. by
    calling ``validate``).
    """
    if name in OPS:
        raise RuntimeError(f"op {name} defined twice")
    if cache_key is not None and validate is None:
        raise TypeError(f"define_op({name!r}): cache_key needs validate")
    op = OpDef(name=name, family=family, schema=schema, reference=reference, cpp=cpp, triton=triton)
    OPS[name] = op
    _lib.define(name + schema)
    if cpp is not None:
        _cpp_lib.define(cpp + schema)
    validated: Dict[object, object] = {}  # key -> memo of calls that passed validate (bounded, see below)

    def check(args):
        if cache_key is not None:
            key = cache_key(*args)
            if key is not None:
                memo = validated.get(key, _MISSING)
                if memo is not _MISSING:
                    if recheck is not None:
                        recheck(memo, *args)
                    return
                validate(*args)
                if len(validated) >= _VALIDATED_MAX:
                    validated.clear()
                validated[key] = remember(*args) if remember is not None else None
                return
        validate(*args)

    def router(*args):
        if validate is not None:
            check(args)
        device = _first_device(args)
        # Empty tensor lists: the reference's loop does nothing (no backend is needed).
        backend = "reference" if device is None else resolve_backend(op, device)
        if backend == "reference":
            return reference(*args)
        if backend == "cpp":
            return op.cpp_op()(*args)
        return op.triton_fn()(*args)

    _lib.impl(name, router, "CompositeExplicitAutograd")
    _ROUTERS[name] = router

    def fake_impl(*args):
        if validate is not None:
            validate(*args)
        return fake(*args)

    torch.library.register_fake(op.qualname, lib=_lib)(fake_impl)
    if cpp is not None:  # the C++ op gets the same fake impl, so it can be opchecked and traced on its own
        torch.library.register_fake(op.cpp_qualname, lib=_cpp_lib)(fake_impl)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


_ROUTERS: Dict[str, Callable] = {}
def _plain_args(args) -> bool:
    """Whether every tensor in ``args`` (and in its tensor lists) is a plain ``Tensor`` or
    ``Parameter`` (no subclass: DTensor and other ``__torch_dispatch__`` types need the dispatcher);
    in one C++ call with the extension (``lowrank_kernels._C.all_plain``)."""
    native = _native_helpers()
    if native is not None:
        return native.all_plain(args)
    plain = _PLAIN_TENSOR_TYPES
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in plain:
                return False
        elif type(a) is list or type(a) is tuple:
            for t in a:
                if type(t) not in plain and isinstance(t, torch.Tensor):
                    return False
    return True


_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling


def plain_eager() -> bool:
    """No ``__torch_dispatch__`` mode (``FakeTensorMode``, functionalization, op-counting
    modes), no ``__torch_function__`` mode, no functorch transform, and not traced by
    ``torch.compile``: what runs now is what the dispatcher would run (host-side helpers may
    then stand in for ATen ops on plain tensors)."""
    # is_compiling first: torch.compile folds it to True and never traces the C queries after it
    return not (_is_compiling() or _len_dispatch_stack() or _function_mode_enabled() or _functorch_active())


def eager_caller(overload) -> Callable:
    """A caller of ``overload`` (an op returned by :func:`define_op`) that, in plain eager
    mode, runs the op's router directly instead of entering the dispatcher first.

    Plain eager mode: grad mode off (optimizer steps run under ``torch.no_grad``), no
    ``__torch_dispatch__`` mode (``FakeTensorMode``, functionalization, op-counting modes), no
    ``__torch_function__`` mode, no functorch transform, not traced by ``torch.compile``, and
    every tensor argument a plain ``Tensor`` / ``Parameter``. There the dispatcher would only
    call the router (the op's ``CompositeExplicitAutograd`` kernel) with the same arguments
    (omitted trailing arguments take the schema's defaults, as the dispatcher fills them), so
    the result and the validation are the same; one Python -> C++ -> Python round trip with
    every tensor list converted twice is saved. Anything else goes through ``overload``.
    """
    router = _ROUTERS[overload._schema.name.split("::", 1)[1]]
    schema_args = overload._schema.arguments
    defaults = tuple(a.default_value for a in schema_args)
    n = len(schema_args)

    def call(*args):
        if not _grad_enabled() and plain_eager() and _plain_args(args):
            if len(args) < n:
                args = args + defaults[len(args):]
            return router(*args)
        return overload(*args)

    call.__name__ = call.__qualname__ = overload._schema.name.split("::", 1)[1]
    call.__doc__ = f"Calls ``{overload._schema.name}`` (see :func:`~lowrank_kernels.ops._registry.eager_caller`)."
    return call


#: validated keys remembered per op; the table is emptied when full (a new working set refills it).
_VALIDATED_MAX = 256
_MISSING = object()

def backend_table() -> Dict[str, Dict[str, str]]:
    """For every op, which backend the automatic choice uses on each available device."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = {}
    for name, op in sorted(OPS.items()):
        table[name] = {}
        for dev in devices:
            try:
                table[name][str(dev)] = resolve_backend(op, dev)
            except BackendUnavailableError as e:  # forced via the environment
                table[name][str(dev)] = f"error: {e}"
    return table
