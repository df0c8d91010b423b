"""Problem sizes of a run: LLaMA shapes on GPU, scaled down on CPU; shape helpers."""
from __future__ import annotations

import dataclasses
from typing import List

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Stack:
    """A stack of LLaMA-shaped layers: per layer 4 x (h x h), 2 x (i x h), 1 x (h x i)."""

    hidden: int
    inter: int
    layers: int

    def shapes(self) -> List[tuple]:
        h, i = self.hidden, self.inter
        return [(h, h)] * 4 * self.layers + [(i, h)] * 2 * self.layers + [(h, i)] * self.layers

    @property
    def numel(self) -> int:
        return sum(m * n for m, n in self.shapes())

    def label(self) -> str:
        """e.g. ``4L-h2048-i5461``: layers, hidden width, MLP width."""
        return f"{self.layers}L-h{self.hidden}-i{self.inter}"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (they depend on device and mode)."""

    proj_shapes: tuple  # (m, n) for the projection and refresh suites
    proj_ranks: tuple
    refresh_rank: int
    stack: Stack
    stack_rank: int
    svd_max_numel: int  # exact SVD only up to this many elements per matrix
    roof_matmul: int  # square GEMM size for the matmul rate
    roof_copy_mb: int  # buffer size for the copy bandwidth
    note: str = ""


def sizes(device: torch.device, quick: bool, tiny: bool) -> Sizes:
    """The sizes of the run: LLaMA shapes on GPU, scaled down on CPU."""
    if tiny:  # the test suite's smoke run: seconds on a loaded 2-core CPU
        return Sizes(((48, 40), (24, 72)), (4,), 8, Stack(32, 48, 1), 4, 10**9, 128, 4,
                     "tiny smoke-test sizes")
    # Largest first: the goals are stated at 4096x11008, and a run cut short by its
    # time budget should have measured those.
    llama = ((4096, 11008), (4096, 4096), (2048, 5632), (2048, 2048))
    if device.type == "cuda":
        if quick:
            return Sizes(llama[::3], (512,), 512, Stack(2048, 5461, 1), 512, 4096 * 11008, 8192, 1024,
                         "quick: 2 shapes, 1-layer stack")
        return Sizes(llama, (512, 128), 512, Stack(2048, 5461, 4), 512, 4096 * 11008, 8192, 1024)
    # CPU: the LLaMA shapes divided by 4 (rank too), a 1-layer stack of that width.
    quarter = tuple((m // 4, n // 4) for m, n in llama)
    if quick:
        return Sizes(quarter[::3], (128,), 128, Stack(256, 683, 1), 64, 1024 * 2752, 1024, 128,
                     "CPU quick: LLaMA shapes / 4, 2 of them; stack 1 layer of width 256")
    return Sizes(quarter, (128, 32), 128, Stack(512, 1365, 1), 128, 1024 * 2752, 1024, 256,
                 "CPU: LLaMA shapes / 4 (2048x2048 -> 512x512 ... 4096x11008 -> 1024x2752), ranks / 4, "
                 "stack 1 layer of width 512 (exact SVD of the full-size matrices would take minutes on a CPU)")


def side_of(m: int, n: int) -> str:
    """GaLore's "std" choice: project the smaller side."""
    return "right" if m >= n else "left"


def lowrank_shape(m: int, n: int, rank: int) -> tuple:
    return (m, rank) if side_of(m, n) == "right" else (rank, n)


def proj_shape(m: int, n: int, rank: int) -> tuple:
    return (rank, n) if side_of(m, n) == "right" else (m, rank)


def fmt_shape(*dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def gpu_check_args(prog: str, argv=None):
    """The command line of a suite's ``--gpu-check`` mode (``bench/gpu_check.sh`` step 5):
    ``--tiny`` (CPU dry run at tiny sizes), ``--out`` (CSV of the rows), ``--reps``.

    Returns ``(args, device)``: CUDA, or the CPU under ``--tiny``; ``(args, None)`` after
    saying so when CUDA is wanted but absent (the caller exits 1)."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {prog} --gpu-check")
    ap.add_argument("--gpu-check", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at tiny sizes")
    ap.add_argument("--out", default=None, help="CSV of the rows")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{prog.rsplit('.', 1)[-1]} --gpu-check: no CUDA device (use --tiny for a CPU dry run)")
        return args, None
    return args, device
