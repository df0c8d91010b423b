"""Projector refreshes shared across the ranks (``refresh_sharing="owner"``, the default):
2 gloo processes on the CPU, under DDP and FSDP2.

- per refresh, the projectors computed summed over the ranks equal the number of projected
  weights (``torch.linalg.svd`` calls for GaLore / Q-GaLore / FRUGAL-svd, DCT scorings for
  DCT and FRUGAL-dct; each rank computes all of them with ``"replicate"``);
- weights and optimizer state after 4 steps (refreshes at 1 and 3) equal the
  ``"replicate"`` run bitwise;
- without DDP (a different gradient per rank) the owner mode warns once and computes
  locally; an exception on a refresh's owner is raised on every rank; ``"replicate"``
  issues no collective at all.
"""
import pytest

from .. import _dist
from . import _share_worker

pytestmark = pytest.mark.slow  # spawns 2 processes (about a minute on a loaded 2-core machine)

N_PROJECTED = 4  # weights in the low-rank groups of _worker._groups
SVD = ["galore", "galore_right_lowrank", "galore_full", "qgalore_int4", "frugal_svd"]
DCT = ["dct_std", "frugal_dct"]
CASES = [(n, "ddp") for n in SVD + DCT] + [(n, "fsdp") for n in SVD]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_share_worker.worker, str(tmp_path_factory.mktemp("share")), CASES)


@pytest.mark.parametrize("name,layout", CASES)
def test_owner_equals_replicate_bitwise(results, name, layout):
    _dist.check(results, f"bitwise[{name},{layout}]")


@pytest.mark.parametrize("name,layout", CASES)
def test_each_projector_computed_once_per_refresh(results, name, layout):
    counts = _dist.check(results, f"count[{name},{layout}]")
    assert all(c["failed"] == 0 for c in counts)
    for t in range(_share_worker.STEPS):
        refresh = t % _share_worker.GAP == 0
        owner = sum(c["owner"][t] for c in counts)
        assert owner == (N_PROJECTED if refresh else 0), (t, counts)
        for c in counts:  # without sharing every rank computes every one
            assert c["replicate"][t] == (N_PROJECTED if refresh else 0), (t, counts)
        if refresh:  # the work is split, not moved: each rank computes some
            assert all(c["owner"][t] >= 1 for c in counts), (t, counts)


def test_different_gradients_fall_back_to_local_refreshes(results):
    _dist.check(results, "mismatch")


def test_owner_error_raised_on_every_rank(results):
    _dist.check(results, "owner_error")


def test_replicate_mode_communicates_nothing(results):
    _dist.check(results, "replicate_silent")
