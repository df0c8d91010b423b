"""python -m bench.convergence: a tiny in-process run of every available method.

Each method trains a 2-layer, hidden-64 LlamaForCausalLM for a few steps on the
Python stdlib bytes; its validation loss must fall well below the initial one
(ln 256 = 5.55 nats at initialization), and the CSV must have exactly the issue's
columns with one row per trained method.
"""
import csv
import math

import pytest
import torch

from bench import convergence as conv


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    threads = torch.get_num_threads()
    try:
        results, out_dir = conv.run(["--preset", "tiny", "--device", "cpu", "--threads", "1",
                                     "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return {r.method: r for r in results}, out_dir


@pytest.mark.parametrize("method", conv.METHODS)
def test_validation_loss_falls(tiny_run, method):
    results, _ = tiny_run
    r = results[method]
    if r.status.startswith("unavailable"):
        pytest.skip(f"{method}: {r.status}")
    assert r.status == "ok", f"{method}: {r.status}"
    steps = [s for s, _ in r.curve]
    assert steps[0] == 0 and steps[-1] == conv.PRESETS["tiny"].steps
    initial, final = r.curve[0][1], r.final_val_loss
    assert math.isfinite(final)
    assert final < 0.9 * initial, f"{method}: validation loss {initial:.3f} -> {final:.3f}"
    assert r.state_bytes > 0 and r.tokens_per_s > 0 and r.peak_bytes >= 0


def test_lowrank_state_smaller_than_adamw(tiny_run):
    results, _ = tiny_run
    base = results["adamw"]
    for m, r in results.items():
        if m != "adamw" and r.status == "ok":
            assert r.state_bytes < base.state_bytes, (m, r.state_bytes, base.state_bytes)


def test_csv_columns_and_rows(tiny_run):
    results, out = tiny_run
    with open(out / "convergence.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "final_val_loss", "val_ppl", "state_bytes", "peak_bytes", "tokens_per_s"]
    trained = [m for m in conv.METHODS if not results[m].status.startswith(("unavailable", "failed"))]
    assert [row[0] for row in rows[1:]] == trained
    for row in rows[1:]:
        r = results[row[0]]
        assert float(row[1]) == pytest.approx(r.final_val_loss, rel=1e-5)
        assert float(row[2]) == pytest.approx(math.exp(float(row[1])), rel=1e-5)
        assert int(row[3]) == r.state_bytes and int(row[4]) == r.peak_bytes
    assert (out / "convergence.png").stat().st_size > 0


def test_same_batches_for_every_method_and_disjoint_split(tmp_path):
    # A folder: the CRC rule decides per file; the same seed gives the same windows.
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes([65 + i % 26]) * 600)
    train, val, _ = conv.load_corpus(str(tmp_path))
    n_val_files = sum(conv._is_validation(f"f{i:02d}.txt") for i in range(40))
    assert len(val) == 600 * n_val_files and len(train) + len(val) == 600 * 40
    preset = conv.PRESETS["tiny"]
    a, b = conv.Batches(train, val, preset, 0), conv.Batches(train, val, preset, 0)
    assert torch.equal(a.train_batch(3), b.train_batch(3))
    assert not torch.equal(a.train_batch(3), conv.Batches(train, val, preset, 1).train_batch(3))
    assert a.train_batch(0).shape == (preset.batch_size, preset.seq_len + 1)
    # A single file: the last 10% is validation.
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(256)) * 40)
    train, val, _ = conv.load_corpus(str(f))
    assert len(train) == int(256 * 40 * 0.9) and len(train) + len(val) == 256 * 40


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
    assert conv.state_bytes(opt) == 2 * 4 * n + 4 * 2


def test_bad_arguments():
    with pytest.raises(SystemExit):
        conv.parse_args(["--optimizers", "adamw,sgd"])
    with pytest.raises(SystemExit):
        conv.parse_args(["--steps", "0"])
    with pytest.raises(FileNotFoundError, match="--data"):
        conv.load_corpus("/nonexistent/corpus")


def test_adamw_other_lr_splits_groups():
    model = conv.build_model(conv.PRESETS["tiny"], 0, torch.device("cpu"))
    opt = conv._adamw(model, conv.PRESETS["tiny"], {"lr": 1e-3, "other_lr": 1e-2})
    target, other = opt.param_groups
    assert target["lr"] == 1e-3 and other["lr"] == 1e-2
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("attn" in names[id(p)] or "mlp" in names[id(p)]) for p in target["params"])
    assert {names[id(p)] for p in other["params"]} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(target["params"]) + len(other["params"]) == len(list(model.parameters()))
