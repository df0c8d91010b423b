"""8-bit moments (``moment_bits=8``) under FSDP2 on 2 gloo processes equal one process.

Every moment is 8-bit (``min_8bit_size=0``, ``block_size=4``); GaLore (std: right and left
sides, weight decay), GaLore right, DCT right with moment re-indexing, APOLLO and FRUGAL
(columns). The right-side moments and their absmax are sharded like the weight (blocks lie
inside rows, so every dim-0 shard is block-aligned); the left side all-reduces ``R`` and runs
the 8-bit Adam on the replicated moments. See ``_m8_worker.py`` for the tolerance.
"""
import pytest

from .. import _dist
from . import _m8_worker

NAMES = ["galore", "galore_right", "dct_right_reindex", "apollo", "frugal_columns"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_m8_worker.worker, str(tmp_path_factory.mktemp("dist8")), NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_8bit_matches_single_process(results, name):
    key = f"fsdp8[{name}]"
    for r, res in enumerate(results):
        print(f"rank {r} {name}: {res.get(key)}")
    _dist.check(results, key)
