"""The non-finite gradient check is exact: the fast L2 probe never skips a finite gradient."""
import pytest
import torch

from lowrank_kernels.optim import GaLoreAdamW
from lowrank_kernels.optim.distributed import inf_norms


def test_probe_is_finite_exactly_when_the_gradient_is():
    huge = torch.full((8, 8), 1e30)  # finite, but its sum of squares overflows float32
    nan = torch.randn(8, 8)
    nan[3, 4] = float("nan")
    inf = torch.randn(5)
    inf[0] = -float("inf")
    ok = torch.randn(7, 3, dtype=torch.bfloat16)
    assert inf_norms([huge, nan, inf, ok]).isfinite().tolist() == [True, False, False, True]


def test_huge_finite_gradient_is_not_skipped():
    # A plain-AdamW group, so no SVD of a huge matrix is involved: 1e19 squared fits
    # float32, but the sum of 120 such squares (the L2 probe) overflows.
    w = torch.nn.Parameter(torch.randn(12, 10))
    w0 = w.detach().clone()
    with pytest.warns(UserWarning, match="no parameter group is low-rank"):
        opt = GaLoreAdamW([{"params": [w], "rank": None}], lr=0.1)
    w.grad = torch.full_like(w, 1e19)
    opt.step()
    assert opt.nonfinite_skips == 0
    assert not torch.equal(w.detach(), w0)
    assert torch.isfinite(w).all()
