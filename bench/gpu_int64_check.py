"""Int64 offsets on the GPU: kernels must index tensors of more than 2^31 elements correctly.

``python -m bench.gpu_int64_check [--tiny] [--device D] [--out FILE.csv]``

1. **Back-projection into a huge weight**: ``ops.backproject_apply_`` (``W <- decay W +
   alpha back(N)``, rank 8) into a bfloat16 weight of more than 2^31 elements, both
   sides (right: ``65536 x 32771``, ``N`` is ``m x 8``; left: ``32771 x 65536``).
   Rows are sampled (the first, the last, the rows around the 2^31-element boundary
   and random ones) and saved before the call; each sampled row of ``W_new`` is checked
   against a float64 computation of that row, elementwise: the error may be at most
   2x that of plain PyTorch computing the same row in bfloat16 plus one bfloat16
   rounding (flash-attention's rule; a wrong int32 offset writes garbage or nothing).
2. **Batched DCT scores of a 48 x 4096 x 11008 bfloat16 stack** (``ops.dct_scores``,
   right side, L1): the stack has 2.16e9 elements, so matrix 47 starts past 2^31.
   Each matrix's scores are checked against a float64 computation (the same rule,
   against plain PyTorch's float32 product of the bfloat16 inputs, and a relative
   error bound), so a matrix read from a wrapped offset fails by name.
3. **The grouped kernels** (one launch for a list): ``ops.foreach_project_update_backproject_``
   (grouped project + Adam, then grouped back-projection; rank 8, bf16 weights and gradients)
   on a list holding one weight of more than 2^31 elements (``65536 x 32771`` right side,
   ``32771 x 65536`` left side) and a small one, with float32 moments and with 8-bit
   moments (uint8 codes + float32 block maxima); ``ops.adam_foreach_update_`` (grouped Adam)
   on a list holding a ``65536 x 32771`` bf16 ``R`` and a small one, float32 and 8-bit
   moments. Every check runs on random weights, gradients and moments (never zeros) and
   compares a sample against the reference backend on the same sample: the sampled rows
   (right side, Adam: a row depends only on its own row) or 256-column blocks (left side:
   ``N = P^T G`` column by column; blocks of the 8-bit format lie inside rows) of the big
   entry, cut out as a small problem, and the whole small entry. Weights within one bf16
   ulp (another summation order rounds the other way at most), float32 moments and ``N``
   within ``1e-4`` relative (``1e-5`` of the largest), 8-bit codes equal or one apart on at
   most 1% of the elements, block maxima as the float32 moments. The sample covers the first
   and last rows and those around the 2^31-element boundary, so a wrapped offset fails.

Prints ``check int64-grouped: pass|fail <figure>`` last (every check above counts).

``--tiny`` runs the same code at tiny sizes (CPU by default: C++ / reference / Triton
interpreter), so the test suite keeps this script working; it checks correctness, not
int64 offsets. Prints one line per check and a summary; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time

import torch


def _sample_rows(m: int, n: int, count: int, gen: torch.Generator) -> list:
    """First, last, rows around the 2^31-element boundary (when inside), and random rows."""
    rows = {0, m - 1}
    b = (2**31) // n
    rows.update(r for r in (b - 1, b, b + 1) if 0 <= r < m)
    rows.update(torch.randint(0, m, (count,), generator=gen).tolist())
    return sorted(rows)


def _max_err_ratio(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, atol: float) -> float:
    """max over elements of |ours - truth| / (2 |plain - truth| + atol): <= 1 passes."""
    e_ours = (ours.double() - truth).abs()
    e_plain = (plain.double() - truth).abs()
    return float((e_ours / (2 * e_plain + atol)).max())


def check_backproject(side: str, m: int, n: int, rank: int, device, dtype, samples: int, log) -> dict:
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    gen = torch.Generator().manual_seed(1234)
    w = torch.empty(m, n, dtype=dtype, device=device)
    # Random content without an m x n float32 temporary: fill row blocks.
    block = max(1, (1 << 26) // n)
    for r0 in range(0, m, block):
        r1 = min(m, r0 + block)
        w[r0:r1].copy_(torch.randn(r1 - r0, n, device=device, dtype=torch.float32))
    if side == "right":
        update = torch.randn(m, rank, device=device, dtype=torch.float32)
        proj = torch.linalg.qr(torch.randn(n, rank, device=device, dtype=torch.float32))[0].T.contiguous().to(dtype)
    else:
        update = torch.randn(rank, n, device=device, dtype=torch.float32)
        proj = torch.linalg.qr(torch.randn(m, rank, device=device, dtype=torch.float32))[0].contiguous().to(dtype)
    rows = _sample_rows(m, n, samples, gen)
    idx = torch.tensor(rows, device=device)
    before = w.index_select(0, idx).clone()
    alpha, decay = -0.37, 0.99
    backend = reg.resolve_backend(reg.OPS["projection_backproject_apply"], torch.device(device))
    t0 = time.perf_counter()
    ops.backproject_apply_(w, update, proj, side=side, alpha=alpha, decay=decay)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    after = w.index_select(0, idx)
    pd = proj.double()
    if side == "right":
        back = update.index_select(0, idx).double() @ pd
        back_plain = update.index_select(0, idx).to(dtype) @ proj
    else:
        back = pd.index_select(0, idx) @ update.double()
        back_plain = proj.index_select(0, idx) @ update.to(dtype)
    truth = decay * before.double() + alpha * back
    plain = (decay * before + alpha * back_plain).to(dtype)  # PyTorch in the weight's dtype
    ulp = torch.finfo(dtype).eps
    ratio = _max_err_ratio(after, plain, truth, atol=ulp * float(truth.abs().max()) * 0.5 + 1e-6)
    finite = bool(torch.isfinite(after).all())
    ok = finite and ratio <= 1.0
    res = dict(check=f"backproject_apply_ {side}", shape=f"{m}x{n}", numel=m * n, rank=rank, dtype=str(dtype),
               backend=backend, rows_checked=len(rows), max_err_ratio=f"{ratio:.3g}", seconds=f"{secs:.3f}",
               status="ok" if ok else "FAIL", rel_err="")
    log(res)
    del w, before, after
    return res


def check_dct_stack(batch: int, m: int, n: int, device, dtype, log) -> list:
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    stack = torch.empty(batch, m, n, dtype=dtype, device=device)
    for b in range(batch):
        stack[b].copy_(torch.randn(m, n, device=device, dtype=torch.float32))
    backend = reg.resolve_backend(reg.OPS["dct_scores"], torch.device(device))
    t0 = time.perf_counter()
    scores = ops.dct_scores(stack, side="right", norm=1)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    basis = ops.dct_basis(n, dtype, device)
    basis64 = basis.double()
    out = []
    for b in range(batch):
        g = stack[b]
        truth = (g.double() @ basis64.T).abs().sum(0)
        plain = (g.float() @ basis.float().T).abs().sum(0)  # PyTorch: float32 product of the bf16 inputs
        ours = scores[b].double()
        rel = float((ours - truth).norm() / truth.norm())
        ratio = _max_err_ratio(ours, plain, truth, atol=1e-5 * float(truth.abs().max()))
        ok = bool(torch.isfinite(ours).all()) and ratio <= 1.0 and rel < 1e-3
        res = dict(check=f"dct_scores batched [{b}]", shape=f"{batch}x{m}x{n}", numel=batch * m * n, rank="",
                   dtype=str(dtype), backend=backend, rows_checked=n, max_err_ratio=f"{ratio:.3g}",
                   seconds=f"{secs:.3f}" if b == 0 else "", status="ok" if ok else "FAIL", rel_err=f"{rel:.2e}")
        out.append(res)
        if not ok or b in (0, batch - 1) or batch <= 4:
            log(res)
    return out


def _fill(t: torch.Tensor, fn) -> torch.Tensor:
    """Fill a big 2-D tensor block by block with ``fn(rows, cols)`` (no full-size float32 temporary)."""
    rows, cols = t.shape
    block = max(1, (1 << 26) // max(cols, 1))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        t[r0:r1].copy_(fn(r1 - r0, cols))
    return t


def _randn(shape, dtype, device, scale=1.0) -> torch.Tensor:
    return _fill(torch.empty(shape, dtype=dtype, device=device),
                 lambda r, c: torch.randn(r, c, device=device).mul_(scale))


def _moments(shape, q8: bool, device, block_size: int):
    """Random moments of ``shape`` (never zeros): ``(exp_avg, exp_avg_sq, m_absmax, v_absmax)``."""
    if q8:
        ab = (shape[0], -(-shape[1] // block_size))
        m = _fill(torch.empty(shape, dtype=torch.uint8, device=device),
                  lambda r, c: torch.randint(0, 256, (r, c), device=device, dtype=torch.uint8))
        v = _fill(torch.empty(shape, dtype=torch.uint8, device=device),
                  lambda r, c: torch.randint(128, 256, (r, c), device=device, dtype=torch.uint8))
        return m, v, torch.rand(ab, device=device).add_(0.5), torch.rand(ab, device=device).mul_(0.1).add_(0.01)
    m = _randn(shape, torch.float32, device, 0.1)
    v = _fill(torch.empty(shape, dtype=torch.float32, device=device),
              lambda r, c: torch.rand(r, c, device=device).mul_(0.01))
    return m, v, None, None


def _code_check(got: torch.Tensor, want: torch.Tensor) -> float:
    """8-bit codes: equal, or one apart on at most 1% of the elements; the ratio to that bound."""
    d = (got.int() - want.int()).abs()
    if d.numel() == 0:
        return 0.0
    if int(d.max()) > 1:
        return float("inf")
    return float((d > 0).double().mean()) / 0.01


def _close(got: torch.Tensor, want: torch.Tensor, rtol=1e-4, atol_frac=1e-5) -> float:
    g, w = got.double(), want.double()
    if w.numel() == 0:
        return 0.0
    atol = atol_frac * float(w.abs().max())
    return float(((g - w).abs() / (rtol * w.abs() + atol + 1e-30)).max())


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, dtype) -> float:
    """max |got - want| in ulps of ``dtype`` at the larger of |want| and |before|."""
    fi = torch.finfo(dtype)
    mag = torch.maximum(want.double().abs(), before.double().abs()).clamp_min(fi.tiny)
    _, e = torch.frexp(mag)
    unit = torch.ldexp(torch.full_like(mag, fi.eps), e - 1)
    return float(((got.double() - want.double()).abs() / unit).max()) if got.numel() else 0.0


def _col_blocks(n: int, block: int, count: int, gen: torch.Generator) -> list:
    """Aligned ``block``-column blocks: the first, the last and ``count`` random ones (sorted column indices)."""
    nb = -(-n // block)
    picks = {0, nb - 1, *torch.randint(0, nb, (count,), generator=gen).tolist()}
    cols = []
    for b in sorted(picks):
        cols.extend(range(b * block, min(n, (b + 1) * block)))
    return cols


def check_grouped_project(side: str, big: tuple, small: tuple, rank: int, q8: bool, device, dtype, samples: int,
                          log) -> dict:
    """The grouped project + Adam and back-projection on ``[big, small]`` (see the module doc)."""
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    torch.manual_seed(4321)
    gen = torch.Generator().manual_seed(99)
    bs = 256
    shapes = [big, small]
    ws = [_randn(s, dtype, device, 0.02) for s in shapes]
    gs = [_randn(s, dtype, device) for s in shapes]
    ps = [torch.randn(rank, s[1], device=device).to(dtype) if side == "right"
          else torch.randn(s[0], rank, device=device).to(dtype) for s in shapes]
    low = [ops.low_rank_shape(m, n, rank, side) for m, n in shapes]
    mom = [_moments(ls, q8, device, bs) for ls in low]
    m, n = big
    if side == "right":  # rows of the big entry: W, G, moments and their block maxima, row for row
        sel = _sample_rows(m, n, samples, gen)
        idx = torch.tensor(sel, device=device)

        def cut(t, dim_rows=True):
            return t.index_select(0, idx).clone()
        cut_w = cut_m = cut
    else:  # aligned column blocks: W and G columns, moment columns (r x n), absmax blocks
        sel = _col_blocks(n, bs, max(1, samples // 16), gen)
        idx = torch.tensor(sel, device=device)
        bidx = torch.tensor(sorted({c // bs for c in sel}), device=device)

        def cut_w(t):
            return t.index_select(1, idx).contiguous()

        def cut_m(t, absmax=False):
            return t.index_select(1, bidx if absmax else idx).contiguous()
    sub_w, sub_g = cut_w(ws[0]), cut_w(gs[0])
    if q8 and side == "right":
        sub_mom = [cut_m(t) for t in mom[0]]
    elif q8:
        sub_mom = [cut_m(mom[0][0]), cut_m(mom[0][1]), cut_m(mom[0][2], True), cut_m(mom[0][3], True)]
    else:
        sub_mom = [cut_m(mom[0][0]), cut_m(mom[0][1]), None, None]
    small_before = [ws[1].clone(), [t.clone() if t is not None else None for t in mom[1]]]
    hyper = dict(side=side, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=10, weight_decay=0.1, scale=0.25)

    def call(wl, gl, pl, ml):
        extra = dict(m_absmax=[x[2] for x in ml], v_absmax=[x[3] for x in ml], block_size=bs) if q8 else {}
        ops.foreach_project_update_backproject_(wl, gl, pl, [x[0] for x in ml], [x[1] for x in ml], **hyper, **extra)

    backend = reg.resolve_backend(reg.OPS["projection_foreach_project_update_backproject"], torch.device(device))
    t0 = time.perf_counter()
    call(ws, gs, ps, mom)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    # the reference on the cut-out problem and the small entry (copies: the reference writes them)
    want_w = [sub_w.clone(), small_before[0].clone()]
    want_m = [[t.clone() if t is not None else None for t in sub_mom],
              [t.clone() if t is not None else None for t in small_before[1]]]
    with ops.use_backend("reference"):
        call(want_w, [sub_g, gs[1]], ps, want_m)
    got_w = [cut_w(ws[0]), ws[1]]
    if side == "right":
        got_m = [[cut_m(t) if t is not None else None for t in mom[0]], mom[1]]
    else:
        got_m = [[cut_m(mom[0][0]), cut_m(mom[0][1])] + ([cut_m(mom[0][2], True), cut_m(mom[0][3], True)] if q8
                                                          else [None, None]), mom[1]]
    ratio = 0.0
    for i in range(2):
        before = sub_w if i == 0 else small_before[0]
        ratio = max(ratio, _bf16_ulps(got_w[i], want_w[i], before, dtype))  # <= 1 ulp
        for k in range(2):
            ratio = max(ratio, _code_check(got_m[i][k], want_m[i][k]) if q8 else _close(got_m[i][k], want_m[i][k]))
        if q8:
            for k in (2, 3):
                ratio = max(ratio, _close(got_m[i][k], want_m[i][k]))
    finite = all(bool(torch.isfinite(w).all()) for w in got_w)
    ok = finite and ratio <= 1.0
    res = dict(check=f"grouped project+Adam {'8-bit' if q8 else 'fp32'} {side}", shape=f"{m}x{n}+{small[0]}x{small[1]}",
               numel=m * n, rank=rank, dtype=str(dtype), backend=backend, rows_checked=len(sel),
               max_err_ratio=f"{ratio:.3g}", seconds=f"{secs:.3f}", status="ok" if ok else "FAIL", rel_err="")
    log(res)
    del ws, gs, mom
    return res


def check_grouped_adam(big: tuple, small: tuple, q8: bool, device, dtype, samples: int, log) -> dict:
    """Grouped Adam (``ops.adam_foreach_update_``) on ``[R big, R small]``; sampled rows vs the reference."""
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    torch.manual_seed(8765)
    gen = torch.Generator().manual_seed(98)
    bs = 256
    rs = [_randn(big, dtype, device), _randn(small, dtype, device)]
    mom = [_moments(big, q8, device, bs), _moments(small, q8, device, bs)]
    m, n = big
    rows = _sample_rows(m, n, samples, gen)
    idx = torch.tensor(rows, device=device)
    sub_mom = [t.index_select(0, idx).clone() if t is not None else None for t in mom[0]]
    small_mom = [t.clone() if t is not None else None for t in mom[1]]

    def call(rl, ml):
        extra = dict(m_absmax=[x[2] for x in ml], v_absmax=[x[3] for x in ml], block_size=bs) if q8 else {}
        return ops.adam_foreach_update_(rl, [x[0] for x in ml], [x[1] for x in ml], beta1=0.9, beta2=0.999, eps=1e-8,
                                        **extra)

    backend = reg.resolve_backend(reg.OPS["adam_foreach_update"], torch.device(device))
    t0 = time.perf_counter()
    out = call(rs, mom)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    with ops.use_backend("reference"):
        want = call([rs[0].index_select(0, idx), rs[1]], [sub_mom, small_mom])
    got_n = [out[0].index_select(0, idx), out[1]]
    got_m = [[t.index_select(0, idx) if t is not None else None for t in mom[0]], mom[1]]
    want_m = [sub_mom, small_mom]
    ratio = 0.0
    for i in range(2):
        ratio = max(ratio, _close(got_n[i], want[i]))
        for k in range(2):
            ratio = max(ratio, _code_check(got_m[i][k], want_m[i][k]) if q8 else _close(got_m[i][k], want_m[i][k]))
        if q8:
            for k in (2, 3):
                ratio = max(ratio, _close(got_m[i][k], want_m[i][k]))
    ok = bool(torch.isfinite(got_n[0]).all()) and ratio <= 1.0
    res = dict(check=f"grouped adam {'8-bit' if q8 else 'fp32'}", shape=f"{m}x{n}+{small[0]}x{small[1]}", numel=m * n,
               rank="", dtype=str(dtype), backend=backend, rows_checked=len(rows), max_err_ratio=f"{ratio:.3g}",
               seconds=f"{secs:.3f}", status="ok" if ok else "FAIL", rel_err="")
    log(res)
    del rs, mom, out
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_int64_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU dry run of the same code)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--out", default=None, help="CSV file for the results")
    ap.add_argument("--skip-dct", action="store_true", help="leave out the DCT stack check")
    ap.add_argument("--skip-grouped", action="store_true", help="leave out the grouped-kernel checks")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_int64_check: no CUDA device (use --tiny for a CPU dry run)")
        return 1
    dtype = torch.bfloat16
    if args.tiny:
        bp = [("right", 300, 77, 8), ("left", 77, 300, 8)]
        grouped = [("right", (300, 77), (40, 24)), ("left", (77, 300), (24, 40))]
        adam = ((60, 300), (5, 77))
        dct = (3, 40, 56)
        samples = 16
    else:
        bp = [("right", 65536, 32771, 8), ("left", 32771, 65536, 8)]
        grouped = [("right", (65536, 32771), (300, 77)), ("left", (32771, 65536), (77, 300))]
        adam = ((65536, 32771), (40, 300))
        dct = (48, 4096, 11008)
        samples = 64
    results = []
    cuda = torch.device(device).type == "cuda"
    t_start = time.perf_counter()

    def log(r):
        print(f"{r['status']:4s}  {r['check']:26s} {r['shape']:>16s} ({r['numel'] / 2**31:.2f} x 2^31 elements) "
              f"backend={r['backend']} max_err_ratio={r['max_err_ratio']}"
              f"{' rel_err=' + r['rel_err'] if r['rel_err'] else ''} {r['seconds']}s", flush=True)

    def guarded(name, fn):
        """Run one check; an exception is a failed row (the remaining checks still run)."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            out = dict(check=name, shape="", numel=0, rank="", dtype=str(dtype), backend="", rows_checked=0,
                       max_err_ratio="", seconds="", status="FAIL", rel_err=f"{type(e).__name__}: {str(e)[:200]}")
            print(f"FAIL  {name}: {out['rel_err']}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        return out if isinstance(out, list) else [out]

    for side, m, n, r in bp:
        results += guarded(f"backproject_apply_ {side}", lambda: check_backproject(side, m, n, r, device, dtype,
                                                                                    samples, log))
    if not args.skip_grouped:
        for side, big, small in grouped:
            for q8 in (False, True):
                results += guarded(f"grouped project+Adam {side}", lambda: check_grouped_project(
                    side, big, small, 8, q8, device, dtype, samples, log))
        for q8 in (False, True):
            results += guarded("grouped adam", lambda: check_grouped_adam(*adam, q8, device, dtype, samples, log))
    if not args.skip_dct:
        results += guarded("dct_scores batched", lambda: check_dct_stack(*dct, device, dtype, log))
    failed = [r for r in results if r["status"] != "ok"]
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(results[0]))
            wr.writeheader()
            wr.writerows(results)
    print(f"gpu_int64_check: {len(results) - len(failed)} ok, {len(failed)} failed")
    kinds = sorted({r["check"].split(" [")[0] for r in results})
    worst = max((float(r["max_err_ratio"]) for r in results if r["max_err_ratio"] not in ("", None)), default=0.0)
    what = "tiny sizes, no int64 offsets" if args.tiny else "more than 2^31 elements"
    print(f"check int64-grouped: {'fail' if failed else 'pass'} {len(results) - len(failed)}/{len(results)} ok "
          f"(worst error/tolerance {worst:.3g}; {', '.join(kinds)}; {what}; "
          f"{time.perf_counter() - t_start:.0f} s)" + (f"; failed: {', '.join(r['check'] for r in failed)}"
                                                        if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
