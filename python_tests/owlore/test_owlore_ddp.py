"""LayerSampler under DDP: 2 gloo processes on the CPU (one spawn, ``_ddp_worker.worker``).

- with ``find_unused_parameters=True``, AdamW + the sampler (``state="drop"``) on each
  rank's half of the batch equals single-process training on the whole batch
  (relative error < 1e-4), frozen layers get no gradient, keep no optimizer state and
  stay bit-identical, and the ranks' weights agree bit for bit;
- plain DDP (``find_unused_parameters=False``) raises once layers are frozen.
"""
import pytest

from .. import _dist
from . import _ddp_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_ddp_worker.worker, str(tmp_path_factory.mktemp("owlore_ddp")))


@pytest.mark.parametrize("key", ["ddp_find_unused", "ddp_plain_refuses"])
def test_ddp(results, key):
    _dist.check(results, key)
