"""The Hugging Face Trainer with 2 gloo processes (CPU) and ``lowrank_optimizer``.

FSDP2 through accelerate cannot run on a CPU: accelerate makes a CPU multi-process run DDP
(``MULTI_CPU``) whatever ``fsdp_config`` says (checked here, so that this test is revisited
when it changes). Under the Trainer's DDP: the ranks end with the same weights, the
projector refreshes are shared (per refresh the SVDs summed over the ranks equal the
projected weights) and the result equals ``refresh_sharing="replicate"`` bitwise.
"""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from .. import _dist  # noqa: E402
from . import _trainer_dist_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # spawns 2 processes (about a minute on a loaded 2-core machine)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = _dist.run_ranks(worker.worker, str(tmp_path_factory.mktemp("trainer")))
    for r in res:
        assert "error" not in r, r["error"][1]
    return res


def test_accelerate_runs_cpu_processes_as_ddp_not_fsdp(results):
    _dist.check(results, "cpu_is_ddp_not_fsdp")
    _dist.check(results, "ddp")


def test_trainer_ddp_ranks_agree_and_sharing_is_bitwise(results):
    _dist.check(results, "ranks_agree")
    _dist.check(results, "owner_equals_replicate")


def test_trainer_ddp_shares_the_svds(results):
    counts = _dist.check(results, "svds")
    refreshes = len(range(1, worker.STEPS + 1, worker.GAP))
    projected = counts[0]["projected"]
    assert projected > 0
    assert sum(c["owner"] for c in counts) == refreshes * projected, counts
    assert all(c["replicate"] == refreshes * projected for c in counts), counts
