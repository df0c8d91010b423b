"""8-bit moments (``moment_bits=8``) under FSDP2 on 2 gloo processes equal one process.

Every moment is 8-bit (``min_8bit_size=0``, ``block_size=4``); GaLore (std: right and left
sides, weight decay), GaLore right, DCT right with moment re-indexing, APOLLO and FRUGAL
(columns). The right-side moments and their absmax are sharded like the weight (blocks lie
inside rows, so every dim-0 shard is block-aligned); the left side all-reduces ``R`` and runs
the 8-bit Adam on the replicated moments. See ``_m8_worker.py`` for the tolerance.
"""
import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from . import _m8_worker

WORLD = 2
NAMES = ["galore", "galore_right", "dct_right_reindex", "apollo", "frugal_columns"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist8"))
    mp.spawn(_m8_worker.worker, args=(WORLD, _free_port(), out, NAMES), nprocs=WORLD, join=True)
    per_rank = []
    for r in range(WORLD):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_8bit_matches_single_process(results, name):
    for r, res in enumerate(results):
        key = f"fsdp8[{name}]"
        assert key in res, f"rank {r}: no result for {key}"
        ok, detail = res[key]
        print(f"rank {r} {name}: {detail}")
        assert ok, f"rank {r}: {name}: {detail}"
