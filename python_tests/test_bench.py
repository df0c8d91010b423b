"""Smoke test of ``python -m bench``: every suite runs in-process on tiny shapes and writes a sane CSV.

It checks the plumbing (suites, timing, CSV schema, ratios, skips, plots, table), not
speed: speed goals live in the benchmark's printed targets, never in tests.
"""
import csv
import math

import pytest
import torch

from bench import __main__ as bench_main
from bench import stamps
from bench.harness import ROW_FIELDS, Ctx, Row, Target, format_table, lowrank_shape, summarize
from lowrank_kernels.optim import state_nbytes


def _run(tmp_path, capsys, *extra):
    rc = bench_main.main(["--tiny", "--quick", "--out", str(tmp_path), *extra])
    out = capsys.readouterr().out
    csvs = sorted(tmp_path.glob("*.csv"))
    assert len(csvs) == 1, f"expected one CSV in {tmp_path}, got {csvs}"
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    return rc, out, header, rows, csvs[0]


def _f(x):
    return float(x) if x not in ("", None) else None


def test_bench_tiny_cpu_all_suites(tmp_path, capsys):
    git = stamps.git_describe()  # the tree's state when the run starts (what its stamp must say)
    rc, out, header, rows, path = _run(tmp_path, capsys, "--device", "cpu")
    assert rc == 0, out[-3000:]
    assert header == ROW_FIELDS
    assert {r["git_sha"] for r in rows} == {git}  # one stamp helper, "-dirty" included
    assert all(r["device_name"].startswith(stamps.cpu_model()) for r in rows)
    assert path.name.endswith("-tiny.csv") and path.name.startswith("cpu-")
    suites = {r["suite"] for r in rows}
    assert {"roofline", "projection", "refresh", "step", "memory", "quant"} <= suites
    assert not [r for r in rows if "crashed" in r["note"]], [r["note"] for r in rows if "crashed" in r["note"]]
    assert not [r for r in rows if "FAILED" in r["check"]]

    timed = [r for r in rows if r["median_ms"]]
    assert len(timed) >= 20
    for r in timed:
        med, p20, p80 = _f(r["median_ms"]), _f(r["p20_ms"]), _f(r["p80_ms"])
        assert med > 0 and math.isfinite(med), r
        assert p20 <= med * (1 + 1e-6) and med <= p80 * (1 + 1e-6), r
        assert r["device"] == "cpu" and r["dtype"] and r["torch"] == torch.__version__ and r["mode"] == "tiny"
        if r["kernel"] != "step_gap200":  # derived rows are computed from two measured ones
            assert int(r["reps"]) >= 1, r
    for r in rows:  # a skip has a reason and no number
        if r["note"].startswith("skipped:"):
            assert not r["median_ms"] and not r["bytes"], r

    # The roofline was measured, and the rows with a FLOP count got a fraction of it.
    mm = [r for r in rows if r["suite"] == "roofline" and r["kernel"] == "matmul"]
    assert mm and _f(mm[0]["tflops"]) > 0
    proj = [r for r in timed if r["suite"] == "projection"]
    assert {"torch-unfused", "torch-2gemm"} <= {r["provider"] for r in proj}
    # Ours is timed, or listed with the reason it could not be (e.g. a backend not built).
    assert any(r["provider"].startswith("ours-") for r in rows if r["suite"] == "projection")
    for r in proj:
        assert _f(r["tflops"]) > 0 and _f(r["frac_matmul"]) > 0 and _f(r["gbps"]) > 0, r
        if r["provider"] == "torch-unfused":
            assert _f(r["speedup"]) == pytest.approx(1.0)
        if r["provider"].startswith("ours-") and r["provider"] != "ours-reference" and r["kernel"] == "step":
            assert r["check"].startswith("rel_err="), r  # verified against the reference before timing

    # The baselines of every suite are there, and ratios were computed against them.
    ref = {r["provider"] for r in timed if r["suite"] == "refresh"}
    assert {"svd-exact", "svd-lowrank", "dct-unfused"} <= ref
    assert all(_f(r["speedup"]) > 0 for r in timed if r["suite"] == "refresh" and r["kernel"] == "refresh")
    step = {r["provider"]: r for r in timed if r["suite"] == "step" and r["kernel"] == "step"}
    assert {"torch-adamw-fused", "torch-adamw-foreach"} <= set(step)
    mem = [r for r in rows if r["suite"] == "memory" and r["kernel"] == "optimizer_state" and r["bytes"]]
    assert {"torch-adamw-fused", "torch-adamw-foreach"} <= {r["provider"] for r in mem}
    for r in mem:
        assert int(r["bytes"]) > 0 and _f(r["mem_ratio"]) > 0, r
    adamw = next(r for r in mem if r["provider"] == "torch-adamw-fused")
    nparams = sum(m * n for m, n in Ctx(torch.device("cpu"), torch.float32, quick=True, tiny=True,
                                        out=tmp_path).sizes.stack.shapes())
    assert int(adamw["bytes"]) >= 2 * 4 * nparams  # two fp32 moments per element
    assert [r for r in rows if r["suite"] == "quant" and r["kernel"] == "projector_bytes" and r["bytes"]]

    # Plots, and the short summary printed last (the wide table only with --table).
    assert sorted(p.name.split("_", 1)[1] for p in tmp_path.glob("*.png")) == \
        ["memory.png", "projection.png", "refresh.png", "step.png"]
    summary = out[out.index("== summary: "):]
    assert "== targets" in summary and f"full tables: {path.with_suffix('.md')}" in summary
    assert f"raw rows:    {path}" in summary and "plots:       " in summary
    assert "== projection ==" not in out and "| kernel | provider |" not in out
    assert len(summary.splitlines()) < 48  # one screen: a line per target, and three optimizers joined the targets
    assert "would meet" not in out and "would miss" not in out
    md = path.with_suffix(".md").read_text()  # the same run as Markdown tables, shown by docs/results.md
    assert "**projection**" in md and "| kernel | provider |" in md and "**Targets**" in md
    assert "CPU load average (1 min): " in md.split("\n\n")[0]  # in the header the results page shows
    assert out.rstrip().splitlines()[-1].startswith("total ")


def test_bench_memory_suite_alone(tmp_path, capsys):
    """Without the step suite before it, the memory suite steps the optimizers itself."""
    rc, out, header, rows, _ = _run(tmp_path, capsys, "--device", "cpu", "--suite", "memory", "--no-plots",
                                    "--table")
    assert rc == 0, out[-3000:]
    mem = {r["provider"]: int(r["bytes"]) for r in rows if r["suite"] == "memory" and r["bytes"]}
    assert mem["torch-adamw-fused"] == mem["torch-adamw-foreach"] > 0
    assert not list(tmp_path.glob("*.png"))
    assert "== memory ==" in out and out.index("== memory ==") < out.index("== summary: ")  # --table: every row


def _git(*args):
    import subprocess

    return subprocess.run(["git", *args], cwd=bench_main.BENCH_DIR.parent, capture_output=True, text=True)


def test_default_output_folder_is_untracked():
    """By default a run writes to bench/out/, which git ignores; the committed results
    (bench/results/, docs/results.md) are written only with --update-results."""
    args = bench_main.parse_args([])
    assert args.out == str(bench_main.DEFAULT_OUT) and bench_main.DEFAULT_OUT.name == "out"
    assert bench_main.parse_args(["--update-results"]).out == str(bench_main.RESULTS_DIR)
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--update-results", "--out", "x"])
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    assert _git("check-ignore", "-q", "bench/out/cpu-X.csv").returncode == 0, "bench/out/ must be git-ignored"
    assert _git("check-ignore", "-q", "bench/results/cpu-X.csv").returncode == 1


def test_default_run_leaves_the_checkout_clean(capsys):
    """A run with the default output (a tiny memory suite) changes nothing git tracks and writes no README."""
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    before = _git("status", "--porcelain", "--untracked-files=all").stdout
    readme = bench_main.BENCH_DIR.parent / "README.md"
    readme_mtime = readme.stat().st_mtime_ns if readme.exists() else None
    existing = set(bench_main.DEFAULT_OUT.glob("*")) if bench_main.DEFAULT_OUT.exists() else set()
    try:
        rc = bench_main.main(["--tiny", "--quick", "--device", "cpu", "--suite", "memory", "--no-plots"])
        out = capsys.readouterr().out
        assert rc == 0, out[-3000:]
        assert f"full tables: {bench_main.DEFAULT_OUT.relative_to(bench_main.BENCH_DIR.parent)}" in out or \
            f"full tables: {bench_main.DEFAULT_OUT}" in out
        assert _git("status", "--porcelain", "--untracked-files=all").stdout == before
        assert (readme.stat().st_mtime_ns if readme.exists() else None) == readme_mtime
    finally:
        for f in set(bench_main.DEFAULT_OUT.glob("*")) - existing:  # only what this run wrote
            f.unlink()


def test_time_budget_turns_measurements_into_skips(tmp_path):
    ctx = Ctx(torch.device("cpu"), torch.float32, quick=True, tiny=True, out=tmp_path, time_budget_s=0.0)
    assert ctx.measure("s", "k", "p", lambda: None, shape="1x1") is None
    (row,) = ctx.rows
    assert row.skipped and "time budget" in row.note and row.median_ms is None
    ctx.write_csv()
    with open(ctx.csv_path(), newline="") as f:
        (d,) = list(csv.DictReader(f))
    assert d["note"].startswith("skipped:") and d["median_ms"] == ""


def test_bench_rejects_unknown_suite(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--suite", "projection,nope"])
    assert "nope" in capsys.readouterr().err


def test_summarize_quantiles_and_targets(tmp_path):
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.0, 1.8, 4.2, 5)
    assert Target("s", "x", 1.6, 1.5).verdict() == "met"
    assert Target("s", "x", 1.2, 1.5).verdict() == "MISSED"
    assert Target("s", "x", 3.0, 2.0, higher_is_better=False).verdict() == "MISSED"
    assert Target("s", "x", None, 2.0).verdict() == "not measured"
    # Off the target (a CPU, a smaller size): the number is printed, no verdict is extrapolated.
    for m in (3.0, 1.0):
        assert Target("s", "x", m, 2.0, applies=False).verdict() == \
            "not measured on the target (goal stated for H100/H200 at full size)"
    assert Target("s", "x", 1.0, 2.0, applies=False, stated_for="the C++ backend").verdict() == \
        "not measured on the target (goal stated for the C++ backend)"
    ctx = Ctx(torch.device("cpu"), torch.float32, quick=True, tiny=True, out=tmp_path)
    ctx.add(Row("s", "k", "base", shape="4x4", rank=2, median_ms=2.0, p20_ms=1.0, p80_ms=3.0))
    ctx.add(Row("s", "k", "fast", shape="4x4", rank=2, median_ms=0.5, p20_ms=0.4, p80_ms=0.6))
    ctx.add(Row("s", "k", "fast", shape="8x8", rank=2, median_ms=0.5, p20_ms=0.4, p80_ms=0.6))  # no baseline here
    ctx.skip("s", "k", "missing", "not available yet", shape="4x4", rank=2)
    ctx.set_baseline("s", "base")
    assert ctx.rows[1].speedup == pytest.approx(4.0) and ctx.rows[2].speedup is None
    assert ctx.ratio("s", "k", "fast", "base", "4x4", 2) == pytest.approx(4.0)
    assert ctx.ratio("s", "k", "missing", "base", "4x4", 2) is None
    table = format_table(ctx, ["s"])
    assert "skipped: not available yet" in table and "4.00x" in table


# Rows of ours that verify their result against the reference before they are timed.
CHECKED_KERNELS = {("projection", "project_adam"), ("projection", "backproject_apply"), ("projection", "step"),
                   ("quant", "step"), ("refresh", "refresh")}


def ours_row_problems(rows) -> list:
    """What is wrong with the ``ours`` rows of a bench CSV: skipped, crashed or failed rows, and
    rows of a checked kernel (CHECKED_KERNELS; not the reference backend, not the dense baseline
    of the quant suite) whose correctness check is missing or failed."""
    problems = []
    for r in rows:
        if not r["provider"].startswith("ours"):
            continue
        what = (r["suite"], r["kernel"], r["provider"], r["shape"])
        note, check = r["note"], r["check"]
        if note.startswith("skipped:") or "crashed" in note or "failed" in note.lower():
            problems.append((*what, "skipped/errored: " + note))
            continue
        if "FAILED" in check or "failed" in check:
            problems.append((*what, "check failed: " + check))
            continue
        dense_baseline = r["suite"] == "quant" and r["kernel"] == "step" and "int4" not in r["provider"]
        if (r["suite"], r["kernel"]) in CHECKED_KERNELS and r["provider"] != "ours-reference" and not dense_baseline:
            if not check:
                problems.append((*what, "no correctness check"))
    return problems


def test_ours_row_problems_finds_each_kind():
    base = dict(suite="projection", kernel="step", provider="ours-triton", shape="4x4", note="", check="rel_err=1e-7")
    assert ours_row_problems([base, dict(base, provider="torch-unfused", check="")]) == []
    assert ours_row_problems([dict(base, note="skipped: no kernel")])[0][-1].startswith("skipped/errored")
    assert ours_row_problems([dict(base, note="crashed: ValueError")])[0][-1].startswith("skipped/errored")
    assert ours_row_problems([dict(base, check="rel_err=0.3 FAILED")])[0][-1].startswith("check failed")
    assert ours_row_problems([dict(base, check="")])[0][-1] == "no correctness check"
    assert ours_row_problems([dict(base, suite="quant", provider="ours-bf16", check="")]) == []
    assert ours_row_problems([dict(base, suite="quant", provider="ours-int4 (triton)", check="")])


def test_bench_tiny_cpu_ours_rows_complete(tmp_path, capsys):
    """The same rule as the GPU test, on the CPU run: every ours row ran and carries its check."""
    rc, out, header, rows, _ = _run(tmp_path, capsys, "--device", "cpu", "--no-plots", "--suite",
                                    "projection,quant,refresh")
    assert rc == 0, out[-3000:]
    assert ours_row_problems(rows) == []


@pytest.mark.gpu
def test_bench_tiny_cuda_checks_pass(tmp_path, capsys):
    """On a GPU: every row of ours ran (none skipped or errored), and every timed kernel of ours
    that has a correctness check carries it and passed it (the bench's own checks against the
    reference)."""
    rc, out, header, rows, _ = _run(tmp_path, capsys, "--device", "cuda", "--no-plots")
    assert header == ROW_FIELDS
    assert not [r for r in rows if "FAILED" in r["check"]], [(r["kernel"], r["provider"], r["check"]) for r in rows]
    assert ours_row_problems(rows) == []
    assert rc == 0, out[-3000:]
    assert {r["device"] for r in rows} == {"cuda"}
    checked = [r for r in rows if r["provider"].startswith("ours-triton") and (r["suite"], r["kernel"]) in CHECKED_KERNELS]
    assert checked, "no Triton row of ours was checked on the GPU"


def test_owlore_provider_trains_gamma_layers_and_drops_the_rest():
    """The bench's GaLore+OwLore provider on a 4-layer stack: its own parameter copies (the
    shared list is untouched), half of the layers train per step, frozen layers keep no state."""
    from bench import optimizers as O
    from bench.harness.sizes import Stack

    gen = torch.Generator().manual_seed(0)
    shared = []
    for m, n in Stack(hidden=32, inter=48, layers=4).shapes():
        p = torch.nn.Parameter(torch.randn(m, n, generator=gen))
        p.grad = torch.randn(m, n, generator=gen)
        shared.append(p)
    before = [(p.detach().clone(), p.grad.clone()) for p in shared]
    opt = O.OPTIMIZERS["ours-GaLore+OwLore"][0](shared, 4, 200)
    galore = O.OPTIMIZERS["ours-GaLoreAdamW"][0]([torch.nn.Parameter(p.detach().clone()) for p in shared], 4, 200)
    for q, p in zip(galore.param_groups[0]["params"], shared):
        q.grad = p.grad.clone()
    for _ in range(3):
        start = [[q.detach().clone() for q in layer.parameters()] for layer in opt.layers]
        opt.step()
        galore.step()
        active = set(opt.sampler.active)
        assert len(active) == 2
        for l, layer in enumerate(opt.layers):
            moved = [not torch.equal(q, s) for q, s in zip(layer.parameters(), start[l])]
            assert all(moved) if l in active else not any(moved), (l, active)
            assert all(bool(opt.state.get(q)) == (l in active) for q in layer.parameters())
    assert 0 < state_nbytes(opt) < state_nbytes(galore)
    for p, (w, g) in zip(shared, before):  # the suites' shared parameters and gradients are untouched
        assert p.requires_grad and torch.equal(p, w) and torch.equal(p.grad, g)


# --------------------------------------------------------------------------- moment formats

MOMENT_BASES = ("ours-AdamW", "ours-GaLoreAdamW", "ours-DCTAdamW", "ours-QGaLoreAdamW", "ours-APOLLOAdamW",
                "ours-APOLLO-Mini", "ours-FrugalAdamW", "ours-GradNormLoRPAdamW", "ours-GaLoreAdafactor-beta1")


def test_registry_has_every_moment_format():
    from bench import optimizers as O

    for base in MOMENT_BASES:
        for bits, suffix in ((32, ""), (16, "-16bit"), (8, "-8bit")):
            assert base + suffix in O.OPTIMIZERS, base + suffix
            assert O.MOMENT_VARIANTS[base + suffix] == (base, bits)
            assert O.OPTIMIZERS[base + suffix][1] == O.OPTIMIZERS[base][1]
    step, memory = O.names_for("step"), O.names_for("memory")
    assert not [n for n in step if n.endswith("-16bit")]
    assert {b + "-8bit" for b in MOMENT_BASES} <= set(step)
    assert set(memory) == set(O.OPTIMIZERS)
    assert O.moment_bits_of("torch-adamw-fused") == 32 and O.moment_bits_of("ours-DCTAdamW-8bit") == 8


class _FakeOpt:
    def __init__(self, *moments):
        self.state = {i: {"exp_avg": t, "exp_avg_sq": t.clone(), "step": torch.tensor(1.0)}
                      for i, t in enumerate(moments)}


def test_check_format_refuses_a_row_whose_state_is_not_in_its_format():
    from bench import optimizers as O

    f32 = torch.zeros(64, 64)
    u8 = torch.zeros(64, 64, dtype=torch.uint8)
    bf = torch.zeros(64, 64, dtype=torch.bfloat16)
    small = torch.zeros(8, 8)
    assert O.check_format("ours-GaLoreAdamW", _FakeOpt(f32)) == "moments: 2 float32"
    assert O.check_format("ours-GaLoreAdamW-8bit", _FakeOpt(u8, small)) == "moments: 2 uint8, 2 float32"
    assert O.check_format("ours-GaLoreAdamW-16bit", _FakeOpt(bf)) == "moments: 2 bfloat16"
    with pytest.raises(O.Unavailable, match="moment_bits=8 left 2 moment"):
        O.check_format("ours-GaLoreAdamW-8bit", _FakeOpt(f32, u8))
    with pytest.raises(O.Unavailable, match="moment_bits=16"):
        O.check_format("ours-GaLoreAdamW-16bit", _FakeOpt(small))
    with pytest.raises(O.Unavailable, match="no exp_avg"):
        O.check_format("ours-GaLoreAdamW-8bit", _FakeOpt())
    # Moments all below min_8bit_size stay float32 by design: measured, and the note says why.
    assert "kept float32" in O.check_format("ours-APOLLO-Mini-8bit", _FakeOpt(small))
    with pytest.raises(O.Unavailable):
        O.check_format("ours-APOLLO-Mini-8bit", _FakeOpt(small), min_8bit_size=1)


def _tiny_stack(seed=0):
    from bench.harness.sizes import Stack

    gen = torch.Generator().manual_seed(seed)
    params = []
    for m, n in Stack(hidden=32, inter=48, layers=1).shapes():
        p = torch.nn.Parameter(torch.randn(m, n, generator=gen))
        p.grad = torch.randn(m, n, generator=gen)
        params.append(p)
    return params


@pytest.mark.parametrize("base", ["ours-AdamW", "ours-GaLoreAdamW", "ours-DCTAdamW"])
def test_8bit_state_bytes_match_the_format(base):
    """What the memory suite counts for a -8bit row: float32 moments (8 bytes per element for the
    pair) become uint8 codes (2) plus a float32 absmax per block of <= 256 inside a row for each."""
    from bench import optimizers as O

    rank = 4
    opts = {}
    for name in (base, base + "-8bit"):
        keys = dict(O.TINY_KEYS) if name.endswith("-8bit") else {}
        opt = O.OPTIMIZERS[name][0](_tiny_stack(), rank, 10 ** 9, **keys)
        for _ in range(2):
            opt.step()
        opts[name] = opt
    q = opts[base + "-8bit"]
    expect = 0
    for p, st in q.state.items():
        m, n = p.shape
        shape = (m, n) if base == "ours-AdamW" else lowrank_shape(m, n, rank)
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.uint8
        assert tuple(st["exp_avg"].shape) == shape and tuple(st["exp_avg_sq"].shape) == shape
        rows, cols = shape
        expect += 6 * rows * cols - 2 * 4 * rows * math.ceil(cols / 256)
    assert state_nbytes(opts[base]) - state_nbytes(q) == expect
    assert O.check_format(base + "-8bit", q, O.TINY_KEYS["min_8bit_size"]).startswith("moments: 14 uint8")


def test_bench_memory_suite_every_moment_format(tmp_path, capsys):
    """The tiny memory suite on bfloat16 parameters measures every optimizer of ours with 32-, 16- and
    8-bit moments: the 16- and 8-bit rows hold bfloat16 / uint8 moments (their notes say so) and fewer
    bytes; the files carry the dtype in their name (not the CPU's default fp32)."""
    from bench import optimizers as O

    rc, out, header, rows, path = _run(tmp_path, capsys, "--device", "cpu", "--dtype", "bf16", "--suite", "memory",
                                       "--no-plots")
    assert rc == 0, out[-3000:]
    assert path.name.endswith("-bf16-tiny.csv")
    mem = {r["provider"]: r for r in rows if r["suite"] == "memory" and r["kernel"] == "optimizer_state"}
    for base in MOMENT_BASES:
        b32 = mem[base]
        assert b32["bytes"] and "skipped" not in b32["note"], b32
        for suffix, dtype in (("-16bit", "bfloat16"), ("-8bit", "uint8")):
            r = mem[base + suffix]
            assert r["bytes"], (base + suffix, r["note"])
            assert f" {dtype}" in r["note"], r["note"]
            # APOLLO-Mini's rank-1 moments (tiny run: min_8bit_size 1) have one block per element
            # row, whose 4-byte absmax outweighs the 3 bytes the codes save.
            if base != "ours-APOLLO-Mini" or suffix == "-16bit":
                assert int(r["bytes"]) < int(b32["bytes"]), (base + suffix, r["bytes"], b32["bytes"])
        # (8- vs 16-bit: equal at these sizes, where a row of 4 moments carries a 4-byte absmax.)
    assert O.names_for("memory") == list(mem)
    md = path.with_suffix(".md").read_text()
    assert "- [memory] ours-GaLoreAdamW-16bit optimizer-state bytes / galore-torch's (bfloat16 moments" in md


def test_bench_fp32_run_measures_16bit_and_8bit_rows(tmp_path):
    """In a float32 run the -16bit rows are measured with bfloat16 moments (16-bit moments apply
    to every parameter dtype), the -8bit rows in uint8."""
    from bench import optimizers as O

    ctx = Ctx(torch.device("cpu"), torch.float32, quick=True, tiny=True, out=tmp_path)
    params = _tiny_stack()
    opt = O.build(ctx, "memory", "optimizer_state", "ours-DCTAdamW-16bit", params, 10 ** 9, {})
    assert opt is not None and not ctx.rows
    assert O.first_steps(ctx, opt, "ours-DCTAdamW-16bit")["format_note"] == "moments: 14 bfloat16"
    opt = O.build(ctx, "memory", "optimizer_state", "ours-DCTAdamW-8bit", params, 10 ** 9, {})
    assert O.first_steps(ctx, opt, "ours-DCTAdamW-8bit")["format_note"] == "moments: 14 uint8"


def test_keep_reruns_some_suites_and_keeps_the_others(tmp_path, capsys):
    """--keep: the rows of the suites not run stay in the CSV with their own stamps, their tables and
    targets stay in the Markdown, and its header says which suites were kept from which run."""
    from bench import stamps as st

    tag = st.device_tag("cpu") + "-tiny"
    old = {k: "" for k in ROW_FIELDS}
    old.update(suite="quant", kernel="projector_bytes", provider="ours-int4", shape="4x8", rank="4", bytes="64",
               mode="tiny", device="cpu", git_sha="0ld5ha1", timestamp="2026-01-01T00:00:00Z")
    roof = dict(old, suite="roofline", kernel="matmul", provider="torch", bytes="")
    mem = dict(old, suite="memory", kernel="optimizer_state", provider="stale", bytes="1")
    with open(tmp_path / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        w.writerows([roof, mem, old])
    (tmp_path / f"{tag}.md").write_text(
        "Device: **X**.  \nMeasured ceilings: matmul 1 TFLOP/s (fp32), copy 2 GB/s.  \nSizes: s.\n\n"
        "**memory**\n\n| stale |\n\n**quant**\n\n| kernel | provider |\n|---|---|\n| projector_bytes | ours-int4 |\n\n"
        "**Targets** (t)\n\n- [memory] stale target\n- [quant] kept target: met\n")
    rc, out, header, rows, path = _run(tmp_path, capsys, "--device", "cpu", "--suite", "memory", "--no-plots",
                                       "--keep")
    assert rc == 0, out[-3000:]
    assert [r["suite"] for r in rows][-1] == "quant"
    quant = [r for r in rows if r["suite"] == "quant"]
    assert len(quant) == 1 and quant[0]["git_sha"] == "0ld5ha1" and quant[0]["bytes"] == "64"
    assert not [r for r in rows if r["provider"] == "stale"]  # the rerun suite is this run's only
    assert {r["git_sha"] for r in rows if r["suite"] != "quant"} == {st.git_describe()}
    assert [r for r in rows if r["suite"] == "roofline" and r["git_sha"] != "0ld5ha1"]
    md = path.with_suffix(".md").read_text()
    assert "Suites quant: kept from an earlier run (git 0ld5ha1, 2026-01-01T00:00:00Z; its ceilings: matmul 1 " \
           "TFLOP/s (fp32), copy 2 GB/s)" in md
    assert md.index("**memory**") < md.index("**quant**") < md.index("**Targets**")
    assert "| projector_bytes | ours-int4 |" in md and "- [quant] kept target: met" in md
    assert "stale" not in md and "- [memory] ours-GaLoreAdamW optimizer-state bytes" in md
    # Without --keep the file holds this run only.
    rc, out, header, rows, path = _run(tmp_path, capsys, "--device", "cpu", "--suite", "memory", "--no-plots")
    assert rc == 0 and {r["suite"] for r in rows} == {"roofline", "memory"}


def test_target_value_printed_with_enough_digits_to_match_its_verdict():
    from bench.harness.report import _fmt_measured

    assert _fmt_measured(Target("s", "x", 1.0000086, 1.0, higher_is_better=False)) == "1.000009x"  # MISSED
    assert _fmt_measured(Target("s", "x", 0.5961, 1.0, higher_is_better=False)) == "0.596x"
    assert _fmt_measured(Target("s", "x", 1.0, 1.0)) == "1x" and _fmt_measured(Target("s", "x", None, 1.0)) == "-"
