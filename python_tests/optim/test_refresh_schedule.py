"""The owner schedule of shared refreshes (optim/refresh_share.py): deterministic, largest
first onto the least-loaded rank; and the ``refresh_sharing`` key is checked by name."""
import pytest
import torch

from lowrank_kernels.optim import GaLoreAdamW
from lowrank_kernels.optim.refresh_share import schedule, svd_cost


def test_schedule_is_greedy_largest_first():
    costs = [svd_cost(4096, 11008), svd_cost(4096, 4096), svd_cost(4096, 4096), svd_cost(4096, 4096),
             svd_cost(4096, 4096), svd_cost(11008, 4096), svd_cost(4096, 11008)]
    owners = schedule(costs, 4)
    # the three 4096x11008 weights (2.69 squares of work each) go to ranks 0, 1, 2; rank 3 then takes
    # squares while it has the least work (3 of them), and the last square goes to rank 0 (ties: lowest)
    assert owners == [0, 3, 3, 3, 0, 1, 2]
    assert owners == schedule(list(costs), 4)  # the same on every rank: a pure function


def test_schedule_balances_and_breaks_ties_by_position():
    assert schedule([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert schedule([1, 1, 8], 2) == [1, 1, 0]
    assert schedule([], 3) == []
    assert schedule([3, 2, 1], 1) == [0, 0, 0]
    loads = [0] * 3
    costs = [97, 13, 55, 55, 8, 71, 2, 40]
    for c, r in zip(costs, schedule(costs, 3)):
        loads[r] += c
    assert max(loads) - min(loads) <= max(costs)
    with pytest.raises(ValueError, match="world must be >= 1"):
        schedule([1], 0)


def test_refresh_sharing_is_checked_and_kept_per_group():
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="param group 0: refresh_sharing must be one of 'owner', 'replicate'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "refresh_sharing": "all"}])
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], refresh_sharing="replicate")
    assert opt.param_groups[0]["refresh_sharing"] == "replicate"
    assert GaLoreAdamW([w], rank=2).defaults["refresh_sharing"] == "owner"
