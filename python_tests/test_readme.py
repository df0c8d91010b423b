"""README.md and docs/*.md: their Python code runs as written, their links resolve, and they
carry no internal work-item references.

A Python block preceded by a line ``<!-- not run: <why> -->`` is not run (it needs torchrun,
a real model or data); every other ``python`` block of a page runs, in order, in one namespace
per page, in a temporary working directory.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = "<!-- not run:"
LINK = re.compile(r"\]\(([^)\s]+)\)")
WORK_ITEMS = re.compile(r"issue [0-9]+|m8spec|part [0-9]", re.I)
# Pages whose code takes long (a Trainer run): marked slow.
SLOW_PAGES = {"hf_trainer.md"}


def python_blocks(path: pathlib.Path):
    """``(line, code, run)`` for every ``python`` block of ``path``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        before = text[:m.start()].rstrip().splitlines()
        run = not (before and before[-1].startswith(NOT_RUN))
        out.append((text[:m.start()].count("\n") + 2, m.group(2), run))
    return out


def run_page(path: pathlib.Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__main__"}
    ran = 0
    for line, code, run in python_blocks(path):
        if run:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), ns)
            ran += 1
    return ran


def test_readme_code_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README)
    assert blocks and all(run for _, _, run in blocks), "every Python block of the README runs"
    assert run_page(README, tmp_path, monkeypatch) == len(blocks)
    out = capsys.readouterr().out
    # The quick start prints its loss and what was projected.
    assert "step 200  loss" in out
    assert "attn.weight  (256, 128)  {'exp_avg': (256, 16), 'projector': (16, 128)}" in out


@pytest.mark.parametrize("page", [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
                                  for p in DOCS if any(run for _, _, run in python_blocks(p))])
def test_docs_code_runs_as_written(page, tmp_path, monkeypatch):
    assert run_page(page, tmp_path, monkeypatch) >= 1


def test_readme_is_a_short_manual():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, len(lines)
    first_screen = "\n".join(lines[:30])
    assert "no GPU has run any kernel" in first_screen  # the status a GPU user needs first
    for heading in ("## Install", "## Quick start", "## Choosing an optimizer", "## Measured results",
                    "## Development", "## License and citations"):
        assert heading in text, heading
    assert "--no-build-isolation" in text and "make test" in text and "make bench" in text


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve(page):
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # links outside code only
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target} (no such file)"


def test_no_internal_work_item_references():
    files = [README, *DOCS, *sorted((ROOT / "bench").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.sh")),
             *sorted((ROOT / "bench" / "results").glob("*.md"))]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in WORK_ITEMS.finditer(f.read_text())]
    assert not found, found


def test_license_and_metadata():
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    setup = (ROOT / "setup.py").read_text()
    assert 'license_expression="BSD-3-Clause"' in setup and '"LICENSE"' in setup
