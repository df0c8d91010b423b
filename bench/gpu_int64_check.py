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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_int64_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU dry run of the same code)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--out", default=None, help="CSV file for the results")
    ap.add_argument("--skip-dct", action="store_true", help="only the back-projection check")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_int64_check: no CUDA device (use --tiny for a CPU dry run)")
        return 1
    dtype = torch.bfloat16
    if args.tiny:
        bp = [("right", 300, 77, 8), ("left", 77, 300, 8)]
        dct = (3, 40, 56)
        samples = 16
    else:
        bp = [("right", 65536, 32771, 8), ("left", 32771, 65536, 8)]
        dct = (48, 4096, 11008)
        samples = 64
    results = []

    def log(r):
        print(f"{r['status']:4s}  {r['check']:26s} {r['shape']:>16s} ({r['numel'] / 2**31:.2f} x 2^31 elements) "
              f"backend={r['backend']} max_err_ratio={r['max_err_ratio']}"
              f"{' rel_err=' + r['rel_err'] if r['rel_err'] else ''} {r['seconds']}s", flush=True)

    for side, m, n, r in bp:
        results.append(check_backproject(side, m, n, r, device, dtype, samples, log))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_dct:
        results.extend(check_dct_stack(*dct, device, dtype, log))
    failed = [r for r in results if r["status"] != "ok"]
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(results[0]))
            wr.writeheader()
            wr.writerows(results)
    print(f"gpu_int64_check: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
