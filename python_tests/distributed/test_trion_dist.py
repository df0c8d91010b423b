"""Trion's sharded step (``shard_work=True``: each matrix's update computed on one rank and
broadcast) on 2 gloo processes equals the unsharded step bitwise; see ``_trion_worker.py``."""
import pytest

from .. import _dist
from . import _trion_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_trion_worker.worker, str(tmp_path_factory.mktemp("trion")))


@pytest.mark.parametrize("key", ["weights", "ownership", "skips"])
def test_sharded_step_equals_single_process(results, key):
    for r, res in enumerate(results):
        assert "error" not in res, res["error"][1]
        print(f"rank {r} {key}: {res.get(key)}")
    _dist.check(results, key)
