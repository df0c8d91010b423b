"""LayerSampler under DDP: 2 gloo processes on the CPU (one spawn, ``_ddp_worker.worker``).

- with ``find_unused_parameters=True``, AdamW + the sampler (``state="drop"``) on each
  rank's half of the batch equals single-process training on the whole batch
  (relative error < 1e-4), frozen layers get no gradient, keep no optimizer state and
  stay bit-identical, and the ranks' weights agree bit for bit;
- plain DDP (``find_unused_parameters=False``) raises once layers are frozen.
"""
import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from . import _ddp_worker

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("owlore_ddp"))
    mp.spawn(_ddp_worker.worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


@pytest.mark.parametrize("key", ["ddp_find_unused", "ddp_plain_refuses"])
def test_ddp(results, key):
    for r, res in enumerate(results):
        assert key in res, f"rank {r}: no result for {key}"
        ok, detail = res[key]
        assert ok, f"rank {r}: {key}: {detail}"
