"""The package itself: the extension is built where `make test` ran, the CLI, the registry."""
import os
import subprocess
import sys

import pytest
import torch

import lowrank_kernels
from lowrank_kernels import _ext
from lowrank_kernels.ops import BackendUnavailableError, use_backend
from lowrank_kernels.ops import _registry as reg


@pytest.mark.skipif(os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") != "1", reason="only where make test built it")
def test_extension_built_where_make_test_ran():
    assert _ext.loaded(), f"lowrank_kernels._C failed to load: {_ext.load_error()}"
    for name, op in reg.OPS.items():
        if op.has_cpp:
            assert op.cpp_registered(), f"C++ kernel {op.cpp_qualname} not registered"


def _ops_in(namespace):
    return {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith(namespace + "::")}


def test_public_namespace_lists_only_the_user_ops():
    """torch.ops.lowrank_kernels holds exactly the ops define_op registered; the C++ kernels'
    ops live in the private namespace, one per op with a C++ kernel, under the name define_op
    was given."""
    assert _ops_in(reg.NAMESPACE) == set(reg.OPS)
    assert _ops_in(reg.CPP_NAMESPACE) == {op.cpp for op in reg.OPS.values() if op.has_cpp}
    assert not any(name.endswith("_cpu") for name in _ops_in(reg.NAMESPACE))


def test_every_op_has_schema_fake_and_reference():
    assert reg.OPS, "no ops registered"
    for name, op in reg.OPS.items():
        packet = getattr(torch.ops.lowrank_kernels, name)
        assert packet.default._schema.name == f"lowrank_kernels::{name}"
        assert callable(op.reference)
        if op.has_triton:
            assert callable(op.triton_fn()), f"{name}: Triton launcher missing"


def test_cli_prints_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_kernels"], capture_output=True, text=True, check=True,
        env={**os.environ, "LOWRANK_KERNELS_BACKEND": ""},
    ).stdout
    assert f"torch           {torch.__version__}" in out
    assert "triton" in out and "C++ extension" in out
    for name in reg.OPS:
        assert name in out


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with use_backend("cuda"):
            pass


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    g = torch.randn(8, 6)
    p = torch.randn(2, 6)
    m = torch.zeros(8, 2)
    v = torch.zeros(8, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="cannot run lowrank_kernels::projection_project_adam on cpu"):
        lowrank_kernels.ops.project_adam_(g, p, m, v, side="right")
    assert torch.count_nonzero(m) == 0  # nothing written


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "reference")
    op = reg.OPS["projection_project_adam"]
    assert reg.resolve_backend(op, torch.device("cpu")) == "reference"
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LOWRANK_KERNELS_BACKEND"):
        reg.resolve_backend(op, torch.device("cpu"))


def test_context_manager_beats_env(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "cpp")
    op = reg.OPS["projection_project_adam"]
    with use_backend("reference"):
        assert reg.resolve_backend(op, torch.device("cpu")) == "reference"
