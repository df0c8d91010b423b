"""``python -m bench.readme``: write the README's results section from the measured files.

The section between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md
is regenerated from what the benchmarks wrote into ``bench/results/`` (never typed by
hand): for every ``<device>.md`` of ``python -m bench`` its header (device, date,
versions, measured ceilings), the targets with what was measured, and links to the full
tables and plots; then the table of ``python -m bench.convergence`` (``convergence.csv``) if present.
GPU devices come first. ``make bench`` runs it after the benchmark.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _device_section(md: Path, root: Path) -> str:
    text = md.read_text()
    blocks = text.split("\n\n")
    header = blocks[0].strip()
    targets = ""
    m = re.search(r"\*\*Targets\*\*.*", text, flags=re.S)
    if m:
        targets = m.group(0).strip()
    rel = md.relative_to(root).as_posix()
    plots = sorted(md.parent.glob(md.stem + "_*.png"))
    out = [f"### {md.stem}", "", header, ""]
    if targets:
        out += [targets, ""]
    out.append(f"Full tables: [`{rel}`]({rel}); raw rows: [`{rel[:-3]}.csv`]({rel[:-3]}.csv).")
    out.append("")
    for p in plots:
        r = p.relative_to(root).as_posix()
        out.append(f"![{p.stem}]({r})")
    return "\n".join(out).rstrip() + "\n"


def render(results: Path, root: Path) -> str:
    device_mds = [p for p in sorted(results.glob("*.md")) if p.name != "convergence.md"]
    # GPU results first (file names start with the device: cpu-... for CPUs).
    device_mds.sort(key=lambda p: (p.name.startswith("cpu"), p.name))
    parts = []
    if not device_mds:
        parts.append("No benchmark results yet: run `make bench`.\n")
    parts += [_device_section(p, root) for p in device_mds]
    conv = results / "convergence.csv"
    if conv.exists():
        parts.append(_convergence_section(conv, root))
    return "\n".join(parts)


def _convergence_section(csv_path: Path, root: Path) -> str:
    """The demo's table (from its CSV, with ratios to AdamW) and its plot."""
    import csv
    import json

    rows = list(csv.DictReader(csv_path.open()))
    meta = csv_path.with_suffix(".json")
    where = ""
    if meta.exists():
        info = json.loads(meta.read_text())
        parts = [info.get("device", ""), f"torch {info['torch']}" if info.get("torch") else "",
                 f"git {info['git_sha']}" if info.get("git_sha") else "", info.get("data", "")]
        where = "; ".join(str(x) for x in parts if x)
    base = next((r for r in rows if r["method"] == "adamw"), None)
    out = ["### Pre-training demo (`python -m bench.convergence`)", ""]
    if where:
        out += [f"Measured on: {where}.", ""]
    out += ["| method | final val loss | val ppl | vs AdamW loss | state | vs AdamW state | peak | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss, state = float(r["final_val_loss"]), int(float(r["state_bytes"]))
        rel_loss = f"{100 * (loss / float(base['final_val_loss']) - 1):+.1f}%" if base else "-"
        rel_state = f"{state / float(base['state_bytes']):.2f}x" if base else "-"
        out.append(f"| {r['method']} | {loss:.4f} | {float(r['val_ppl']):.3f} | {rel_loss} | "
                   f"{state / 2**20:.2f} MiB | {rel_state} | {float(r['peak_bytes']) / 2**20:.1f} MiB | "
                   f"{float(r['tokens_per_s']):.0f} |")
    png = csv_path.with_suffix(".png")
    if png.exists():
        out += ["", f"![validation loss]({png.relative_to(root).as_posix()})"]
    return "\n".join(out) + "\n"


def update(readme: Path, results: Path, root: Path) -> bool:
    """Rewrite the results section of ``readme``; return whether it changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + render(results, root) + END + tail
    if new != text:
        readme.write_text(new)
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    changed = update(Path(args.readme), Path(args.results), ROOT)
    print(f"{args.readme}: results section {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
