"""python_tests/_dist.py: a rank that dies is reported with its exit status and its stderr.

The workers here start no process group: they only exercise the helper's failure paths
(an abort, as an intermittent SIGABRT on one rank would be, and a Python exception).
"""
import os
import sys
import time

import pytest

from .. import _dist


def _abort_on_rank_1(rank, world, port, outdir):
    ready = os.path.join(outdir, "rank0.ready")
    if rank == 1:
        deadline = time.monotonic() + 120
        while not os.path.exists(ready) and time.monotonic() < deadline:  # rank 0 is in its wait
            time.sleep(0.05)
        os.write(2, b"native message before the abort\n")
        os.abort()
    open(ready, "w").close()
    time.sleep(120)  # stopped by the helper once rank 1 has died


def _raise_on_rank_0(rank, world, port, outdir):
    print(f"rank {rank} python stderr line", file=sys.stderr)
    if rank == 0:
        raise ValueError("rank 0 went wrong")


def _ok(rank, world, port, outdir, value):
    import json

    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"value": [True, value * (rank + 1)]}, f)


def test_results_by_rank(tmp_path):
    results = _dist.run_ranks(_ok, str(tmp_path), 3)
    assert [r["value"][1] for r in results] == [3, 6]
    assert _dist.check(results, "value") == [3, 6]


def test_an_aborted_rank_is_reported_with_its_stderr(tmp_path):
    with pytest.raises(_dist.RanksFailed) as info:
        _dist.run_ranks(_abort_on_rank_1, str(tmp_path))
    msg = str(info.value)
    assert "rank 1: killed by signal SIGABRT" in msg, msg
    assert "native message before the abort" in msg, msg
    assert "Fatal Python error: Aborted" in msg and "_abort_on_rank_1" in msg, msg  # faulthandler's stack
    assert "rank 0: killed by signal SIGTERM (stopped after rank 1 failed" in msg, msg
    assert "_abort_on_rank_1" in msg.split("rank 0 stderr")[1].split("rank 1 stderr")[0], msg  # where rank 0 was


def test_a_raising_rank_is_reported_with_its_traceback(tmp_path):
    with pytest.raises(_dist.RanksFailed) as info:
        _dist.run_ranks(_raise_on_rank_0, str(tmp_path))
    msg = str(info.value)
    assert "rank 0: exit code 1" in msg and "ValueError: rank 0 went wrong" in msg, msg
    assert "rank 0 python stderr line" in msg, msg
    assert "wrote no results" in msg, msg
