"""Host cost of the bucketed step: op counts, host mirrors of the step
counts, state dicts with mirrors.

The step reads ``state["step"]`` / ``state["side"]`` from host mirrors (Python ints checked
against the tensor's identity and version counter), so a non-refresh bucketed step reads no
bookkeeping tensor; any change of those tensors (in place or by assignment,
``load_state_dict``) must still be honoured. Counting is deterministic: these tests are not
timed.
"""
import warnings

import os

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

from ._helpers import roundtrip
from .._opcount import CountOps

SHAPES = [(23, 11), (11, 23), (17, 17), (9, 30)]  # std: right, left, right, left
GAP = 3  # refreshes at steps 1, 4, 7, ...
FOREACH_OP = "lowrank_kernels.projection_foreach_project_update_backproject"
SINGLE_OP = "lowrank_kernels.projection_project_update_backproject"
CLASSES = [GaLoreAdamW, DCTAdamW]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def _make(cls, ps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls([{"params": ps, "rank": 3, "update_proj_gap": GAP, "scale": 0.5, **kw}], lr=1e-2,
                   weight_decay=0.05)


def _step(opt, ps, grads, count=False):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    if not count:
        opt.step()
        return None
    with CountOps() as mode:
        opt.step()
    return mode


def _native_probe() -> bool:
    """Whether CPU gradients are probed by the extension's bit test (no ATen op)."""
    from lowrank_kernels.optim._stepcache import _native_nonfinite_flags

    return _native_nonfinite_flags([torch.ones(3)]) is True


@pytest.mark.parametrize("aten_probe", [False, True])
@pytest.mark.parametrize("cls", CLASSES)
def test_non_refresh_step_op_counts(cls, aten_probe, monkeypatch):
    """A non-refresh step of the bucketed optimizers: one op call per bucket (2), the
    non-finite probe and one step-count update per bucket; no read of a step or side tensor.
    The probe is the extension's bit test over the CPU gradients (no ATen op) when it is
    built, else (and with ``aten_probe``) foreach norm, stack, max and its one host read."""
    from lowrank_kernels.optim import _stepcache

    if aten_probe:
        monkeypatch.setattr(_stepcache, "_native_nonfinite_flags", lambda grads: None)
    native = not aten_probe and _native_probe()
    if os.environ.get("LOWRANK_KERNELS_EXPECT_EXT") == "1" and not aten_probe:
        assert native, "the extension is built: CPU gradients must take its probe"
    ps = _params()
    opt = _make(cls, ps)
    grads = _grads(3)
    _step(opt, ps, grads[0])  # refresh
    mode = _step(opt, ps, grads[1], count=True)
    assert mode.counts.get(FOREACH_OP) == 2, mode.counts
    assert mode.total("lowrank_kernels") == 2
    assert mode.counts.get("aten._foreach_add_") == 2
    if native:
        assert "aten._local_scalar_dense" not in mode.counts, mode.counts
        assert mode.total("aten") == 2, mode.counts
    else:
        assert mode.counts.get("aten._local_scalar_dense") == 1, mode.counts  # the probe's max, once
        assert mode.total("aten") == 6, mode.counts
    # Without the probe the step reads no tensor value at all.
    opt2 = _make(cls, _params(), skip_nonfinite=False)
    ps2 = opt2.param_groups[0]["params"]
    _step(opt2, ps2, grads[0])
    mode = _step(opt2, ps2, grads[1], count=True)
    assert "aten._local_scalar_dense" not in mode.counts, mode.counts
    assert mode.total("aten") == 2 and mode.total("lowrank_kernels") == 2


@pytest.mark.parametrize("name", ["ours-GaLoreAdamW", "ours-DCTAdamW"])
def test_host_cost_stack_meets_issue_targets(name):
    """bench/host_cost.py's 28-weight stack: at most 4 lowrank_kernels op calls and 30 aten
    ops per non-refresh step (the targets of bench/host_cost.py); the step reads at most one tensor value
    through ATen (the non-finite probe's max; none when the extension's probe reads the CPU
    gradients)."""
    from bench import host_cost

    opts, skipped = host_cost.make_optimizers(names=[name])
    assert not skipped
    opt, _ = opts[name]
    opt.step()  # the refresh step
    opt.step()
    with CountOps() as mode:
        opt.step()
    assert mode.custom <= host_cost.MAX_LK_OPS and mode.aten <= host_cost.MAX_ATEN_OPS, (mode.custom, mode.names)
    assert mode.custom == 2 and mode.reads == (0 if _native_probe() else 1), mode.names


def test_host_cost_rows_and_table():
    """The table's rows (a tiny run: counts exact, times only present) and its verdict lines."""
    from bench import host_cost

    names = ["torch-adamw-foreach", "ours-DCTAdamW", "ours-DCTAdamW per-param"]
    rows = host_cost.rows(rounds=2, reps=1, backend="reference", names=names)
    by = {r["optimizer"]: r for r in rows}
    assert set(by) == set(names) and not any(r["skipped"] for r in rows)
    assert by["ours-DCTAdamW"]["lk_ops"] == 2 and by["ours-DCTAdamW per-param"]["lk_ops"] == 28
    assert by["torch-adamw-foreach"]["lk_ops"] == 0 and by["torch-adamw-foreach"]["host_reads"] > 0
    # The profiler sees the ops nested in the custom ops too: more than the top level.
    assert by["ours-DCTAdamW"]["aten_all"] > by["ours-DCTAdamW"]["aten_ops"]
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"] for r in rows)
    text = host_cost.format_table(rows, "header")
    aten = by["ours-DCTAdamW"]["aten_ops"]
    assert aten == (2 if _native_probe() else 6)
    assert f"ours-DCTAdamW: 2 lk ops (goal <= 4), {aten} aten ops (goal <= 30): met" in text
    assert "ours-GaLoreAdamW: not measured" in text
    assert "step wall time" in text and "step CPU time" in text and "vs torch-adamw-foreach" in text
    assert all(r["cpu_ms"] > 0 for r in rows)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_counts_and_resume_with_mirrors(cls):
    """Step tensors hold the right counts after bucketed steps; a state_dict round trip
    (torch.save / weights_only load) into a fresh optimizer resumes bit-identically, the
    loaded counts driving the refresh schedule."""
    grads = _grads(8)
    ps = _params()
    opt = _make(cls, ps)
    for g in grads:
        _step(opt, ps, g)
    for p in ps:
        assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 8.0

    qs = _params()
    opt_q = _make(cls, qs)
    for g in grads[:2]:
        _step(opt_q, qs, g)
    saved = roundtrip(opt_q.state_dict())
    assert all(float(s["step"]) == 2.0 for s in saved["state"].values())
    rs = _params(seed=3)
    opt_r = _make(cls, rs)
    _step(opt_r, rs, grads[0])  # warm the mirrors with other counts: load must replace them
    _step(opt_r, rs, grads[1])
    opt_r.load_state_dict(saved)
    with torch.no_grad():
        for r, q in zip(rs, qs):
            r.copy_(q)
    for g in grads[2:3]:
        _step(opt_r, rs, g)  # step 3: no refresh, bucketed
    mode = _step(opt_r, rs, grads[3], count=True)  # step 4: refresh (per parameter)
    assert mode.counts.get(SINGLE_OP) == len(SHAPES) and FOREACH_OP not in mode.counts, mode.counts
    for g in grads[4:]:
        _step(opt_r, rs, g)
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)
        assert float(opt_r.state[r]["step"]) == 8.0
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt_r.state[r][k]), k


@pytest.mark.parametrize("change", ["fill_", "assign", "copy_"])
@pytest.mark.parametrize("cls", CLASSES)
def test_changed_step_tensor_is_read_again(cls, change):
    """Setting a step count by hand (in place or by assignment) between steps moves the
    refresh schedule exactly as reading the tensor every step would."""
    ps = _params()
    opt = _make(cls, ps)
    grads = _grads(4)
    _step(opt, ps, grads[0])  # refresh at step 1
    _step(opt, ps, grads[1])  # step 2, bucketed: the mirrors hold 2
    for p in ps:
        st = opt.state[p]
        if change == "fill_":
            st["step"].fill_(6.0)
        elif change == "copy_":
            st["step"].copy_(torch.tensor(6.0))
        else:
            st["step"] = torch.tensor(6.0)
    mode = _step(opt, ps, grads[2], count=True)  # step 7 = 1 + 2 * GAP: a refresh
    assert mode.counts.get(SINGLE_OP) == len(SHAPES) and FOREACH_OP not in mode.counts, mode.counts
    assert all(float(opt.state[p]["step"]) == 7.0 for p in ps)
    mode = _step(opt, ps, grads[3], count=True)  # step 8: bucketed again
    assert mode.counts.get(FOREACH_OP) == 2, mode.counts
    assert all(float(opt.state[p]["step"]) == 8.0 for p in ps)


@pytest.mark.parametrize("cls", CLASSES)
def test_changed_side_tensor_is_read_again(cls):
    """The side mirror follows an in-place change of ``state["side"]`` (here: a parameter
    whose moments and projector are replaced by the other side's, as a user might)."""
    ps = _params()
    opt = _make(cls, ps, proj_type="right")
    grads = _grads(3)
    _step(opt, ps, grads[0])
    _step(opt, ps, grads[1])
    assert all(opt._side(opt.state[p]) == "right" for p in ps)
    st = opt.state[ps[0]]
    st["side"].fill_(1)
    assert opt._side(st) == "left"
    st["side"] = torch.tensor(0, dtype=torch.int8)
    assert opt._side(st) == "right"


def test_mirror_not_used_past_float32_exact_range():
    """A float32 count at 2^24 no longer grows by 1: the mirror is dropped there and the
    tensor is read, as without mirrors."""
    ps = _params()
    opt = _make(GaLoreAdamW, ps, update_proj_gap=10**9)
    grads = _grads(3)
    _step(opt, ps, grads[0])
    for p in ps:
        opt.state[p]["step"].fill_(2.0**24 - 1)
    _step(opt, ps, grads[1])  # step 2^24: exact
    assert all(float(opt.state[p]["step"]) == 2.0**24 for p in ps)
    assert all(opt._host_int(opt.state[p]["step"]) == 2**24 for p in ps)
    _step(opt, ps, grads[2])  # float32: 2^24 + 1 rounds to 2^24, as torch's AdamW count does
    assert all(float(opt.state[p]["step"]) == 2.0**24 for p in ps)
    assert all(opt._host_int(opt.state[p]["step"]) == 2**24 for p in ps)


def test_bucketed_reference_backend_counts_and_matches_per_parameter():
    """The reference backend takes the same bucketed path (same op counts) and the same
    numbers as the per-parameter path across refreshes, with mirrors in use."""
    grads = _grads(7)
    out = []
    for foreach in (None, False):
        ps = _params()
        opt = _make(GaLoreAdamW, ps, foreach=foreach)
        with use_backend("reference"):
            for g in grads:
                _step(opt, ps, g)
        out.append((ps, opt))
    (pa, oa), (pb, ob) = out
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert torch.equal(oa.state[x]["step"], ob.state[y]["step"])


def test_step_suite_host_cost_rows(tmp_path):
    """``python -m bench --suite step`` gains the ``host_cost`` rows (counts in the note) and
    the host-cost targets; in a tiny run: the targeted optimizers and the two baselines."""
    from bench import bench_step
    from bench.harness import Ctx

    ctx = Ctx(torch.device("cpu"), torch.float32, quick=True, tiny=True, out=tmp_path, log=lambda *a: None)
    bench_step._host_cost(ctx)
    rows = {r.provider: r for r in ctx.rows if r.kernel == "host_cost" and not r.skipped}
    assert set(rows) == {"torch-adamw-fused", "torch-adamw-foreach", *host_cost_targets()}
    want = "2 lk op calls, 2 aten ops (0 host reads)" if _native_probe() else "2 lk op calls, 6 aten ops (1 host reads)"
    assert rows["ours-GaLoreAdamW"].note.startswith(want), rows["ours-GaLoreAdamW"].note
    assert all(r.median_ms > 0 for r in rows.values())
    texts = [t.text for t in ctx.targets]
    assert any("ours-DCTAdamW host-cost step time / torch-adamw-foreach" in t for t in texts)
    counts = {t.text.split()[0]: t for t in ctx.targets if "op calls per non-refresh step" in t.text}
    assert set(counts) == set(host_cost_targets())
    assert all(counts[n].measured == 2 and counts[n].verdict() == "met" for n in ("ours-GaLoreAdamW", "ours-DCTAdamW"))


def host_cost_targets():
    from bench import host_cost

    return host_cost.TARGETS


@pytest.mark.parametrize("cls", CLASSES)
def test_fresh_gradients_keep_the_validation_cached(cls, monkeypatch):
    """A real loop (backward, then zero_grad(set_to_none=True): new gradient tensors every
    step): after the first bucketed step the op's structural validation is not run again,
    and the weights match the per-parameter path bit for bit."""
    from lowrank_kernels.ops import _checks as C

    calls = []
    orig = C.check_no_overlap
    monkeypatch.setattr(C, "check_no_overlap", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    gen = torch.Generator().manual_seed(4)
    xs = {s[1]: torch.randn(5, s[1], generator=gen) for s in SHAPES}
    runs = []
    for foreach in (None, False):
        ps = _params()
        opt = _make(cls, ps, foreach=foreach)
        full = []
        for t in range(6):
            loss = sum((xs[p.shape[1]] @ p.T).square().mean() * (1 + 0.1 * t) for p in ps)
            loss.backward()
            before = len(calls)
            opt.step()
            opt.zero_grad(set_to_none=True)
            full.append(len(calls) - before)
        runs.append((ps, full))
    (pa, full_bucketed), (pb, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    # Steps 1 and 4 refresh (per parameter); step 2 validates the buckets in full; steps 3 and 6
    # are cached. Step 5 validates again only if its new gradients landed at other addresses: a
    # refresh writes the projectors in place, so they keep the key's data pointers.
    assert full_bucketed[2] == 0 and full_bucketed[5] == 0, full_bucketed
    assert full_bucketed[1] > 0, full_bucketed


def test_readme_renders_the_host_cost_table(tmp_path):
    """bench/readme.py puts bench/results/host_cost-<device>.txt (stamps + table) in the README."""
    from bench import readme

    res = tmp_path / "bench" / "results"
    res.mkdir(parents=True)
    (res / "host_cost-cpu.txt").write_text("# python -m bench.host_cost --out x\n# git abc, date, device: X\n"
                                           "header line\nours-GaLoreAdamW 2 6\n\nverdict: met\n")
    text = readme.render(res, tmp_path)
    assert "### Host cost of a step (cpu)" in text
    assert "`python -m bench.host_cost --out x`; git abc, date, device: X" in text
    assert "```\nheader line\nours-GaLoreAdamW 2 6\n\nverdict: met\n```" in text


def test_bfloat16_step_counts_are_not_mirrored():
    """A bfloat16 count (from an odd checkpoint) stops growing at 256: no mirror, the tensor
    is read, as without mirrors."""
    ps = _params()
    opt = _make(GaLoreAdamW, ps, update_proj_gap=10**9)
    grads = _grads(3)
    _step(opt, ps, grads[0])
    for p in ps:
        opt.state[p]["step"] = torch.tensor(255.0, dtype=torch.bfloat16)
    _step(opt, ps, grads[1])  # 256: exact
    _step(opt, ps, grads[2])  # 256 + 1 rounds to 256 in bfloat16
    for p in ps:
        assert float(opt.state[p]["step"]) == 256.0
        assert opt._host_int(opt.state[p]["step"]) == 256
