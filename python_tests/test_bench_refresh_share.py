"""``python -m bench.bench_refresh_share`` runs (2 gloo processes, tiny shapes) and reports the
SVDs split across the ranks with sharing, all on every rank without."""
import pytest

from bench import bench_refresh_share as b

pytestmark = pytest.mark.slow  # spawns 2 processes


def test_bench_row_counts_the_shared_svds(capsys):
    args = {"layers": 1, "dim": 32, "rank": 4, "repeat": 1}
    n = len(b.shapes(1, 32))
    row = b.run(2, args)
    assert row["world"] == 2
    assert row["replicate"]["svds"] == [n, n]
    assert sum(row["owner"]["svds"]) == n and min(row["owner"]["svds"]) >= 1
    assert row["owner"]["ms"] > 0 and row["replicate"]["ms"] > 0
    b.main(["--worlds", "1", "--layers", "1", "--dim", "32", "--rank", "4", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| world |" in out
