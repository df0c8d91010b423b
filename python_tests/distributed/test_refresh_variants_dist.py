"""``moment_transport=True`` (GaLore: the left projector is row-sharded under FSDP2, the
right-side moments are; DCT) and GaLore's ``refresh="sample" | "random"`` on 2 gloo processes:
DDP and FSDP2 equal one process across a transporting refresh (steps 1 and 3 refresh), with
``_worker``'s tolerance. The sampled / random projectors are drawn alike on every rank (seeded
from the step and the parameter's position), so the ranks stay in step."""
import pytest

from .. import _dist
from . import _refresh_worker

NAMES = ["galore_transport", "galore_transport_8bit", "galore_sample", "galore_random", "dct_transport"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _dist.run_ranks(_refresh_worker.worker, str(tmp_path_factory.mktemp("distrefresh")), NAMES)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_single_process(results, name, mode):
    _dist.check(results, f"{mode}_parity[{name}]")
