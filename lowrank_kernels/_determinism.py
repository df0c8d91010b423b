"""Two fresh processes, one optimizer step sequence each: bitwise-equal results?

``python -m lowrank_kernels._determinism [--device cpu|cuda] [--backend B] [--steps N]``
starts two child processes (fresh Python interpreters, so nothing such as an autotuning
cache or a compiled-kernel choice is shared) that each build the same parameters and
gradients from fixed seeds, step :class:`~lowrank_kernels.optim.GaLoreAdamW` and
:class:`~lowrank_kernels.optim.DCTAdamW` through ``--steps`` steps (with a projector
refresh on the way), and report, per backend, a SHA-256 of the final weights (GaLore and
DCT) and of the DCT indices, plus the Triton tile configs each process launched
(``lowrank_kernels.kernels._launch.CHOSEN``). The parent prints both reports and exits
1 unless the digests are equal. ``bench/gpu_check.sh`` runs it on CUDA; the test suite
runs it on CPU (C++ backend and the Triton interpreter).

The optimizers must be deterministic run to run: the tile configs come from a table
(no timing) unless ``LOWRANK_KERNELS_TRITON_AUTOTUNE=1``, the DCT scores are summed in
a fixed order (no atomics), and top-k ties go to the lower index.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

SHAPES = ((96, 160), (200, 72), (64, 64))  # right side, left side, square; odd tile edges


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def child(device: str, backends, steps: int, dtype_name: str) -> dict:
    """Run both optimizers on each backend in this process; return the report (digests and chosen configs)."""
    import torch

    from lowrank_kernels.kernels import _launch  # noqa: F401  (CHOSEN lives there)
    from lowrank_kernels.ops import use_backend
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1234)
    w0 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    report = {}
    for backend in backends:
        for name, cls in (("galore", GaLoreAdamW), ("dct", DCTAdamW)):
            params = [torch.nn.Parameter(w.to(device=device, dtype=dtype)) for w in w0]
            opt = cls(params, lr=1e-2, weight_decay=0.01, rank=8, update_proj_gap=2, scale=0.5)
            with use_backend(backend):
                for step_grads in grads:
                    for p, g in zip(params, step_grads):
                        p.grad = g.to(device=device, dtype=dtype)
                    opt.step()
            report[f"{backend}/{name}_weights"] = _digest(params)
            if name == "dct":
                report[f"{backend}/dct_indices"] = _digest([opt.state[p]["indices"] for p in params])
    from lowrank_kernels.kernels import _launch as L

    report["configs"] = sorted(f"{k[0]} M={k[1]} N={k[2]} K={k[3]} bytes={list(k[4])} side={k[5]} mode={k[6]} "
                               f"arch={k[7]}: {v}" for k, v in L.CHOSEN.items())
    report["autotune"] = L.AUTOTUNE
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_kernels._determinism", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--backend", default=None,
                    help="comma-separated from reference, cpp, triton (default: triton on CUDA, cpp on CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend is None:
        args.backend = "triton" if args.device == "cuda" else "cpp"
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("reference", "cpp", "triton")]
    if bad or not backends:
        ap.error(f"--backend: unknown backend(s) {bad or '(none)'}; choose from reference, cpp, triton")
    if args.child:
        print(json.dumps(child(args.device, backends, args.steps, args.dtype)))
        return 0
    cmd = [sys.executable, "-m", "lowrank_kernels._determinism", "--child", "--device", args.device,
           "--backend", args.backend, "--steps", str(args.steps), "--dtype", args.dtype]
    reports = []
    for i in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            print(f"process {i} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}", file=sys.stderr)
            return 1
        reports.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"determinism: device={args.device} backend={args.backend} dtype={args.dtype} steps={args.steps} "
          f"autotune={reports[0]['autotune']}")
    for line in reports[0]["configs"]:
        print(f"  config {line}")
    ok = True
    keys = [k for k in reports[0] if k != "autotune"]
    if sorted(keys) != sorted(k for k in reports[1] if k != "autotune"):
        print("  the two processes report different keys", file=sys.stderr)
        return 1
    for key in keys:
        same = reports[0][key] == reports[1][key]
        ok &= same
        shown = reports[0][key] if key != "configs" else f"{len(reports[0][key])} launches"
        print(f"  {key}: {'equal' if same else 'DIFFERENT'} ({shown})")
    print("determinism: PASS" if ok else "determinism: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
