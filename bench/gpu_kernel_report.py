"""What the GPU runtime reports for the Triton kernels it compiled (registers, spills, shared memory).

``python -m bench.gpu_kernel_report [--compile-csv FILE] [--out FILE.csv] [--tiny]``

Runs every op family once through the public ops on CUDA (projection: dense, DCT and INT4
projectors, both sides, float32 and bfloat16, a small odd shape and a LLaMA shape at rank
512; batched and single DCT scores; every quant op), then walks the Triton JIT caches of
``lowrank_kernels.kernels.*`` and writes one row per compiled kernel with the columns of
``python -m lowrank_kernels.compile_check`` (``kernel,variant,config,arch,registers,
spills,shared_bytes,status``; ``variant`` is ``runtime``, ``arch`` is ``runtime-sm<NN>``).
With ``--compile-csv`` the rows are appended to that table (so one file holds the ahead-of-
time table and the runtime's report) and each runtime kernel is matched by name to the
ahead-of-time rows: a runtime kernel that spills, exceeds the arch's shared memory, or is
missing from the compile table fails the check (exit status 1). (Configs are printed for
reading; the two tables label them differently, so they are not matched.)

``--tiny`` (CPU, Triton interpreter): runs the same launches at tiny sizes; the interpreter
compiles nothing, so it only checks that the launches run and the script works.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import pkgutil
import sys

import torch

COLUMNS = ["kernel", "variant", "config", "arch", "registers", "spills", "shared_bytes", "status"]
SMEM_LIMIT = {80: 163 * 1024 + 1024, 86: 99 * 1024 + 1024, 89: 99 * 1024 + 1024, 90: 227 * 1024 + 1024}


def exercise(device, tiny: bool) -> int:
    """Launch every op family once per dtype/side/projector kind; returns the number of calls."""
    from lowrank_kernels import ops

    shapes = [(37, 29, 4)] if tiny else [(123, 77, 8), (2048, 5461, 512)]
    dtypes = [torch.float32, torch.bfloat16]
    calls = 0
    for m, n, r in shapes:
        for dt in dtypes:
            for side in ("right", "left"):
                g = torch.randn(m, n, device=device).to(dt)
                size = n if side == "right" else m
                dense = torch.linalg.qr(torch.randn(size, r, device=device))[0]
                dense = (dense.T if side == "right" else dense).contiguous().to(dt)
                projs = [dense,
                         ops.DCTProjector(ops.dct_basis(size, dt, device),
                                          torch.randperm(size, device=device)[:r].to(torch.int32)),
                         ops.Int4Projector.quantize(dense.float(), 256 if size * r >= 256 else 2 * (size * r // 4))]
                for proj in projs:
                    w = torch.randn(m, n, device=device).to(dt)
                    lshape = ops.lowrank_shape(m, n, r, side)
                    ea, es = torch.zeros(lshape, device=device), torch.zeros(lshape, device=device)
                    ops.project_update_backproject_(w, g, proj, ea, es, side=side, lr=1e-3, beta1=0.9, beta2=0.999,
                                                    eps=1e-8, step=1, weight_decay=0.0, scale=0.25)
                    nrm = ops.project_adam_(g, proj, ea, es, side=side)
                    ops.backproject_apply_(w, nrm, proj, side=side, alpha=-1e-3)
                    calls += 3
                for norm in (1, 2):
                    ops.dct_scores(g, side=side, norm=norm)
                    ops.dct_scores(torch.stack([g, g]), side=side, norm=norm)
                    ops.dct_score_topk(g, r, side=side, norm=norm)
                    calls += 3
            x = torch.randn(m, n, device=device).to(dt)
            packed, s, mn = ops.int4_pack(x.float(), 64)
            ops.int4_unpack(packed, s, mn, (m, n), dt, group_size=64)
            q, s8, m8 = ops.int8_quantize(x, 64)
            ops.int8_dequantize(q, s8, m8, group_size=64, dtype=dt)
            ops.int8_update_sr_(q, s8, m8, torch.randn(m, n, device=device), decay=0.99, alpha=0.1, seed=3,
                                group_size=64)
            calls += 5
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return calls


def _jit_functions():
    """(name, JITFunction) of every Triton kernel defined in lowrank_kernels.kernels.*."""
    from triton.runtime.jit import JITFunction

    import lowrank_kernels.kernels as pkg

    seen = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            fn = obj
            for _ in range(4):  # Autotuner / Heuristics wrap a JITFunction in .fn
                if isinstance(fn, JITFunction):
                    break
                fn = getattr(fn, "fn", None)
            if isinstance(fn, JITFunction):
                seen[id(fn)] = (fn.__name__, fn)
    return list(seen.values())


def _compiled(fn):
    caches = getattr(fn, "device_caches", None)
    if caches:
        for entry in caches.values():
            kc = entry[0] if isinstance(entry, tuple) else entry
            yield from kc.values()
    else:
        for kc in getattr(fn, "cache", {}).values():
            yield from kc.values()


def _config(kernel) -> str:
    consts = getattr(getattr(kernel, "src", None), "constants", None) or {}
    parts = []
    for k, v in consts.items():
        name = k if isinstance(k, str) else str(k)
        if name.upper() == name and not name.startswith("_"):
            parts.append(f"{name}={v}")
    md = kernel.metadata
    parts.append(f"num_warps={getattr(md, 'num_warps', '?')}")
    parts.append(f"num_stages={getattr(md, 'num_stages', '?')}")
    return " ".join(sorted(parts))


def runtime_rows(arch: int) -> list:
    rows = []
    for name, fn in _jit_functions():
        for k in _compiled(fn):
            if hasattr(k, "_init_handles"):
                k._init_handles()
            regs, spills = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
            shared = getattr(k.metadata, "shared", None)
            status = "ok"
            if spills:
                status = "spills"
            elif shared is not None and arch in SMEM_LIMIT and shared > SMEM_LIMIT[arch]:
                status = "smem"
            rows.append(dict(kernel=name, variant="runtime", config=_config(k), arch=f"runtime-sm{arch}",
                             registers=regs, spills=spills, shared_bytes=shared, status=status))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_kernel_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile-csv", default=None, help="compile_check CSV: append the runtime rows to it and match")
    ap.add_argument("--out", default=None, help="CSV for the runtime rows (default: --compile-csv, else stdout)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at tiny sizes (Triton interpreter)")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernel_report: no CUDA device (use --tiny for a CPU dry run)")
        return 1
    calls = exercise(device, args.tiny)
    if device == "cpu":
        print(f"gpu_kernel_report: {calls} op calls ran on the CPU; nothing is compiled there, no table")
        return 0
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    rows = runtime_rows(arch)
    bad = [r for r in rows if r["status"] != "ok"]
    unmatched = []
    if args.compile_csv:
        with open(args.compile_csv, newline="") as f:
            aot = list(csv.DictReader(f))
        aot_kernels = {r["kernel"] for r in aot}
        unmatched = [r for r in rows if r["kernel"] not in aot_kernels]
        for r in unmatched:
            r["status"] = "not in compile table"
    out = args.out or args.compile_csv
    if out:
        mode = "a" if (out == args.compile_csv) else "w"
        with open(out, mode, newline="") as f:
            wr = csv.DictWriter(f, fieldnames=COLUMNS)
            if mode == "w":
                wr.writeheader()
            wr.writerows(rows)
    print(f"{'kernel':40s} {'regs':>5s} {'spills':>6s} {'shared':>7s}  config")
    for r in rows:
        print(f"{r['kernel']:40s} {r['registers']!s:>5s} {r['spills']!s:>6s} {r['shared_bytes']!s:>7s}  {r['config']}"
              f"{'' if r['status'] == 'ok' else '  <-- ' + r['status']}")
    print(f"gpu_kernel_report: {calls} op calls, {len(rows)} compiled kernels on sm_{arch}; "
          f"{len(bad)} spill or exceed shared memory, {len(unmatched)} not in the compile table")
    if not rows:
        print("gpu_kernel_report: FAIL: no compiled kernel found in the Triton caches")
        return 1
    return 1 if (bad or unmatched) else 0


if __name__ == "__main__":
    sys.exit(main())
