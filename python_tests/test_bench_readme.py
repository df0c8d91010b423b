"""python -m bench.readme regenerates the results page (docs/results.md) from the result files, and
never writes README.md."""
import json
from pathlib import Path

import pytest

from bench import readme


def _results(tmp: Path) -> Path:
    res = tmp / "bench" / "results"
    res.mkdir(parents=True)
    (res / "cpu-X.md").write_text(
        "Device: **X**, torch 1.\n\n**projection**\n\n| a |\n|---|\n\n**Targets** (t)\n\n"
        "- [p] goal >= 1x, measured 2x: met\n"
        "- [r] goal >= 1000x, measured 20x: would miss (goal stated for H100/H200 at full size)\n"
        "- [s] goal >= 1x, measured 1.1x: would meet (goal stated for H100/H200 at full size)\n")
    (res / "H100-80GB.md").write_text("Device: **H100**\n\n**Targets** (t)\n\n- [p] measured 3x\n")
    (res / "cpu-X_projection.png").write_bytes(b"png")
    (res / "convergence.csv").write_text(
        "method,final_val_loss,val_ppl,state_bytes,peak_bytes,tokens_per_s\n"
        "adamw,2.0,7.389,1000,2097152,100\ngalore,2.1,8.166,400,2097152,90\n")
    return res


def _demo_json(res: Path) -> None:
    def run(m, seed, loss, recipe, state):
        return {"method": m, "seed": seed, "status": "ok", "recipe": recipe, "final_val_loss": loss,
                "state_bytes": state, "peak_bytes": 2 ** 21, "tokens_per_s": 100.0, "seconds": 1.0, "curve": []}

    def summ(role, finals, state, source=""):
        mean = sum(finals) / len(finals)
        std = (sum((x - mean) ** 2 for x in finals) / (len(finals) - 1)) ** 0.5
        return {"role": role, "status": "ok", "seeds": [0, 1], "finals": finals, "mean": mean, "std": std,
                "min": min(finals), "max": max(finals), "state_bytes": state, "peak_bytes": 2 ** 21,
                "tokens_per_s": 100.0, "source": source}

    info = {
        "git": "abc1234-dirty", "device": "CPU X", "torch": "2.x", "timestamp": "T", "data": "D",
        "split_sizes": {"train": 10, "tune": 5, "val": 1234}, "evaluated_split": "val",
        "preset": {"name": "quick", "hidden": 128, "intermediate": 344, "layers": 4, "seq_len": 64,
                   "batch_size": 16, "steps": 240, "rank": 32, "gap": 40},
        "seeds": [0, 1], "seeds_requested": [0, 1, 2],
        "runs": [run("adamw", 0, 2.0, {"lr": 0.002, "other_lr": 0.01}, 1000),
                 run("frozen", 0, 2.5, {"other_lr": 0.01}, 250),
                 run("galore", 0, 1.9, {"lr": 0.01, "other_lr": 0.01, "scale": 0.25}, 400)],
        "summary": {"adamw": summ("baseline", [2.0, 2.2], 1000, "grid"),
                    "frozen": summ("control", [2.5, 2.5], 250),
                    "galore": summ("lowrank", [1.9, 2.1], 400, "GaLore paper")},
        "vs_control": {"galore": {"mean_gap_nats": 0.5, "worst_seed_margin_nats": 0.4, "clear": True}},
        "clear_margin_nats": 0.05,
    }
    (res / "convergence.json").write_text(json.dumps(info))
    grid = {"git": "abc1234", "device": "CPU X", "timestamp": "T0", "method": "adamw", "seeds": [0],
            "preset": {"name": "quick", "steps": 120}, "grid": {"lr": [0.001, 0.002], "other_lr": [0.01, 0.03]},
            "points": [{"hparams": {"lr": a, "other_lr": b}, "tune_loss": loss, "status": "ok"}
                       for (a, b), loss in zip([(0.001, 0.01), (0.001, 0.03), (0.002, 0.01), (0.002, 0.03)],
                                               [2.5, 2.4, 2.3, 2.6])],
            "best": {"hparams": {"lr": 0.002, "other_lr": 0.01}, "tune_loss": 2.3}}
    (res / "convergence_tuning-adamw.json").write_text(json.dumps(grid))


def _page(tmp: Path) -> Path:
    docs = tmp / "docs"
    docs.mkdir(exist_ok=True)
    return docs / "results.md"


def test_results_page_is_regenerated(tmp_path):
    res = _results(tmp_path)
    readme_md = tmp_path / "README.md"
    readme_md.write_text("# t\n\nintro\n")
    page = _page(tmp_path)
    page.write_text("old stuff\n")
    assert readme.update(page, res)
    text = page.read_text()
    assert "old stuff" not in text and text.startswith("# Measured results\n")
    assert readme.GENERATED in text and "[benchmarks.md](benchmarks.md)" in text
    assert "Benchmarks on a GPU: H100-80GB." in text  # a GPU result: no "CPU only" statement
    assert text.index("### H100-80GB") < text.index("### cpu-X")  # GPU first
    assert "- [p] goal >= 1x, measured 2x: met" in text
    # Links are relative to the page's folder.
    assert "![cpu-X_projection](../bench/results/cpu-X_projection.png)" in text
    assert "Full tables: [`cpu-X.md`](../bench/results/cpu-X.md)" in text
    assert "| galore | 2.1000 | 8.166 | +5.0% | 0.00 MiB | 0.40x |" in text  # CSV without JSON: the bare table
    assert not readme.update(page, res)  # idempotent
    assert readme_md.read_text() == "# t\n\nintro\n"  # the README is never written


def test_cpu_only_results_say_so(tmp_path):
    res = _results(tmp_path)
    (res / "H100-80GB.md").unlink()
    page = _page(tmp_path)
    readme.update(page, res)
    assert "measured on a CPU" in page.read_text() and "no GPU has run these benchmarks" in page.read_text()


def test_extrapolated_verdicts_are_removed(tmp_path):
    res = _results(tmp_path)
    page = _page(tmp_path)
    readme.update(page, res)
    for text in (page.read_text(), (res / "cpu-X.md").read_text()):
        assert "would meet" not in text and "would miss" not in text
        assert "measured 20x: not measured on the target (goal stated for H100/H200 at full size)" in text
        assert "measured 1.1x: not measured on the target" in text


def test_demo_section_from_json(tmp_path):
    res = _results(tmp_path)
    _demo_json(res)
    page = _page(tmp_path)
    readme.update(page, res)
    sec = page.read_text()
    assert "git abc1234-dirty" in sec and "(1,234 bytes), which no recipe was tuned on" in sec
    assert "2 seed(s) (0, 1) of the 3 requested" in sec
    # mean, sample std, vs AdamW (mean 2.1), vs the control (mean 2.5)
    assert "| galore | lr 0.01, other_lr 0.01, scale 0.25 | 2.0000 | 0.1414 | -4.8% | -20.0% | 0.00 MiB | 0.40x |" in sec
    assert "| frozen | other_lr 0.01 | 2.5000 | 0.0000 | +19.0% | - |" in sec
    assert "clear for galore" in sec and "galore +0.400" in sec
    assert "#### Tuning grid: adamw (quick preset, 120 steps, seed 0, loss on the tuning split)" in sec
    assert "| 0.002 | **2.3000** | 2.6000 |" in sec and "Best: lr 0.002, other_lr 0.01 (2.3000)" in sec
    assert "| adamw,2.0" not in sec  # the JSON wins over the CSV


def test_check_mode_writes_nothing(tmp_path, capsys):
    res = _results(tmp_path)
    page = _page(tmp_path)
    assert readme.update(page, res, check=True) and not page.exists()
    assert "would miss" in (res / "cpu-X.md").read_text()  # --check rewrites no result file either
    assert readme.main(["--page", str(page), "--results", str(res), "--check"]) == 1
    assert readme.main(["--page", str(page), "--results", str(res)]) == 0 and page.exists()
    assert readme.main(["--page", str(page), "--results", str(res), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_committed_results_page_is_current():
    """docs/results.md is what bench/results/ gives (rerun ``python -m bench.readme`` after a change)."""
    assert not readme.update(readme.DEFAULT_PAGE, readme.DEFAULT_RESULTS, check=True), \
        "docs/results.md is out of date: run python -m bench.readme"


def test_state_table_per_moment_format(tmp_path):
    """The results page's optimizer-state table: one row per optimizer of ours, one column per moment format,
    read from the memory suite's rows of ``<device>.csv`` (bytes, ratio to torch AdamW, skip reasons)."""
    import csv

    from bench.harness import ROW_FIELDS

    res = _results(tmp_path)

    def row(provider, nbytes, note=""):
        d = {k: "" for k in ROW_FIELDS}
        d.update(suite="memory", kernel="optimizer_state", provider=provider, shape="1L-h8-i16", rank="2",
                 dtype="fp32", bytes=str(nbytes) if nbytes else "", note=note)
        return d

    mib = 2 ** 20
    rows = [row("torch-adamw-fused", 8 * mib, "params 1 MiB; moments: 14 float32"), row("bitsandbytes-adamw8bit", 2 * mib),
            row("ours-GaLoreAdamW", 4 * mib), row("ours-GaLoreAdamW-16bit", 3 * mib),
            row("ours-GaLoreAdamW-8bit", mib, "params 1 MiB; moments: 14 uint8"),
            row("ours-APOLLO-Mini", mib // 4), row("ours-APOLLO-Mini-16bit", 0, "skipped: Unavailable: why"),
            row("ours-APOLLO-Mini-8bit", mib // 4, "params 1 MiB; moments: 14 float32 (every moment has fewer than "
                                                   "min_8bit_size=4096 elements: kept float32)"),
            row("ours-GaLoreAdafactor", mib // 8)]
    with open(res / "cpu-X.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        w.writerows(rows)
    table = readme._state_table(res / "cpu-X.csv")
    assert "stack 1L-h8-i16, rank 2, fp32 parameters" in table
    assert "| ours-GaLoreAdamW | 4.000 (0.500x) | 3.000 (0.375x) | 1.000 (0.125x) | 0.250 |" in table
    assert "| ours-APOLLO-Mini | 0.250 (0.031x) | skipped | 0.250 (0.031x) | 1.000 |" in table
    assert "ours-GaLoreAdafactor |" not in table  # no moment formats measured: not a row
    assert "ours-APOLLO-Mini-16bit: skipped: Unavailable: why." in table
    assert "ours-APOLLO-Mini-8bit: moments: 14 float32 (every moment has fewer than min_8bit_size" in table
    assert "torch AdamW (fused) (moments: 14 float32) 8.000 (1.000x)" in table and "AdamW8bit" in table
    page = _page(tmp_path)
    readme.update(page, res)
    sec = page.read_text()
    assert table in sec and sec.index("### cpu-X") < sec.index("Optimizer state by moment format")
    assert readme._state_table(tmp_path / "none.csv") == ""
