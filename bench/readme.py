"""``python -m bench.readme``: write the README's results section from the measured files.

The section between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md
is regenerated from what the benchmarks wrote into ``bench/results/`` (never typed by
hand): for every ``<device>.md`` of ``python -m bench`` its header (device, date,
versions, git stamp, measured ceilings), the targets with what was measured, the
optimizer-state table per moment format (from the memory suite's rows in ``<device>.csv``:
every optimizer of ours with ``moment_bits`` 32, 16 and 8, and the reference optimizers),
and links to the full tables and plots; the host-cost tables of ``python -m bench.host_cost --out
bench/results/host_cost-<device>.txt`` (op counts and step times on 28 tiny weights); then the pre-training demo of ``python -m bench.convergence``
from ``convergence.json`` (mean and spread over seeds, against the tuned AdamW and the
frozen-weights control, each method's recipe) and its tuning grids
(``convergence_tuning-<method>.json``); a ``convergence.csv`` without its JSON gives the
bare table. GPU devices come first. ``make bench`` runs it after the benchmark.

Goals measured off their target (a CPU, a quarter size) carry no verdict: result files
written before the harness said so ("would meet" / "would miss") are rewritten to
"not measured on the target", in the README and in the ``<device>.md`` file itself.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
_EXTRAPOLATED = re.compile(r"\bwould (?:meet|miss)\b")


def strip_extrapolated_verdicts(text: str) -> str:
    """Replace the old extrapolated verdicts ("would meet", "would miss") with "not measured on the target"."""
    return _EXTRAPOLATED.sub("not measured on the target", text)


def _device_section(md: Path, root: Path) -> str:
    text = strip_extrapolated_verdicts(md.read_text())
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
    state = _state_table(md.with_suffix(".csv"))
    if state:
        out += [state, ""]
    out.append(f"Full tables: [`{rel}`]({rel}); raw rows: [`{rel[:-3]}.csv`]({rel[:-3]}.csv).")
    out.append("")
    for p in plots:
        r = p.relative_to(root).as_posix()
        out.append(f"![{p.stem}]({r})")
    return "\n".join(out).rstrip() + "\n"


# Provider-name suffix of each non-default moment format (bench/optimizers.py MOMENT_FORMATS).
_FORMAT_SUFFIX = {16: "-16bit", 8: "-8bit"}
# Reference rows of the state table (other packages, and torch), in this order, when measured.
_STATE_REFERENCES = {"torch-adamw-fused": "torch AdamW (fused)",
                     "bitsandbytes-adamw8bit": "bitsandbytes AdamW8bit (8-bit moments of tensors >= 4096 elements)",
                     "galore-torch": "galore-torch GaLoreAdamW",
                     "galore-torch-8bit": "galore-torch GaLoreAdamW8bit",
                     "apollo-torch": "apollo-torch APOLLOAdamW"}


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.3f}"


def _state_table(csv_path: Path) -> str:
    """The memory suite's optimizer-state bytes as one table: a row per optimizer of ours, a column
    per moment format (``moment_bits`` 32, 16, 8), from ``csv_path``; "" when it has no such rows."""
    if not csv_path.exists():
        return ""
    rows = [r for r in csv.DictReader(csv_path.open()) if r["suite"] == "memory" and r["kernel"] == "optimizer_state"]
    measured = {r["provider"]: r for r in rows if r["bytes"]}
    skipped = {r["provider"]: r["note"] for r in rows if not r["bytes"]}
    bases = [p for p in dict.fromkeys(r["provider"] for r in rows)
             if p.startswith("ours-") and any(p + suf in measured or p + suf in skipped for suf in _FORMAT_SUFFIX.values())]
    if not bases:
        return ""
    base_row = measured.get("torch-adamw-fused")
    ref = int(base_row["bytes"]) if base_row else None
    any_row = rows[0]
    # Runs from before 16-bit moments applied to float32 parameters have no 16-bit rows: no such column then.
    with16 = any(b + _FORMAT_SUFFIX[16] in measured for b in bases)
    out = [f"**Optimizer state by moment format** (memory suite: bytes of every tensor in `optimizer.state` after "
           f"two steps on the stack {any_row['shape']}, rank {any_row['rank']}, {any_row['dtype']} parameters; "
           "`moment_bits` 32 = float32 moments, " + ("16 = bfloat16 with stochastic rounding, " if with16 else "")
           + "8 = uint8 codes + float32 absmax per block of 256; MiB, and x torch AdamW's)", "",
           "| optimizer | 32-bit moments | " + ("16-bit | " if with16 else "") + "8-bit | 8-bit / 32-bit |",
           "|---|---:|---:|" + ("---:|" if with16 else "") + "---:|"]

    def cell(p: str) -> str:
        r = measured.get(p)
        if r is None:
            return "skipped" if p in skipped else "-"
        b = int(r["bytes"])
        return _mib(b) + (f" ({b / ref:.3f}x)" if ref else "")

    notes: dict = {}  # reason -> providers
    for b in bases:
        b8 = measured.get(b + _FORMAT_SUFFIX[8])
        b32 = measured.get(b)
        ratio = f"{int(b8['bytes']) / int(b32['bytes']):.3f}" if b8 and b32 else "-"
        c16 = f"{cell(b + _FORMAT_SUFFIX[16])} | " if with16 else ""
        out.append(f"| {b} | {cell(b)} | {c16}{cell(b + _FORMAT_SUFFIX[8])} | {ratio} |")
        for suf in _FORMAT_SUFFIX.values():
            if b + suf in skipped:
                notes.setdefault(skipped[b + suf], []).append(b + suf)
            elif b8 is not None and suf == "-8bit" and "min_8bit_size" in b8["note"]:
                notes.setdefault(b8["note"].split("; ", 1)[-1], []).append(b + suf)
    def moments(p: str) -> str:  # "moments: 14 float32" of the row's note, when there
        m = re.search(r"moments: [^;(]*", measured[p]["note"])
        return f" ({m.group(0).strip()})" if m else ""

    refs = [f"{label}{moments(p)} {cell(p)}" for p, label in _STATE_REFERENCES.items() if p in measured]
    if refs:
        out += ["", "References (same stack, MiB): " + "; ".join(refs) + "."]
    for why, names in notes.items():
        out += ["", f"{', '.join(names)}: {why}".replace("|", "\\|") + "."]
    return "\n".join(out)


def render(results: Path, root: Path) -> str:
    device_mds = [p for p in sorted(results.glob("*.md")) if not p.name.startswith("convergence")]
    # GPU results first (file names start with the device: cpu-... for CPUs).
    device_mds.sort(key=lambda p: (p.name.startswith("cpu"), p.name))
    parts = []
    if not device_mds:
        parts.append("No benchmark results yet: run `make bench`.\n")
    parts += [_device_section(p, root) for p in device_mds]
    parts += [_host_cost_section(p, root) for p in sorted(results.glob("host_cost-*.txt"))]
    conv_json, conv_csv = results / "convergence.json", results / "convergence.csv"
    if conv_json.exists() and "summary" in json.loads(conv_json.read_text()):
        parts.append(_convergence_section(conv_json, root))
    elif conv_csv.exists():
        parts.append(_convergence_csv_section(conv_csv, root))
    ft = results / "convergence_finetune.json"
    if ft.exists():
        parts.append(_finetune_section(ft, root))
    for tf in sorted(results.glob("convergence_tuning-*.json"), key=lambda p: p.stem):
        parts.append(_tuning_section(tf, root))
    return "\n".join(parts)


def _host_cost_section(path: Path, root: Path) -> str:
    """``bench/results/host_cost-<device>.txt`` of ``python -m bench.host_cost --out``: its
    stamp lines (command, git, date, device) and its table with the targets, verbatim."""
    lines = path.read_text().rstrip().splitlines()
    stamps = [ln[1:].strip() for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if not ln.startswith("#")]
    rel = path.relative_to(root).as_posix()
    out = [f"### Host cost of a step ({path.stem[len('host_cost-'):]})", ""]
    if stamps:
        out += ["; ".join(f"`{stamps[0]}`" if i == 0 else x for i, x in enumerate(stamps)) + f" ([`{rel}`]({rel}))", ""]
    out += ["```", *body, "```", ""]
    return "\n".join(out)


def _finetune_section(path: Path, root: Path) -> str:
    """The fine-tuning comparison (``python -m bench.convergence.finetune``): OwLore vs full and GaLore."""
    info = json.loads(path.read_text())
    p = info["preset"]
    rel = path.relative_to(root).as_posix()
    pre = info["pretrain"]
    out = ["### Fine-tuning demo: OwLore (`python -m bench.convergence.finetune`)", "",
           f"From [`{rel}`]({rel}): git {info.get('git', '?')}, {info.get('device', '?')}, "
           f"torch {info.get('torch', '?')}, {info.get('timestamp', '?')}, seed {info.get('seed')}. "
           f"The preset {p['name']} model pre-trained with the AdamW recipe for {pre['steps']} steps "
           f"(validation loss {pre['val_curve'][-1][1]:.4f}), then fine-tuned for {info['finetune_steps']} steps "
           f"on data it never saw ({info['finetune_data']}); every recipe's learning rates x {info['lr_factor']:g} "
           "(not tuned). Fine-tuning loss: the held-out part of the fine-tuning data; validation loss: the "
           "pre-training validation split after fine-tuning.", "",
           "| method | recipe | fine-tuning loss (start -> end) | validation loss | state at end | max state | "
           "peak |", "|---|---|---|---|---|---|---|"]
    for r in info["runs"]:
        out.append(f"| {r['method']} | {_hp(r['recipe'])} | {r['ft_loss_start']:.4f} -> {r['ft_loss']:.4f} | "
                   f"{r['val_loss']:.4f} | {r['state_bytes'] / 2**20:.2f} MiB | {r['max_state_bytes'] / 2**20:.2f} MiB | "
                   f"{r['peak_bytes'] / 2**20:.1f} MiB |" + ("" if r["status"] == "ok" else f" ({r['status']})"))
    ow = next((r for r in info["runs"] if r["method"] == "owlore" and "probs" in r), None)
    if ow:
        out += ["", "OwLore's layer outlier ratios (OWL, M = 13) of the pre-trained model: "
                + ", ".join(f"{x:.3f}%" for x in ow["outlier_ratios"]) + "; sampling probabilities "
                + ", ".join(f"{x:.3f}" for x in ow["probs"]) + ". One seed, a small model: the peak column is "
                "measured on a shared CPU and is coarse."]
    return "\n".join(out) + "\n"


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def _hp(recipe: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in recipe.items())


def _convergence_section(path: Path, root: Path) -> str:
    """The demo's table from its JSON: mean (and spread) over seeds, against AdamW and the control."""
    info = json.loads(path.read_text())
    summ = info["summary"]
    p = info["preset"]
    seeds = info.get("seeds", [])
    requested = info.get("seeds_requested", seeds)
    base = next((s for s in summ.values() if s["role"] == "baseline" and s["status"] == "ok"), None)
    ctrl = next((s for s in summ.values() if s["role"] == "control" and s["status"] == "ok"), None)
    recipes = {}
    for r in info.get("runs", []):
        recipes.setdefault(r["method"], r["recipe"])
    out = ["### Pre-training demo (`python -m bench.convergence`)", ""]
    rel = path.relative_to(root).as_posix()
    val_bytes = info.get("split_sizes", {}).get("val")
    out.append(f"From [`{rel}`]({rel}): git {info.get('git', '?')}, {info.get('device', '?')}, "
               f"torch {info.get('torch', '?')}, {info.get('timestamp', '?')}. Data: {info.get('data', '?')}; "
               "losses on the validation split" + (f" ({val_bytes:,} bytes)" if isinstance(val_bytes, int) else "")
               + ", which no recipe was tuned on.")
    by_git: dict[str, list[str]] = {}
    for m, g in info.get("git_by_method", {}).items():
        by_git.setdefault(g, []).append(m)
    if len(by_git) > 1:
        out.append("Rows by code version (each method's seeds come from one commit; rows added later were run "
                   "alone, the earlier rows were not rerun): "
                   + "; ".join(f"{g}: {', '.join(ms)}" for g, ms in by_git.items())
                   + ". Losses and state bytes compare across them; tokens/s do not (the runs shared the CPU "
                   "with different loads).")
    out.append("")
    out.append(f"Preset {p['name']}: LLaMA hidden {p['hidden']}, MLP {p['intermediate']}, {p['layers']} layers, "
               f"seq {p['seq_len']}, batch {p['batch_size']}, {p['steps']} steps, rank {p['rank']}, gap {p['gap']}; "
               f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))})"
               + (f" of the {len(requested)} requested" if len(requested) != len(seeds) else "")
               + ("; loss = mean over seeds, +- = sample standard deviation" if len(seeds) > 1 else "") + ".")
    out += ["", "| method | recipe | val loss | +- | vs AdamW | vs frozen control | state | vs AdamW state | "
                "peak | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summ.items():
        if not s["finals"]:
            out.append(f"| {m} | | {s['status']} | | | | | | | |")
            continue
        vs_b = _pct(s["mean"], base["mean"]) if base and s is not base else "-"
        vs_c = _pct(s["mean"], ctrl["mean"]) if ctrl and s is not ctrl else "-"
        rel_state = f"{s['state_bytes'] / base['state_bytes']:.2f}x" if base and base["state_bytes"] else "-"
        spread = f"{s['std']:.4f}" if len(s["finals"]) > 1 else "-"
        out.append(f"| {m} | {_hp(recipes.get(m, {}))} | {s['mean']:.4f} | {spread} | {vs_b} | {vs_c} | "
                   f"{s['state_bytes'] / 2**20:.2f} MiB | {rel_state} | {s['peak_bytes'] / 2**20:.1f} MiB | "
                   f"{s['tokens_per_s']:.0f} |" + ("" if s["status"] == "ok" else f" ({s['status']})"))
    vc = info.get("vs_control", {})
    if vc:
        margin = info.get("clear_margin_nats")
        clear = [m for m, v in vc.items() if v["clear"]]
        unclear = [m for m, v in vc.items() if not v["clear"]]
        out += ["", f"Against the frozen-weights control (a margin is clear when the method's worst seed ends at "
                    f"least {margin} nats below the control's best seed): "
                    + (f"clear for {', '.join(clear)}" if clear else "clear for none")
                    + (f"; NOT clear for {', '.join(unclear)}" if unclear else "") + ". Margins (nats): "
                    + ", ".join(f"{m} {v['worst_seed_margin_nats']:+.3f}" for m, v in vc.items()) + "."]
    srcs = [(m, s.get("source", "")) for m, s in summ.items() if s.get("source")]
    if srcs:
        out += ["", "Recipe sources: " + "; ".join(f"{m}: {src}" for m, src in srcs) + "."]
    png = path.with_suffix(".png")
    if png.exists():
        out += ["", f"![validation loss]({png.relative_to(root).as_posix()})"]
    return "\n".join(out) + "\n"


def _tuning_section(path: Path, root: Path) -> str:
    """A tuning grid as a table (rows: the first key, columns: the second), best point in bold."""
    info = json.loads(path.read_text())
    keys = list(info["grid"])
    best = info.get("best") or {}
    bhp = best.get("hparams")
    p = info["preset"]
    rel = path.relative_to(root).as_posix()
    name = path.stem[len("convergence_tuning-"):]
    out = [f"#### Tuning grid: {name} ({p['name']} preset, {p['steps']} steps, seed "
           f"{', '.join(map(str, info.get('seeds', [])))}, loss on the tuning split)", "",
           f"From [`{rel}`]({rel}): git {info.get('git', '?')}, {info.get('device', '?')}, {info.get('timestamp', '?')}."
           + (f" Best: {_hp(bhp)} ({best['tune_loss']:.4f})." if bhp else " No point trained."), ""]
    loss = {tuple(pt["hparams"][k] for k in keys): pt for pt in info["points"]}

    def cell(pt):
        if pt is None:
            return "-"
        v = pt["tune_loss"]
        txt = f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)
        if pt["status"] != "ok":
            txt += f" ({pt['status']})"
        return f"**{txt}**" if bhp and pt["hparams"] == bhp else txt

    if len(keys) == 2:
        a, b = keys
        out += [f"| {a} \\ {b} | " + " | ".join(f"{v:g}" for v in info["grid"][b]) + " |",
                "|---|" + "---|" * len(info["grid"][b])]
        for va in info["grid"][a]:
            out.append(f"| {va:g} | " + " | ".join(cell(loss.get((va, vb))) for vb in info["grid"][b]) + " |")
    else:
        out += ["| " + " | ".join(keys) + " | tuning loss |", "|" + "---|" * (len(keys) + 1)]
        for k, pt in loss.items():
            out.append("| " + " | ".join(f"{v:g}" for v in k) + f" | {cell(pt)} |")
    return "\n".join(out) + "\n"


def _convergence_csv_section(csv_path: Path, root: Path) -> str:
    """The bare demo table from a CSV without its JSON (ratios to AdamW)."""
    rows = list(csv.DictReader(csv_path.open()))
    base = next((r for r in rows if r["method"] == "adamw"), None)
    out = ["### Pre-training demo (`python -m bench.convergence`)", "",
           f"From `{csv_path.relative_to(root).as_posix()}` (no JSON with it: no stamp).", "",
           "| method | final val loss | val ppl | vs AdamW loss | state | vs AdamW state | peak | tokens/s |",
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
    """Rewrite the results section of ``readme`` (and old verdicts in the device .md files); return
    whether the README changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    for md in results.glob("*.md"):
        old = md.read_text()
        new_md = strip_extrapolated_verdicts(old)
        if new_md != old:
            md.write_text(new_md)
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
