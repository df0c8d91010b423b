"""Shared test set-up.

TRITON_INTERPRET must be set before anything imports Triton kernels, so that the
Triton backend runs on CPU tensors: it is set here, before lowrank_kernels loads.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lowrank_kernels  # noqa: E402,F401
from lowrank_kernels.ops import _registry  # noqa: E402


def available_backends(device="cpu"):
    """Backends that can run on ``device`` in this process (any op of the projection family)."""
    op = _registry.OPS["projection_project_adam"]
    return [b for b in _registry.BACKENDS if _registry.why_unavailable(op, b, torch.device(device)) is None]


# GPU runs of the backend tests (bench/gpu_check.sh): LOWRANK_KERNELS_TEST_DEVICE=cuda, with
# TRITON_INTERPRET=0, selects only the tests that take the `device` fixture and runs them on
# CUDA tensors (the Triton kernels compiled for the GPU, the reference on CUDA).
# Default "cpu": every test runs, `device` is the CPU.
TEST_DEVICE = os.environ.get("LOWRANK_KERNELS_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    """The device backend tests run on: ``cpu``, or ``cuda`` under LOWRANK_KERNELS_TEST_DEVICE=cuda."""
    return torch.device(TEST_DEVICE)


def require_backend(op_name: str, backend: str, device="cpu") -> None:
    """Skip when ``backend`` cannot run ``op_name`` here, but fail where the set-up says it
    must: the C++ backend after `make test` built the extension
    (LOWRANK_KERNELS_EXPECT_EXT=1), the Triton backend under TRITON_INTERPRET=1 or on CUDA."""
    reason = _registry.why_unavailable(_registry.OPS[op_name], backend, torch.device(device))
    if reason is None:
        return
    expected = (backend == "cpp" and os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") == "1") or (
        backend == "triton" and (os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cuda")
    )
    if expected:
        pytest.fail(f"{backend} backend expected but unavailable: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cpu":
        keep = [i for i in items if "device" in getattr(i, "fixturenames", ())]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or TEST_DEVICE == "cuda":
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out = out.double()
    ref = ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


# bf16 / fp16 tolerances are relative errors against a float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
