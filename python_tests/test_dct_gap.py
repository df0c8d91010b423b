"""bench.dct_gap: the captured-energy instruments behind docs/dct_gap.md."""
import json

import pytest
import torch

from bench import dct_gap
from lowrank_kernels import ops
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW


def test_dct_rows_are_our_basis_and_orthonormal():
    for size in (7, 32):
        rows = dct_gap.dct_rows(size, "rows")
        assert torch.allclose(rows, ops.dct_basis(size, torch.float64, "cpu"), atol=1e-12)
        for kind in ("rows", "cols"):
            b = dct_gap.dct_rows(size, kind)
            assert torch.allclose(b @ b.T, torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_captured_fraction_bounds():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(40, 24, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 24,
                                                                                          dtype=torch.float64))
    r = 6
    _, _, vh = torch.linalg.svd(G, full_matrices=False)
    assert dct_gap.captured(G, vh[:r], "right") == pytest.approx(dct_gap.svd_energy(G, r))
    assert dct_gap.captured(G.T, vh[:r], "left") == pytest.approx(dct_gap.svd_energy(G, r))
    e = dct_gap.energies(G, [r, 24], g, {(24, k): dct_gap.dct_rows(24, k) for k in ("rows", "cols")})
    for name in ("dct_l1", "dct_l2", "dct_cols_l1", "random"):
        assert 0 < e[r][name] <= e[r]["svd"] + 1e-12
        assert e[24][name] == pytest.approx(1.0)  # the whole basis captures everything


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_projector_rows_read_the_optimizers_projector(cls):
    """The instrument reads the projector the optimizer used: at a refresh GaLore's captures the SVD
    optimum, DCT-AdamW's the top-r DCT rows of the same gradient (L1 scores)."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(20, 30))]
    opt = cls([{"params": ws, "rank": 5, "update_proj_gap": 10}], lr=1e-3)
    for w in ws:
        w.grad = torch.randn_like(w)
    opt.step()
    for w in ws:
        rows, side, idx = dct_gap.projector_rows(opt, w)
        assert side == dct_gap.side_of(w.shape) and rows.shape == (5, 20)
        frac = dct_gap.captured(w.grad, rows, side)
        if cls is GaLoreAdamW:
            assert idx is None and frac == pytest.approx(dct_gap.svd_energy(w.grad, 5), rel=1e-4)
        else:
            best = dct_gap.dct_topk(w.grad, 5, side, norm=1)
            assert sorted(idx.tolist()) == sorted(best.tolist())


def test_width_study_runs(tmp_path):
    assert dct_gap.main(["width", "--widths", "32", "--rank-fracs", "1/4", "--layers", "1", "--seq", "16",
                         "--batch", "2", "--train-steps", "2", "--batches", "1", "--threads", "1",
                         "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "dct_gap_width.json").read_text())
    (row,) = info["rows"]
    assert row["hidden"] == 32 and row["rank"] == 8 and row["n_grads"] == 7
    assert 0 < row["random"] < row["dct_l1"] <= row["svd"] <= 1
    with pytest.raises(SystemExit):
        dct_gap.main(["width", "--rank-fracs", "__import__('os')"])


def test_capture_logs_the_projectors_in_training(tmp_path):
    assert dct_gap.main(["capture", "--preset", "tiny", "--steps", "3", "--threads", "1",
                         "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "dct_gap_capture.json").read_text())
    runs = {r["method"]: r for r in info["runs"]}
    assert set(runs) == {"galore", "dct"}
    for m, run in runs.items():
        assert len(run["per_weight"]) == 7 * 2  # q k v o gate up down, 2 layers
        for e in run["per_weight"].values():
            assert e["steps"] == [1, 2, 3] and e["rank"] == 16
            if m == "galore":  # the refresh takes the SVD of that very gradient
                assert e["used"][0] == pytest.approx(e["svd"][0], abs=1e-3)
            else:  # DCT-AdamW's refresh picks the L1 top-r of that gradient, as the instrument does
                assert e["used"][0] == pytest.approx(e["dct_fresh"][0], abs=1e-4)
                assert [s for s, _ in e["index_sets"]] == [1]  # gap 25: one index set in 3 steps
        (first,) = run["per_refresh"]
        assert first["step"] == 1 and 0 < first["interval_mean"] <= 1
