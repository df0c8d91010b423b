"""Tensor parallelism with the low-rank optimizers: 4 gloo processes on the CPU, one spawn.

The model alternates ColwiseParallel and RowwiseParallel Linears (``_tp_worker.PLAN``), so its
weights take both layouts: rows split over every mesh dimension (``(_StridedShard(0), Shard(0))``)
and a block of rows and columns per rank (``(Shard(0), Shard(1))``). One module-scoped spawn of 4
ranks runs every check below (so ``make test`` starts the 4-process setup once):

- parity: ``STEPS`` steps across refreshes (gap 2: steps 1, 3, 5) on a ("dp", "tp") 2x2 mesh with
  ``fully_shard(mesh=mesh["dp"])`` equal one process on the global batch,
  ``||W_dist - W_single|| / ||W_single - W_0|| < 1e-4``, for GaLore (right and left), DCT (right),
  APOLLO and every other optimizer that steps FSDP2 weights, torch AdamW as the control; GaLore
  (left) and APOLLO also with uneven FSDP2 shards (``fsdp_tp_odd``), GaLore (left) under HSDP x TP
  (a (2, 1, 2) mesh), GaLore (right) and APOLLO under tensor parallelism alone (a 1-D mesh of 4);
- communication per optimizer step (the functional collectives DTensor issues, with their sizes):
  between refreshes no all-gather and no all-reduce larger than a low-rank block, and one
  all-reduce of a low-rank block per weight and mesh dimension sharding the contracted dimension,
  on top of the non-finite check's scalars;
- refresh work: the SVDs of a refresh are shared across the ranks, so summed over the 4 ranks
  there is one per weight and refresh;
- state layout: the moments are sharded like the weight on the dimension the projection keeps;
  torch.distributed.checkpoint saves them in shards and a resume across a refresh is exact;
- a ``Partial`` placement, FSDP1's flattened parameters and 8-bit moments on the left side of a
  weight sharded on dim 1 are refused with a clear error when the optimizer is built.
"""
import pytest

from .. import _dist
from . import _tp_worker as W

pytestmark = pytest.mark.slow  # one 4-process spawn (about a minute on 2 cores)

MUST = ["adamw", "galore_right", "galore_left", "dct_right", "apollo"]
# every other optimizer that steps FSDP2 weights, once: Q-GaLore (INT4 projector), FRUGAL, DCT on
# both sides (std), GaLore full, 8-bit moments
MORE = ["galore_full", "galore_right_8bit", "dct_std_l2", "apollo_mini", "frugal_svd", "qgalore_int4"]
PARITY = {"fsdp_tp": MUST + MORE, "fsdp_tp_odd": ["galore_left", "apollo"], "hsdp_tp": ["galore_left"],
          "tp": ["galore_right", "apollo"]}
CHECKPOINT = ["galore_left", "dct_right"]
CASES = [(layout, name) for layout, names in PARITY.items() for name in names]
#: all-reduces of a low-rank block per step: one per weight and mesh dimension that shards the
#: dimension the projection contracts. Right side: the 2 RowwiseParallel weights (columns over
#: tp); left side: the 2 RowwiseParallel weights (rows over dp) and the 2 ColwiseParallel ones
#: (rows over dp and tp: 2 each).
CONTRACTED_SHARDED = {"galore_right": 2, "dct_right": 2, "galore_left": 6}
#: the largest low-rank block (RANK x 32); every local gradient block is larger (6 x 16 at least)
LOWRANK_MAX = W.RANK * 32
#: an all-reduce of at most this many elements is a per-parameter scalar (non-finite check, norms)
SCALARS_MAX = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    names = {"parity": PARITY, "checkpoint": CHECKPOINT, "errors": True}
    return _dist.run_ranks(W.worker, str(tmp_path_factory.mktemp("tp")), names, world=W.WORLD)


@pytest.mark.parametrize("layout,name", CASES)
def test_matches_single_process(results, layout, name):
    _dist.check(results, f"parity_{layout}[{name}]")


def _steady_steps(res, name):
    """``{step: [(kind, elements), ...]}`` of the optimizer steps between refreshes."""
    return {t: calls for t, calls in res[f"comm_fsdp_tp[{name}]"][1].items() if (int(t) - 1) % W.GAP != 0}


@pytest.mark.parametrize("name", ["galore_right", "galore_left", "dct_right", "apollo"])
def test_only_lowrank_sized_communication_between_refreshes(results, name):
    """No all-gather, nothing but all-reduces, none larger than a low-rank block."""
    for r, res in enumerate(results):
        for t, calls in _steady_steps(res, name).items():
            assert calls, (r, t)
            for kind, numel in calls:
                assert kind == "all_reduce" and 0 < numel <= LOWRANK_MAX, (r, t, calls)


@pytest.mark.parametrize("name", sorted(CONTRACTED_SHARDED))
def test_one_lowrank_all_reduce_per_weight(results, name):
    """Per step between refreshes, one all-reduce of a low-rank block per weight and mesh dimension
    sharding its contracted dimension (the others are per-parameter scalars: the non-finite check)."""
    for r, res in enumerate(results):
        for t, calls in _steady_steps(res, name).items():
            blocks = [n for kind, n in calls if n > SCALARS_MAX]
            assert len(blocks) == CONTRACTED_SHARDED[name], (r, t, calls)


def test_state_sharded_like_the_weight(results):
    right = results[0]["state_fsdp_tp[galore_right]"][1]
    left = results[0]["state_fsdp_tp[galore_left]"][1]
    block = "(Shard(dim=0), Shard(dim=1))"
    assert right["1"]["weight"] == block and left["1"]["weight"] == block
    assert right["1"]["exp_avg"] == "(Shard(dim=0), Replicate())", right    # m x r: the weight's rows
    assert left["1"]["exp_avg"] == "(Replicate(), Shard(dim=1))", left      # r x n: the weight's columns
    assert left["1"]["projector"] == "(Shard(dim=0), Replicate())", left    # m x r left projector: rows
    assert right["0"]["exp_avg"] == right["0"]["weight"], right             # rows over dp and tp


@pytest.mark.parametrize("name", CHECKPOINT)
def test_dcp_resume_is_exact(results, name):
    _dist.check(results, f"dcp_resume[{name}]")
    chunks = results[0][f"dcp_chunks[{name}]"][1]
    assert chunks["optim.state.2.weight.exp_avg"] == 2, chunks  # sharded over one mesh dimension of 2
    if name != "galore_left":
        assert chunks["optim.state.0.weight.exp_avg"] == 4, chunks  # rows over both mesh dimensions


@pytest.mark.parametrize("name", ["error_partial", "error_fsdp1_flat", "error_left_8bit_columns"])
def test_refused_with_clear_error(results, name):
    _dist.check(results, name)


#: SVDs per refresh: one per weight (4 weights, refreshes at steps 1, 3 and 5), summed over ranks
SVD_CASES = [("fsdp_tp", n) for n in ("galore_right", "galore_left", "galore_full", "qgalore_int4")] + [
    ("fsdp_tp_odd", "galore_left"), ("hsdp_tp", "galore_left"), ("tp", "galore_right")]


@pytest.mark.parametrize("layout,name", SVD_CASES)
def test_one_svd_per_weight_and_refresh_summed_over_ranks(results, layout, name):
    """Each weight's SVD is computed on one rank (by the size-balanced schedule) and broadcast:
    summed over the ranks, one per weight and refresh, not one per rank."""
    refreshes = len(range(1, W.STEPS + 1, W.GAP))
    per_rank = [res[f"svds_{layout}[{name}]"][1] for res in results]
    assert sum(per_rank) == 4 * refreshes, per_rank
