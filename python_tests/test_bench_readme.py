"""python -m bench.readme rewrites only the README's results section, from the result files."""
from pathlib import Path

import pytest

from bench import readme


def _results(tmp: Path) -> Path:
    res = tmp / "bench" / "results"
    res.mkdir(parents=True)
    (res / "cpu-X.md").write_text("Device: **X**, torch 1.\n\n**projection**\n\n| a |\n|---|\n\n**Targets** (t)\n\n- [p] goal >= 1x, measured 2x: met\n")
    (res / "H100-80GB.md").write_text("Device: **H100**\n\n**Targets** (t)\n\n- [p] measured 3x\n")
    (res / "cpu-X_projection.png").write_bytes(b"png")
    (res / "convergence.csv").write_text(
        "method,final_val_loss,val_ppl,state_bytes,peak_bytes,tokens_per_s\n"
        "adamw,2.0,7.389,1000,2097152,100\ngalore,2.1,8.166,400,2097152,90\n")
    return res


def test_results_section_is_regenerated(tmp_path):
    res = _results(tmp_path)
    md = tmp_path / "README.md"
    md.write_text(f"# t\n\nintro\n\n{readme.START}\nold stuff\n{readme.END}\n\n## after\n")
    assert readme.update(md, res, tmp_path)
    text = md.read_text()
    assert "old stuff" not in text and text.startswith("# t\n\nintro\n") and text.endswith("## after\n")
    sec = text.split(readme.START)[1].split(readme.END)[0]
    assert sec.index("### H100-80GB") < sec.index("### cpu-X")  # GPU first
    assert "- [p] goal >= 1x, measured 2x: met" in sec
    assert "![cpu-X_projection](bench/results/cpu-X_projection.png)" in sec
    assert "| galore | 2.1000 | 8.166 | +5.0% | 0.00 MiB | 0.40x |" in sec
    assert not readme.update(md, res, tmp_path)  # idempotent


def test_missing_markers_is_an_error(tmp_path):
    md = tmp_path / "README.md"
    md.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        readme.update(md, _results(tmp_path), tmp_path)
