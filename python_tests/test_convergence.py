"""python -m bench.convergence: a tiny in-process run of every available method, and its parts.

Each method trains a 2-layer, hidden-64 LlamaForCausalLM for 150 steps on the Python
stdlib bytes. Its validation loss must fall well below the initial one (ln 256 = 5.55
nats at initialization), each low-rank method must end clearly below the frozen-weights
control (the same run with the projected weights frozen: what embeddings, head and
norms learn on their own), and the CSV/JSON must carry the expected columns and stamps.
"""
import csv
import json
import math
import pathlib
import re
import subprocess

import pytest
import torch

from bench import convergence as conv
from bench import readme as bench_readme
from bench import stamps
from bench.convergence import merge as conv_merge
from bench.convergence import report as conv_report
from lowrank_kernels.optim import state_nbytes
from bench.convergence import tuning as conv_tuning
from bench.convergence.recipes import RECIPES, is_plain_group

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
# Calibrated on this preset (150 steps, seeds 0 and 1, CPU): each low-rank method ended
# 0.069-0.17 nats below the control (DCT-AdamW the closest), the control's two seeds
# differed by 0.001 nats and a method's by at most 0.03; at 60 steps the control was
# level with every method. A method whose projected updates do nothing useful ends at the
# control's loss or above it.
TINY_CONTROL_MARGIN = 0.03


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    threads = torch.get_num_threads()
    git = stamps.git_describe()  # the tree's state when the run starts (what its stamp must say)
    try:
        results, out_dir = conv.run(["--no-tune", "--preset", "tiny", "--device", "cpu", "--threads", "1",
                                     "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return {r.method: r for r in results}, out_dir, git


@pytest.mark.parametrize("method", conv.HEADLINE)
def test_validation_loss_falls(tiny_run, method):
    results, _, _ = tiny_run
    r = results[method]
    if r.status.startswith("unavailable"):
        pytest.skip(f"{method}: {r.status}")
    assert r.status == "ok", f"{method}: {r.status}"
    steps = [s for s, _ in r.curve]
    assert steps[0] == 0 and steps[-1] == conv.PRESETS["tiny"].steps
    initial, final = r.curve[0][1], r.final_val_loss
    assert math.isfinite(final)
    assert final < 0.6 * initial, f"{method}: validation loss {initial:.3f} -> {final:.3f}"
    assert r.state_bytes > 0 and r.tokens_per_s > 0 and r.peak_bytes >= 0


@pytest.mark.parametrize("method", [m for m in conv.HEADLINE if RECIPES[m].role == "lowrank"])
def test_lowrank_method_beats_frozen_control(tiny_run, method):
    results, _, _ = tiny_run
    r, ctrl = results[method], results["frozen"]
    if r.status.startswith("unavailable"):
        pytest.skip(f"{method}: {r.status}")
    assert ctrl.status == "ok" and r.status == "ok", (ctrl.status, r.status)
    assert r.final_val_loss < ctrl.final_val_loss - TINY_CONTROL_MARGIN, \
        f"{method} {r.final_val_loss:.4f} is not clearly below the frozen control {ctrl.final_val_loss:.4f}"


def test_frozen_control_does_not_move_projected_weights():
    preset = conv.PRESETS["tiny"]
    model = conv.build_model(preset, 0, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = RECIPES["frozen"].resolve(preset)
    opt = RECIPES["frozen"].build(model, preset, hp)
    batch = torch.randint(0, 256, (2, 9))
    for _ in range(2):
        conv.lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    projected = {n for n, _ in model.named_parameters() if ".self_attn." in n or ".mlp." in n}
    assert projected and not moved & projected, moved & projected
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= moved
    assert all(g["lr"] == hp["other_lr"] for g in opt.param_groups)


def test_lowrank_state_smaller_than_adamw(tiny_run):
    results, _, _ = tiny_run
    base = results["adamw"]
    for m, r in results.items():
        if m != "adamw" and r.status == "ok":
            assert r.state_bytes < base.state_bytes, (m, r.state_bytes, base.state_bytes)


def test_8bit_rows_hold_less_state(tiny_run):
    results, _, _ = tiny_run
    for m8, m32 in (("galore-8bit", "galore"), ("dct-8bit", "dct")):
        r8, r32 = results[m8], results[m32]
        if r8.status.startswith("unavailable"):
            pytest.skip(f"{m8}: {r8.status}")
        assert r8.status == "ok" and r32.status == "ok", (r8.status, r32.status)
        assert r8.state_bytes < r32.state_bytes, (m8, r8.state_bytes, r32.state_bytes)


@pytest.mark.parametrize("method", ["galore-8bit", "dct-8bit"])
def test_8bit_recipes_keep_8bit_moments_on_every_group(method):
    """galore-8bit / dct-8bit: moment_bits=8 on the projected and the plain group (as GaLoreAdamW8bit),
    uint8 moments from min_8bit_size elements up, float32 below (the norms); the recipe's check after
    the first step refuses an optimizer that left its moments in float32."""
    from bench.convergence.recipes import _check_moment_format

    preset = conv.PRESETS["tiny"]
    hp = RECIPES[method].resolve(preset)
    assert hp["moment_bits"] == 8 and hp["min_8bit_size"] == 512
    assert RECIPES[method].resolve(conv.PRESETS["quick"])["min_8bit_size"] == 4096
    model = conv.build_model(preset, 0, torch.device("cpu"))
    opt = RECIPES[method].build(model, preset, hp)
    assert all(g["moment_bits"] == 8 and g["min_8bit_size"] == 512 for g in opt.param_groups)
    assert any(is_plain_group(g) for g in opt.param_groups)
    conv.lm_loss(model, torch.randint(0, 256, (2, 9))).backward()
    opt.step()
    RECIPES[method].callback(model, opt, preset, hp)(0)  # passes
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        want = torch.uint8 if st["exp_avg"].numel() >= 512 else torch.float32
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == want, (names[p], st["exp_avg"].dtype)
    assert opt.state[model.model.embed_tokens.weight]["exp_avg"].dtype == torch.uint8
    # The same check on a float32-moment optimizer fails loudly.
    model = conv.build_model(preset, 0, torch.device("cpu"))
    opt = RECIPES[method.replace("-8bit", "")].build(model, preset, RECIPES[method.replace("-8bit", "")].resolve(preset))
    conv.lm_loss(model, torch.randint(0, 256, (2, 9))).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="not uint8"):
        _check_moment_format(model, opt, preset, hp)(0)


def test_csv_json_outputs(tiny_run):
    results, out, git = tiny_run
    with open(out / "convergence.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "final_val_loss", "val_ppl", "state_bytes", "peak_bytes", "tokens_per_s"]
    trained = [m for m in conv.HEADLINE if not results[m].status.startswith(("unavailable", "failed"))]
    assert [row[0] for row in rows[1:]] == trained
    for row in rows[1:]:
        r = results[row[0]]
        assert float(row[1]) == pytest.approx(r.final_val_loss, rel=1e-5)
        assert float(row[2]) == pytest.approx(math.exp(float(row[1])), rel=1e-5)
        assert int(row[3]) == r.state_bytes and int(row[4]) == r.peak_bytes
    assert (out / "convergence.png").stat().st_size > 0
    info = json.loads((out / "convergence.json").read_text())
    assert info["git"] == git and re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", git)
    assert info["device"].startswith(stamps.cpu_model()) and "1 threads" in info["device"]
    assert info["evaluated_split"] == "val" and info["seeds"] == [0]
    assert {r["method"] for r in info["runs"]} == set(trained)
    for m in trained:
        assert info["summary"][m]["finals"] == [pytest.approx(results[m].final_val_loss)]
        assert info["runs"][trained.index(m)]["recipe"] == RECIPES[m].resolve(conv.PRESETS["tiny"])
    assert set(info["vs_control"]) == {m for m in trained if RECIPES[m].role == "lowrank"}


def test_three_disjoint_splits_and_same_batches(tmp_path):
    # A folder: the CRC rule decides per file; the same seed gives the same windows.
    names = [f"f{i:03d}.txt" for i in range(200)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([65 + i % 26]) * 600)
    corpus = conv.load_corpus(str(tmp_path))
    counts = {s: sum(conv.split_of(n) == s for n in names) for s in conv.SPLITS}
    assert counts["val"] and counts["tune"], counts  # this file set exercises all three splits
    assert {s: len(corpus.split(s)) for s in conv.SPLITS} == {s: 600 * n for s, n in counts.items()}
    with pytest.raises(ValueError, match="split"):
        corpus.split("test")
    preset = conv.PRESETS["tiny"]
    a, b = conv.Batches(corpus.train, corpus.val, preset, 0), conv.Batches(corpus.train, corpus.val, preset, 0)
    assert torch.equal(a.train_batch(3), b.train_batch(3))
    assert not torch.equal(a.train_batch(3), conv.Batches(corpus.train, corpus.val, preset, 1).train_batch(3))
    assert a.train_batch(0).shape == (preset.batch_size, preset.seq_len + 1)
    # A single file: 80% / 10% / 10%, in that order.
    f = tmp_path / "one.txt"
    data = bytes(range(256)) * 40
    f.write_bytes(data)
    c = conv.load_corpus(str(f))
    n = len(data)
    assert bytes(c.train.tolist()) == data[:int(0.8 * n)] and bytes(c.val.tolist()) == data[int(0.9 * n):]
    assert len(c.tune) == int(0.9 * n) - int(0.8 * n)


def test_stdlib_splits_are_disjoint_by_file():
    assert conv.split_of("a/b.py") == conv.split_of("a\\b.py".replace("\\", "/"))
    names = [f"m{i}.py" for i in range(400)]
    got = {s: [n for n in names if conv.split_of(n) == s] for s in conv.SPLITS}
    assert sum(map(len, got.values())) == 400 and 5 <= len(got["val"]) <= 40 and 5 <= len(got["tune"]) <= 40


def test_schedule_warmup_then_cosine():
    p = conv.PRESETS["quick"]
    f = conv.lr_lambda(p, 300)
    warm = round(p.warmup_frac * 300)
    assert f(0) == pytest.approx(1 / warm) and f(warm - 1) == pytest.approx(1.0)
    assert f(warm) == pytest.approx(1.0)
    assert f(299) == pytest.approx(p.min_lr_ratio, abs=1e-3)
    vals = [f(s) for s in range(warm, 300)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def test_state_bytes_counts_adamw_moments():
    model = torch.nn.Linear(7, 5)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    # exp_avg + exp_avg_sq in float32 plus a float32 step scalar per parameter
    assert state_nbytes(opt) == 2 * 4 * n + 4 * 2


def test_bad_arguments():
    with pytest.raises(SystemExit):
        conv.parse_args(["--optimizers", "adamw,sgd"])
    with pytest.raises(SystemExit):
        conv.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        conv.parse_args(["--seeds", "0"])
    with pytest.raises(SystemExit):
        conv.parse_args(["--no-tune", "--grid", "lr=1e-3"])  # a grid with nothing to tune
    assert conv.parse_args(["--grid", "lr=x0.5,x1"]).grid_values == {"lr": ["x0.5", "x1"]}  # the protocol's grid
    for bad in (["--budget", "0"], ["--tune-steps", "0"], ["--grid", "lr=xfast"]):
        with pytest.raises(SystemExit):
            conv.parse_args(bad)
    with pytest.raises(SystemExit, match="--lr"):  # the protocol tunes lr itself
        conv.run(["--preset", "tiny", "--lr", "galore=1e-3", "--out", "/nonexistent/never-written"])
    with pytest.raises(SystemExit):
        conv.parse_args(["--tune", "adamw", "--grid", "lr=fast"])
    with pytest.raises(FileNotFoundError, match="--data"):
        conv.load_corpus("/nonexistent/corpus")


def test_adamw_two_learning_rates_partition_the_model():
    preset = conv.PRESETS["tiny"]
    model = conv.build_model(preset, 0, torch.device("cpu"))
    hp = RECIPES["adamw"].resolve(preset, {"lr": 1e-3, "other_lr": 1e-2})
    opt = RECIPES["adamw"].build(model, preset, hp)
    target, other = opt.param_groups
    assert target["lr"] == 1e-3 and other["lr"] == 1e-2
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("attn" in names[id(p)] or "mlp" in names[id(p)]) for p in target["params"])
    assert {names[id(p)] for p in other["params"]} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(target["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_lowrank_recipes_give_each_group_its_lr():
    preset = conv.PRESETS["tiny"]
    for m in ("galore", "apollo-mini", "frugal"):
        if RECIPES[m].why_unavailable():
            continue
        model = conv.build_model(preset, 0, torch.device("cpu"))
        hp = RECIPES[m].resolve(preset, {"lr": 3e-3, "other_lr": 7e-3})
        opt = RECIPES[m].build(model, preset, hp)
        lrs = {is_plain_group(g): g["lr"] for g in opt.param_groups}
        assert lrs == {False: 3e-3, True: 7e-3}, (m, lrs)


def test_recipe_registry_one_entry_adds_a_method(tmp_path):
    calls = []

    def cb_factory(model, optimizer, preset, hp):
        return calls.append

    recipe = conv.Recipe("test-galore", conv.lowrank_builder("GaLoreAdamW", proj_type="std"),
                         dict(lr=1e-2, other_lr=5e-3, scale=0.25),
                         requires=(("lowrank_kernels.optim", "GaLoreAdamW"),), callback=cb_factory)
    conv.register(recipe)
    try:
        with pytest.raises(ValueError, match="already registered"):
            conv.register(recipe)
        assert "test-galore" in conv.parse_args(["--optimizers", "test-galore"]).methods
        preset = conv.PRESETS["tiny"]
        corpus = conv.load_corpus(None)
        p2 = type(preset)(**{**preset.__dict__, "steps": 3, "eval_every": 3})
        r = conv.train_one("test-galore", p2, conv.Batches(corpus.train, corpus.val, p2, 0), torch.device("cpu"), 0,
                           recipe.resolve(p2), progress=False)
        assert r.status == "ok" and calls == [0, 1, 2] and r.recipe["other_lr"] == 5e-3
    finally:
        del RECIPES["test-galore"]
    with pytest.raises(ValueError, match="role"):
        conv.Recipe("x", lambda *a: None, dict(lr=1, other_lr=1), role="other")
    with pytest.raises(ValueError, match="other_lr"):
        conv.Recipe("x", lambda *a: None, dict(lr=1))
    with pytest.raises(ValueError, match="no hyper-parameter"):
        RECIPES["galore"].resolve(conv.PRESETS["tiny"], {"momentum": 0.9})
    missing = conv.Recipe("x", lambda *a: None, dict(lr=1, other_lr=1), requires=(("lowrank_kernels.optim", "Nope"),))
    assert "does not exist" in missing.why_unavailable()


def test_tuning_grid_scores_on_the_tuning_split(tmp_path):
    grid = conv_tuning.parse_grid(["lr=1e-3,4e-3", "other_lr=1e-2"])
    assert conv_tuning.grid_points(grid) == [{"lr": 1e-3, "other_lr": 1e-2}, {"lr": 4e-3, "other_lr": 1e-2}]
    for bad in ([], ["lr"], ["lr=1e-3", "lr=2e-3"], ["lr="]):
        with pytest.raises(ValueError, match="--grid|--tune"):
            conv_tuning.parse_grid(bad)
    git = stamps.git_describe()
    results, out = conv.run(["--preset", "tiny", "--steps", "2", "--tune", "adamw", "--grid", "lr=1e-3,4e-3",
                             "--grid", "other_lr=1e-2", "--device", "cpu", "--threads", "1", "--no-progress",
                             "--out", str(tmp_path)])
    info = json.loads((out / "convergence_tuning-adamw.json").read_text())
    assert info["evaluated_split"] == "tune" and info["git"] == git
    losses = [p["tune_loss"] for p in info["points"]]
    assert losses == [pytest.approx(r.final_val_loss) for r in results]
    assert info["best"]["tune_loss"] == pytest.approx(min(losses))
    assert not (out / "convergence.csv").exists()  # tuning never writes the table
    # The step-0 loss is the tuning split's, not the validation split's.
    preset = conv.PRESETS["tiny"]
    corpus = conv.load_corpus(None)
    model = conv.build_model(preset, 0, torch.device("cpu"))
    p2 = type(preset)(**{**preset.__dict__, "steps": 2})
    on_tune = conv.evaluate(model, conv.Batches(corpus.train, corpus.tune, p2, 0), torch.device("cpu"), p2)
    on_val = conv.evaluate(model, conv.Batches(corpus.train, corpus.val, p2, 0), torch.device("cpu"), p2)
    assert info["points"][0]["curve"][0][1] == pytest.approx(on_tune) and on_tune != pytest.approx(on_val)


def test_merge_seeds_from_separate_processes(tmp_path):
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        conv.run(["--no-tune", "--preset", "tiny", "--steps", "2", "--optimizers", "adamw,frozen", "--seed", str(seed),
                  "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out)])
        outs.append(out / "convergence.json")
    merged = tmp_path / "merged"
    _, results = conv_merge.merge([str(p) for p in outs], merged)
    info = json.loads((merged / "convergence.json").read_text())
    assert info["seeds"] == [0, 1] and len(info["merged_from"]) == 2
    singles = [json.loads(p.read_text())["summary"]["adamw"]["finals"][0] for p in outs]
    assert info["summary"]["adamw"]["finals"] == pytest.approx(singles)
    assert info["summary"]["adamw"]["mean"] == pytest.approx(sum(singles) / 2)
    with pytest.raises(ValueError, match="same method and seed"):
        conv_merge.merge([str(outs[0]), str(outs[0])], tmp_path / "dup")
    other = json.loads(outs[1].read_text())
    other["preset"]["steps"] = 3
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="preset"):
        conv_merge.merge([str(outs[0]), str(tmp_path / "other.json")], tmp_path / "bad")


def test_merge_adds_rows_of_new_methods_from_a_later_commit(tmp_path):
    """New methods' rows may carry a later stamp than the table they join; one method's seeds may not mix stamps."""
    outs = {}
    for name, methods in (("old", "adamw,frozen"), ("new", "galore")):
        out = tmp_path / name
        conv.run(["--no-tune", "--preset", "tiny", "--steps", "2", "--optimizers", methods, "--device", "cpu", "--threads", "1",
                  "--no-progress", "--out", str(out)])
        outs[name] = out / "convergence.json"
    old = json.loads(outs["old"].read_text())
    old["git"] = "aaaaaaa"
    outs["old"].write_text(json.dumps(old))
    new = json.loads(outs["new"].read_text())
    new["git"] = "bbbbbbb"
    outs["new"].write_text(json.dumps(new))
    first = tmp_path / "first"
    conv_merge.merge([str(outs["old"])], first)
    merged = tmp_path / "merged"
    conv_merge.merge([str(first / "convergence.json"), str(outs["new"])], merged)
    info = json.loads((merged / "convergence.json").read_text())
    assert info["git_by_method"] == {"adamw": "aaaaaaa", "frozen": "aaaaaaa", "galore": "bbbbbbb"}
    assert info["git"] == "aaaaaaa + bbbbbbb"
    assert [s["file"] for s in info["merged_from"]] == [str(outs["old"]), str(outs["new"])]
    assert set(info["summary"]) == {"adamw", "frozen", "galore"}
    assert info["summary"]["galore"]["finals"] == pytest.approx(new["summary"]["galore"]["finals"])
    text = bench_readme._convergence_section(merged / "convergence.json", tmp_path)
    assert "aaaaaaa: adamw, frozen; bbbbbbb: galore" in text
    # Seed 1 of galore from yet another commit would mix two code versions in galore's row.
    other = dict(new, git="ccccccc", seeds=[1], runs=[dict(r, seed=1) for r in new["runs"]])
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="two code versions"):
        conv_merge.merge([str(merged / "convergence.json"), str(tmp_path / "other.json")], tmp_path / "bad")


def test_summary_and_control_verdicts():
    R = conv.Result
    results = [R("adamw", "ok", 2.0, curve=[(0, 5.0), (1, 2.0)], state_bytes=100, seed=0),
               R("adamw", "ok", 2.2, curve=[(0, 5.0), (1, 2.2)], state_bytes=100, seed=1),
               R("frozen", "ok", 2.5, curve=[(0, 5.0), (1, 2.5)], seed=0),
               R("frozen", "ok", 2.6, curve=[(0, 5.0), (1, 2.6)], seed=1),
               R("galore", "ok", 2.3, curve=[(0, 5.0), (1, 2.3)], state_bytes=40, seed=0),
               R("galore", "ok", 2.46, curve=[(0, 5.0), (1, 2.46)], state_bytes=40, seed=1),
               R("dct", "ok", 2.0, curve=[(0, 5.0), (1, 2.0)], seed=0),
               R("dct", "diverged at step 1", float("nan"), curve=[(0, 5.0), (1, float("nan"))], seed=1)]
    s = {x.method: x for x in conv_report.summarize(results)}
    assert s["adamw"].mean == pytest.approx(2.1) and s["adamw"].std == pytest.approx(0.1414, abs=1e-4)
    v = conv_report.control_verdicts(list(s.values()))
    assert v["galore"]["worst_seed_margin_nats"] == pytest.approx(0.04) and not v["galore"]["clear"]
    assert not v["dct"]["clear"] and s["dct"].status.startswith("diverged")
    assert any("NOT CLEAR" in line for line in conv_report.acceptance(list(s.values())))


def test_git_stamp_says_dirty(tmp_path):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(git + ["-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-qm", "x"], check=True)
    clean = stamps.git_describe(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{7,}", clean), clean
    (tmp_path / "b.txt").write_text("untracked files do not count")
    assert stamps.git_describe(tmp_path) == clean
    (tmp_path / "a.txt").write_text("2")
    assert stamps.git_describe(tmp_path) == clean + "-dirty"


def test_committed_demo_results_match_the_recipes():
    """The README's demo numbers come from these files: they must be stamped, and the AdamW
    pair in the recipes must be the best of the committed tuning grid."""
    tuning_file = RESULTS / "convergence_tuning-adamw.json"
    if tuning_file.exists():
        info = json.loads(tuning_file.read_text())
        assert info["evaluated_split"] == "tune" and info["git"] not in ("", "unknown")
        preset = conv.PRESETS[info["preset"]["name"]]
        hp = RECIPES["adamw"].resolve(preset)
        assert {k: hp[k] for k in info["best"]["hparams"]} == pytest.approx(info["best"]["hparams"])
        assert min(p["tune_loss"] for p in info["points"] if p["status"] == "ok") == \
            pytest.approx(info["best"]["tune_loss"])
    table = RESULTS / "convergence.json"
    if table.exists():
        info = json.loads(table.read_text())
        assert info["evaluated_split"] == "val" and info["git"] not in ("", "unknown")
        preset = conv.PRESETS[info["preset"]["name"]]
        for r in info["runs"]:
            if r["method"] in RECIPES and info["preset"] == dict(preset.__dict__):
                assert r["recipe"] == pytest.approx(RECIPES[r["method"]].resolve(preset)), r["method"]


def test_finetune_owlore_full_galore(tmp_path):
    """The fine-tuning demo: one AdamW pre-training, then full / GaLore / OwLore from the same weights on
    the unseen tuning split; OwLore trains gamma = L/2 layers and drops frozen layers' state."""
    from bench.convergence import finetune as ft

    # Default steps (half the preset's): in the first ~12 steps full AdamW's fresh moments can overshoot.
    info, out = ft.run(["--preset", "tiny", "--device", "cpu", "--threads", "1",
                        "--out", str(tmp_path)])
    runs = {r["method"]: r for r in info["runs"]}
    assert set(runs) == set(ft.FT_METHODS) and all(r["status"] == "ok" for r in runs.values())
    starts = {r["ft_loss_start"] for r in runs.values()}
    assert len(starts) == 1  # every method starts from the same pre-trained weights
    for r in runs.values():
        assert r["ft_loss"] < r["ft_loss_start"], r["method"]
        assert r["state_bytes"] > 0 and r["max_state_bytes"] >= r["state_bytes"]
    # GaLore keeps less state than full AdamW, and OwLore (half the layers' state) less than GaLore.
    assert runs["owlore"]["max_state_bytes"] < runs["galore"]["max_state_bytes"] < runs["full"]["max_state_bytes"]
    assert runs["owlore"]["recipe"]["gamma"] == conv.PRESETS["tiny"].layers // 2
    assert sum(runs["owlore"]["probs"]) == pytest.approx(1.0)
    assert runs["full"]["recipe"]["lr"] == pytest.approx(RECIPES["adamw"].resolve(conv.PRESETS["tiny"])["lr"] * 0.1)
    saved = json.loads((out / ft.OUT_NAME).read_text())
    assert saved["git"] not in ("", "unknown") and saved["finetune_steps"] == conv.PRESETS["tiny"].steps // 2
    corpus = conv.load_corpus()
    a, b = ft.finetune_splits(corpus.tune)
    assert len(a) + len(b) == len(corpus.tune) and len(b) > 0
    text = bench_readme._finetune_section(out / ft.OUT_NAME, tmp_path)
    assert "| owlore |" in text and "| full |" in text
    with pytest.raises(SystemExit):
        ft.run(["--methods", "lisa", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the protocol

def _fake_point(loss_of):
    """A ``run_point`` for :func:`protocol.tune_method` that trains nothing: the loss is ``loss_of(hp)``."""
    calls = []

    def run_point(hp):
        calls.append(dict(hp))
        return conv.Result("galore", "ok", final_val_loss=loss_of(hp), curve=[(0, 5.0), (1, loss_of(hp))],
                           recipe=dict(hp))
    return run_point, calls


def _tune_meta():
    return {"preset": {"name": "tiny", "steps": 1}, "data": "d", "seeds": [0], "evaluated_split": "tune",
            "git": "x"}


def test_protocol_grid_extends_at_an_edge_within_the_budget(tmp_path):
    from bench.convergence import protocol

    preset = conv.PRESETS["tiny"]
    paper = RECIPES["galore"].resolve(preset)
    # The loss falls with lr up to 8x the paper's value: the grid (x0.5, x1, x2) must extend
    # upwards (x4, then x8), each extension crossed with every other_lr, and stop at the budget.
    run_point, calls = _fake_point(lambda hp: abs(math.log(hp["lr"] / (8 * paper["lr"]))) + abs(math.log(hp["other_lr"] / 0.03)))
    oc = protocol.tune_method("galore", preset, run_point, tmp_path, _tune_meta(), budget=17,
                              override={"lr": ("x0.5", "x1", "x2"), "other_lr": (0.01, 0.03, 0.1)})
    assert len(calls) == 15 and len({tuple(sorted(c.items())) for c in calls}) == 15
    assert oc.best == {"lr": pytest.approx(8 * paper["lr"]), "other_lr": 0.03}
    assert not oc.complete  # x16 would be next (3 more points), past the budget
    info = json.loads((tmp_path / "convergence_tuning-galore.json").read_text())
    assert len(info["points"]) == 15 and info["best"]["hparams"] == oc.best
    assert {p["git"] for p in info["points"]} == {"x"} and [h["git"] for h in info["history"]] == ["x"]
    # Resuming runs nothing again; a larger budget runs only the missing points.
    run_point2, calls2 = _fake_point(lambda hp: abs(math.log(hp["lr"] / (8 * paper["lr"]))) + abs(math.log(hp["other_lr"] / 0.03)))
    oc2 = protocol.tune_method("galore", preset, run_point2, tmp_path, _tune_meta(), budget=17,
                               override={"lr": ("x0.5", "x1", "x2"), "other_lr": (0.01, 0.03, 0.1)})
    assert calls2 == [] and oc2.best == oc.best
    oc3 = protocol.tune_method("galore", preset, run_point2, tmp_path, dict(_tune_meta(), git="y"), budget=18,
                               override={"lr": ("x0.5", "x1", "x2"), "other_lr": (0.01, 0.03, 0.1)})
    # 18 leaves room for the x16 column (3 points): then x8 is interior and the grid complete.
    assert [c["lr"] for c in calls2] == [pytest.approx(16 * paper["lr"])] * 3
    info = json.loads((tmp_path / "convergence_tuning-galore.json").read_text())  # each point keeps its stamp
    assert [h["git"] for h in info["history"]] == ["x", "x", "y"] and info["git"] == "y"
    assert sorted(p["git"] for p in info["points"]) == ["x"] * 15 + ["y"] * 3
    assert {p["git"] for p in info["points"] if p["hparams"]["lr"] == pytest.approx(16 * paper["lr"])} == {"y"}
    assert oc3.complete and oc3.best == oc.best
    # An interior best ends the grid at 9 points, complete.
    run_point4, calls4 = _fake_point(lambda hp: abs(math.log(hp["lr"] / paper["lr"])) + abs(hp["other_lr"] - 0.03))
    oc4 = protocol.tune_method("galore", preset, run_point4, tmp_path / "b", _tune_meta(), budget=17)
    assert len(calls4) == 9 and oc4.complete and oc4.best == {"lr": pytest.approx(paper["lr"]), "other_lr": 0.03}
    # Rows: the tuned one under the plain name, the paper recipe's second only when it differs.
    assert protocol.rows_for("galore", preset, oc4)[0][0] == "galore"
    assert [n for n, _ in protocol.rows_for("galore", preset, oc4)] == ["galore", "galore (paper recipe)"]
    same = protocol.TuningOutcome("galore", {}, [], [], {"lr": paper["lr"], "other_lr": paper["other_lr"]}, True)
    assert [n for n, _ in protocol.rows_for("galore", preset, same)] == ["galore"]
    assert [n for n, _ in protocol.rows_for("frozen", preset, None)] == ["frozen"]


def test_acceptance_judges_by_the_worst_seed():
    S = conv_report.Summary
    base = S("adamw", "baseline", "ok", [1.00, 1.00, 1.00], [0, 1, 2], 100, 0, 1.0)
    close = S("galore", "lowrank", "ok", [1.00, 1.02, 1.04], [0, 1, 2], 40, 0, 1.0)  # mean +2%, worst +4%
    spread = S("dct", "lowrank", "ok", [0.98, 1.00, 1.08], [0, 1, 2], 40, 0, 1.0)  # mean +2%, worst +8%
    lines = conv_report.acceptance([base, close, spread])
    assert "worst seed (ok" in next(ln for ln in lines if ln.startswith("galore"))
    assert "worst seed (MISS" in next(ln for ln in lines if ln.startswith("dct "))
    # DCT vs GaLore: worst seed 1.08 against GaLore's mean 1.02 is 6 points of AdamW's loss.
    assert any(ln.startswith("dct vs galore") and "+6.00 points" in ln and "MISS" in ln for ln in lines)


@pytest.mark.slow
def test_protocol_end_to_end_on_the_tiny_preset(tmp_path, monkeypatch):
    """Tune (half length, tuning split), then the tuned and paper-recipe rows over 2 seeds; a
    second run resumes everything; a subset run adds its rows to the same table."""
    from bench.convergence import cli, training

    calls = []
    real = training.train_one

    def counting(method, preset, *a, **k):
        calls.append((method, preset.steps))
        return real(method, preset, *a, **k)

    monkeypatch.setattr(cli, "train_one", counting)
    args = ["--preset", "tiny", "--steps", "4", "--optimizers", "adamw,frozen,galore", "--grid", "lr=x1,x4",
            "--grid", "other_lr=0.01", "--budget", "2", "--seeds", "2", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        results, out = conv.run(args)
    finally:
        torch.set_num_threads(threads)
    tuned = [c for c in calls if c[1] == 2]
    assert sorted(m for m, _ in tuned) == ["adamw", "adamw", "galore", "galore"]  # frozen: not tuned
    for m in ("adamw", "galore"):
        t = json.loads((out / f"convergence_tuning-{m}.json").read_text())
        assert t["evaluated_split"] == "tune" and t["preset"]["steps"] == 2 and len(t["points"]) == 2
    info = json.loads((out / "convergence.json").read_text())
    assert info["evaluated_split"] == "val" and info["seeds"] == [0, 1]
    rows = info["protocol"]["rows"]
    best = info["protocol"]["tuned"]["galore"]["best"]
    paper = RECIPES["galore"].resolve(conv.PRESETS["tiny"])
    assert rows["galore"]["lr"] == pytest.approx(best["lr"])
    assert ("galore (paper recipe)" in rows) == (best["lr"] != pytest.approx(paper["lr"]))
    for name in rows:
        assert info["summary"][name]["seeds"] == [0, 1], name
        assert info["summary"][name]["recipe"] == ("paper" if name.endswith("(paper recipe)") else
                                                   "recipe" if name == "frozen" else "tuned")
    with open(out / "convergence.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == list(rows)
    assert set(info["git_by_run"]) == {f"{name}/seed{s}" for name in rows for s in (0, 1)}
    assert set(info["git_by_run"].values()) == {info["git"]}
    n = len(calls)
    results2, _ = conv.run(args)  # resumes: nothing is trained again
    assert len(calls) == n and [r.final_val_loss for r in results2] == [r.final_val_loss for r in results]
    # A subset run adds its rows and keeps the others: only dct is tuned and trained.
    sub = list(args)
    sub[sub.index("--optimizers") + 1] = "adamw,dct"
    conv.run(sub)
    assert {m for m, _ in calls[n:]} == {"dct"}
    info = json.loads((out / "convergence.json").read_text())
    assert set(rows) | {"dct"} <= set(info["summary"]) and set(info["protocol"]["tuned"]) == {"adamw", "galore", "dct"}
    assert all(info["summary"][name]["seeds"] == [0, 1] for name in info["protocol"]["rows"])
    assert set(info["git_by_run"]) == {f"{name}/seed{s}" for name in info["protocol"]["rows"] for s in (0, 1)}


def test_dct_study_variants_set_what_their_names_say():
    """The study variants differ from the dct row only in the refresh rule (and run only when named)."""
    preset = conv.PRESETS["tiny"]
    want = {"dct": (preset.gap, "keep", 1), "dct-t1": (1, "keep", 1), "dct-t1-reindex": (1, "reindex", 1),
            "dct-reindex": (preset.gap, "reindex", 1), "dct-l2": (preset.gap, "keep", 2)}
    for m, (gap, refresh, norm) in want.items():
        model = conv.build_model(preset, 0, torch.device("cpu"))
        opt = RECIPES[m].build(model, preset, RECIPES[m].resolve(preset))
        (g,) = [g for g in opt.param_groups if not is_plain_group(g)]
        assert (g["update_proj_gap"], g["moment_refresh"], g["norm"]) == (gap, refresh, norm), m
        assert (m in conv.HEADLINE) == (m == "dct")
        assert RECIPES[m].resolve(preset) == RECIPES["dct"].resolve(preset)


def test_committed_protocol_rows_are_the_best_of_their_grids():
    """bench/results/protocol/ (a partial protocol run): each tuned row runs its grid's best point,
    the paper row its recipe, and every point and run names the code version it ran with."""
    folder = RESULTS / "protocol"
    if not (folder / "convergence.json").exists():
        pytest.skip("no committed protocol table")
    info = json.loads((folder / "convergence.json").read_text())
    preset = conv.PRESETS[info["preset"]["name"]]
    assert info["evaluated_split"] == "val"
    for m, t in info["protocol"]["tuned"].items():
        grid = json.loads((folder / f"convergence_tuning-{m}.json").read_text())
        assert grid["evaluated_split"] == "tune" and grid["preset"]["steps"] == preset.steps // 2
        assert grid["best"]["hparams"] == t["best"] and all(p["git"] for p in grid["points"])
        in_grid = [p for p in grid["points"] if p["hparams"] == t["best"]]
        assert in_grid and in_grid[0]["tune_loss"] == pytest.approx(grid["best"]["tune_loss"])
    for r in info["runs"]:
        name = r["method"]
        want = RECIPES[conv.recipes.base_of(name)].resolve(preset,
                                                           None if name.endswith(conv.PAPER_SUFFIX) or name == "frozen"
                                                           else info["protocol"]["tuned"][name]["best"])
        assert r["recipe"] == pytest.approx(want), name
        assert info["git_by_run"][f"{name}/seed{r['seed']}"]
