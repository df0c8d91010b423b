"""Fixtures of the optimizer tests."""
import os

import pytest
import torch

from lowrank_kernels.ops import _registry as reg


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    """Each backend of the projection ops that can run on CPU here (Triton under TRITON_INTERPRET=1)."""
    name = request.param
    reason = reg.why_unavailable(reg.OPS["projection_project_update_backproject"], name, torch.device("cpu"))
    if reason is not None:
        if name == "cpp" and os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") == "1":
            pytest.fail(f"cpp backend expected but unavailable: {reason}")
        pytest.skip(reason)
    return name
