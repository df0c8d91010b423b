"""Fixtures of the optimizer tests."""

import pytest
import torch

from lowrank_kernels.ops import _registry as reg
from ..conftest import require_backend


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    """Each backend of the projection ops that can run on CPU here (Triton under TRITON_INTERPRET=1)."""
    name = request.param
    require_backend("projection_project_update_backproject", name)
    return name
