"""The multi-tensor (list) ops and the bucketed optimizer step on DTensors: 2 gloo processes.

- ``projection_foreach_project_update_backproject`` (dense and DCT projectors, both sides),
  ``adam_foreach_update`` and ``dct_foreach_score_topk`` on lists of DTensors (row-sharded,
  uneven and empty shards, shards with fewer rows than the rank, replicated entries) give
  bitwise what the single-tensor op gives entry by entry on the same DTensors, and plain
  single-process results up to rounding; a bad entry raises before any entry is written;
- FSDP2 training with GaLoreAdamW and DCTAdamW: the bucketed step (the list ops, on local
  shards or through the per-entry handler with the per-parameter path's collectives) is
  bitwise the per-parameter step (``foreach=False``), with the same collectives per step,
  and matches single-process training; the list ops were really called with DTensors
  (DCTAdamW's refreshes through ``dct_foreach_score_topk``).
"""
import pytest

from .. import _dist
from . import _foreach_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_foreach_worker.worker, str(tmp_path_factory.mktemp("dist_foreach")))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct"])
def test_projection_list_on_dtensors(results, side, kind):
    _dist.check(results, f"projection_list[{side},{kind}]")


def test_adam_list_on_dtensors(results):
    _dist.check(results, "adam_list")


def test_adam_list_with_8bit_moments_on_dtensors(results):
    _dist.check(results, "adam_list_8bit")


def test_bad_dtensor_list_raises_before_any_write(results):
    _dist.check(results, "bad_list")


@pytest.mark.parametrize("side", ["right", "left"])
def test_dct_score_list_on_dtensors(results, side):
    _dist.check(results, f"dct_list[{side}]")


@pytest.mark.parametrize("name", _foreach_worker.BUCKET_CONFIGS)
def test_fsdp2_bucketed_equals_per_parameter_and_single_process(results, name):
    _dist.check(results, f"bucketed_fsdp[{name}]")
