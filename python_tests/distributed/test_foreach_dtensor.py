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
import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from . import _foreach_worker

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_foreach"))
    mp.spawn(_foreach_worker.worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


def _check(results, key):
    for r, res in enumerate(results):
        assert key in res, f"rank {r}: no result for {key}"
        ok, detail = res[key]
        assert ok, f"rank {r}: {key}: {detail}"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct"])
def test_projection_list_on_dtensors(results, side, kind):
    _check(results, f"projection_list[{side},{kind}]")


def test_adam_list_on_dtensors(results):
    _check(results, "adam_list")


def test_adam_list_with_8bit_moments_on_dtensors(results):
    _check(results, "adam_list_8bit")


def test_bad_dtensor_list_raises_before_any_write(results):
    _check(results, "bad_list")


@pytest.mark.parametrize("side", ["right", "left"])
def test_dct_score_list_on_dtensors(results, side):
    _check(results, f"dct_list[{side}]")


@pytest.mark.parametrize("name", _foreach_worker.BUCKET_CONFIGS)
def test_fsdp2_bucketed_equals_per_parameter_and_single_process(results, name):
    _check(results, f"bucketed_fsdp[{name}]")
