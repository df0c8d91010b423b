"""DDP and FSDP2 (DTensor) training with the low-rank optimizers: 2 gloo processes on the CPU.

One ``torch.multiprocessing`` spawn per module (``_worker.worker``) runs every check;
the tests below read its per-rank results. Checks, for GaLore (exact, randomized SVD,
``full``), DCT (right with moment re-indexing, std with L2 scores), APOLLO (+Mini),
FRUGAL (svd, random+sgd, columns, dct) and Q-GaLore (INT4 projector, float weights):

- parity: ``STEPS`` steps across a refresh (gap 2) under DDP and under FSDP2 (every Linear
  ``fully_shard``-ed, rows split 9/8, 5/5, 2/1 and 1/0) equal single-process training on
  the same global batch: ``||W_dist - W_single|| / ||W_single - W_0|| < _worker.TOL``
  (1e-4; measured 1e-7..3e-5, the spread of summing the gradient in another order);
- communication, counted by DTensor's CommDebugMode: no all-gather in the steady state;
  at a refresh one gradient all-gather per projected weight for SVD projections, none for
  APOLLO, random, column and DCT projections, plus the exchange of the shared SVD refreshes;
- torch.distributed.checkpoint: 2 steps, save, 2 steps (across a refresh) == load into a
  fresh model/optimizer + 2 steps, exactly; the projected moments are saved sharded;
- a NaN in one rank's shard makes every rank skip that parameter; a ``Partial`` placement
  is refused with a clear error (tensor parallelism: test_tensor_parallel.py); Q-GaLore on INT8 QLinear weights under DDP
  and ``layerwise`` GaLore under FSDP2 equal single-process training.
"""
import pytest

from .. import _dist
from . import _worker

PARITY = [
    "galore", "galore_right_lowrank", "galore_full", "apollo", "apollo_mini",
    "frugal_svd", "frugal_random_sgd", "frugal_columns", "dct_right", "dct_std_l2", "frugal_dct", "qgalore_int4",
]
CHECKPOINT = ["galore", "apollo", "frugal_svd", "dct_std_l2", "qgalore_int4"]
EXTRA = ["nonfinite_skip", "placement_error", "qlinear_ddp", "layerwise_fsdp"]
SVD_BASED = {"galore", "galore_right_lowrank", "galore_full", "frugal_svd", "qgalore_int4"}
N_PROJECTED = 4  # weights in the low-rank groups of _worker._groups
# All-reduces per steady-state step: one for the non-finite check, plus one r x n sum per
# left-side weight (std puts 10x17, 3x10 and 1x3 on the left); the right side is shard-local.
# The exchange of a shared refresh: all_gather_object (two all-gathers) + one broadcast per owning rank.
SHARE_EXCHANGE = 2 + 2
STEADY_ALL_REDUCES = {"galore": 1 + 3, "dct_right": 1, "galore_right_lowrank": 1}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = {"parity": PARITY, "checkpoint": CHECKPOINT, "extra": EXTRA}
    return _dist.run_ranks(_worker.worker, str(tmp_path_factory.mktemp("dist")), names)


def _dct_landed(results):
    return "dct_right" in results[0]["configs"][1]


@pytest.mark.parametrize("name", PARITY)
def test_ddp_matches_single_process(results, name):
    if name.startswith("dct") or name == "frugal_dct":
        assert _dct_landed(results)
    _dist.check(results, f"ddp_parity[{name}]")


@pytest.mark.parametrize("name", PARITY)
def test_fsdp2_matches_single_process(results, name):
    _dist.check(results, f"fsdp_parity[{name}]")


@pytest.mark.parametrize("name", PARITY)
def test_fsdp2_communication(results, name):
    for r, res in enumerate(results):
        per_step = res[f"fsdp_comm[{name}]"][1]
        for t, counts in per_step.items():
            refresh = (int(t) - 1) % _worker.GAP == 0
            want = N_PROJECTED if (refresh and name in SVD_BASED) else 0
            assert counts["all_gather"] == want, (r, t, counts)
            # c10d collectives of the shared refreshes (optim/refresh_share.py): at the first step one
            # all-gather of a signature over the default group; at an SVD refresh the exchange.
            other = (1 if int(t) == 1 else 0) + (SHARE_EXCHANGE if (refresh and name in SVD_BASED) else 0)
            assert counts["other"] == other, (r, t, counts)
            if not refresh and name in STEADY_ALL_REDUCES:
                assert counts["all_reduce"] == STEADY_ALL_REDUCES[name], (r, t, counts)


@pytest.mark.parametrize("name", CHECKPOINT)
def test_dcp_resume_is_exact(results, name):
    _dist.check(results, f"dcp_resume[{name}]")


@pytest.mark.parametrize("name", CHECKPOINT)
def test_dcp_saves_moments_sharded(results, name):
    _dist.check(results, f"dcp_sharded[{name}]")
    keys = results[0][f"dcp_sharded[{name}]"][1]["sharded_keys"]
    # W1 (17 x 12, right side): its moments are row-aligned and saved one chunk per rank.
    assert "optim.state.0.weight.exp_avg" in keys and "optim.state.0.weight.exp_avg_sq" in keys, keys
    if name in ("galore", "frugal_svd"):  # W2 (10 x 17, left side): the dense projector is row-aligned
        assert "optim.state.2.weight.projector" in keys, keys


@pytest.mark.parametrize("name", EXTRA)
def test_extra(results, name):
    _dist.check(results, name)
