"""Launch plumbing shared by the Triton kernel families (projection, dct, quant, adam).

Everything a launcher decides besides its kernel's arguments lives here, once:

* **Interpreter flag** (:data:`INTERPRET`): ``TRITON_INTERPRET=1`` read once at import
  (Triton decides at decoration time whether it interprets; never query CUDA at import).
* **Dtype policy**: :data:`SUPPORTED` storage dtypes, :func:`check_dtypes` (TypeError
  before any write), :func:`dot_config` (the GEMM operands' dot dtype and precision).
* **int64 offsets**: :func:`needs_int64` (some element offset does not fit in int32).
* **Device guard**: :func:`launch` runs every kernel under ``torch.cuda.device`` of the
  tensors' device (Triton launches on the current device).
* **Floating-point contraction**: :data:`FP_FUSION` gives the ``enable_fp_fusion``
  passed explicitly on EVERY launch, per kernel family. Triton 3.9 fuses multiply-adds
  by default and later versions change that default, so it is pinned here and GPU
  numerics cannot change with a Triton upgrade. All three families use ``False``:

  - ``quant``: the INT4/INT8 levels, scales and minima must equal the C++ and reference
    backends' bitwise (they round ``min + s * q``, ``(x - min) / s``, ``x * decay +
    alpha * u`` one operation at a time; a fused ``fma`` rounds once and can move a level);
  - ``projection`` (also used by the DCT/INT4 projector modes): the INT4 tile loader's
    ``min + s * q`` dequantizes exactly as ``quant_int4_unpack``, and the Adam epilogue
    rounds each operation as the reference's torch ops do; the epilogues are
    memory-bound, so the unfused form is expected to cost nothing measurable (not
    measured on a GPU);
  - ``dct``: the score epilogue (``|acc|``, ``acc^2``) and the projection store have no
    multiply-add worth fusing; pinned ``False`` for the same reproducibility.

  The tensor-core ``tl.dot`` accumulation is unaffected by the flag.

* **Tile configs** (:func:`choose_config`): by default a pure function of (arch, operand
  storage dtypes, side, projector mode, shape bucket) read from :data:`TABLES`; no timing.
  A few 8-bit entries also depend on the host's alignment check of the launch
  (:data:`UNALIGNED`, :func:`q8_aligned`; Triton 3.6 only).
  Each arch's table only holds configs whose shared memory fits that arch's opt-in
  per-block maximum (:data:`SMEM_LIMIT`) and that compile without register spills
  (``python -m lowrank_kernels.compile_check`` checks both; the test suite runs it).
  ``LOWRANK_KERNELS_TRITON_AUTOTUNE=1`` turns on runtime autotuning over the arch's table
  candidates (CUDA only; ``0`` or unset: the table's choice). When autotuning and
  ``torch.distributed`` is initialized, every rank launches rank 0's choice (the chosen
  candidate index is broadcast), so ranks never sum in different orders.

* **Grouped launches** (the multi-tensor ops' kernels, one launch for a list of problems):
  :func:`grouped_tile` (one tile per launch, the table's choice for the list's largest
  problem, from the ``*_grouped`` tables) and :func:`launch_grouped` (EVEN_K for every
  problem; no runtime autotuning).

* **Device tables** (:func:`device_table`): the small int64/float32 tables the grouped
  launches read (problem rows, per-parameter coefficients), cached by content so a step
  whose tensors did not move makes no host-to-device copy; :func:`address` for the
  launchers' per-entry alignment checks.

* **Compile capture**: :func:`capture` records launches instead of running them; the
  compile check uses it to compile exactly the specializations the launchers produce.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------- flags
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Runtime autotuning is opt-in: "1" turns it on; "0" or unset launches the table's config.
AUTOTUNE = os.environ.get("LOWRANK_KERNELS_TRITON_AUTOTUNE", "0") == "1"

# enable_fp_fusion per kernel family (see the module doc).
FP_FUSION = {"projection": False, "dct": False, "quant": False, "adam": False, "orth": False, "adafactor": False}

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
INT32_MAX = 2**31 - 1

# Opt-in shared memory per block (bytes), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 8.0 / 8.7: 163 KB; 8.6 / 8.9 / 12.x: 99 KB;
# 9.0: 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


# --------------------------------------------------------------------------- dtype policy
def check_dtypes(op: str, named) -> None:
    """TypeError naming the first argument the Triton kernels cannot take (before any write)."""
    for name, t in named:
        if t.dtype not in SUPPORTED:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}, but the triton backend supports float32/bfloat16/float16 "
                "(use the reference or cpp backend for float64)"
            )


def dot_config(*dtypes: torch.dtype, interpret: Optional[bool] = None):
    """``(dot dtype, input_precision)`` for GEMM operands stored in ``dtypes``.

    The 16-bit dtype when the operands are that 16-bit dtype and possibly float32
    (tensor cores at the 16-bit rate); float32 with ``"ieee"`` when every operand is
    float32 (torch's default, no TF32); float32 with TF32 when bf16 meets fp16 (TF32
    holds every bf16 and fp16 value exactly). Under the interpreter always float32
    ``"ieee"``: triton 3.9's interpreter miscomputes bf16 arithmetic and bf16 dots.
    """
    if INTERPRET if interpret is None else interpret:
        return tl.float32, "ieee"
    low = {d for d in dtypes if d != torch.float32}
    if not low:
        return tl.float32, "ieee"
    if len(low) == 1:
        return TL_DTYPE[low.pop()], "tf32"  # input_precision only matters for float32 operands
    return tl.float32, "tf32"  # bf16 x fp16: exact in TF32


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element offset of some tensor does not fit in int32."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
        if span + 256 > INT32_MAX:  # + slack for masked-off lanes of the last tile
            return True
    return False


# --------------------------------------------------------------------------- tile configs
class Tile(NamedTuple):
    """One GEMM tile config. ``prefetch`` only exists in the projection kernels."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    prefetch: bool = False
    group_m: int = 8

    def meta(self, family: str) -> dict:
        """The constexprs and launch options of this config for ``family``'s kernels."""
        d = {"BLOCK_M": self.bm, "BLOCK_N": self.bn, "BLOCK_K": self.bk, "GROUP_M": self.group_m,
             "num_warps": self.warps, "num_stages": self.stages}
        if family == "projection":
            d["PREFETCH"] = self.prefetch
        return d

    def smem_estimate(self, op_bytes: int) -> int:
        """Pipelined operand buffers: ``stages * (BM*BK + BK*BN) * bytes`` (the compile check measures the real value)."""
        return self.stages * (self.bm * self.bk + self.bk * self.bn) * op_bytes

    def label(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}_w{self.warps}_s{self.stages}" + ("_pf" if self.prefetch else "") + \
            f"_g{self.group_m}"


# The interpreter runs one small tile (64^3, 1 stage); both PREFETCH variants of the
# projection kernels are exercised: the right side prefetches, the left side does not.
INTERPRET_TILE = Tile(64, 64, 64, 4, 1, False, 4)

# TABLES[(kernel, arch)][(projector class, wide)] = (big tile, small-M tile, small-N tile);
# EXTRAS[(kernel, arch)]: further tiles autotuning may try (with the defaults; dense
# projector and 16-bit operands only).
# ``wide``: some pipelined GEMM operand is stored in 4 bytes (float32: shared memory per
# stage doubles). Projector class: "dense", "int4" or "dct" (the INT4 and DCT tile loaders
# compute per-element indices and dequantize/gather in registers, so they take smaller
# tiles). Buckets: "big": M > 64 and N > 64; "small-M": M <= 64 (e.g. rank-16 rows);
# "small-N": N <= 64 < M.
#
# Every entry was compiled for sm_80 and sm_90 (python -m lowrank_kernels.compile_check)
# on the specializations that strain registers most (float32 moments, transposed
# gradients, ragged K, INT4/DCT projectors) and kept only if ptxas reported no spill:
# 8 warps throughout (4 warps spill the Adam epilogue), 64x64 tiles in the projection
# (project + Adam holds the accumulator and both moment tiles), 128x64 in the
# back-projection and the DCT GEMM, no PREFETCH by default (it spills with transposed or
# gathered operands). The tables are the same for every arch for now: each fits the
# smallest (99 KB) shared memory; per-arch tuning needs measurements on the GPUs.
_P = "projection"
_D = "dct"


def _same(t):
    return (t, t, t)


def _table(**classes):
    """``{(projector class, wide): tiles}`` from ``class=(narrow, wide)``: each a Tile for all
    three buckets, or a (big, small-M, small-N) triple."""
    return {(cls, wide): (_same(t) if isinstance(t, Tile) else t)
            for cls, pair in classes.items() for wide, t in zip((False, True), pair)}


# Float32 operands with an INT4 projector take 32 x 64: 64 x 64 x 32 spills 60 bytes on sm_80
# (right side, ragged K; compile check --subset full); 32 x 64 x 32 does not spill under Triton
# 3.9 or 3.6 on sm_80 / sm_90 (the stochastic-rounding and grouped tables took it already).
_PROJECT = _table(
    dense=(Tile(64, 64, 64, 8, 3), Tile(64, 64, 32, 8, 3)),
    int4=(Tile(64, 64, 32, 8, 2), Tile(32, 64, 32, 8, 2)),
    dct=(Tile(64, 64, 32, 8, 2), Tile(64, 64, 32, 8, 2)),
)
_BACKPROJECT = _table(
    dense=((Tile(128, 64, 64, 8, 3), Tile(64, 64, 64, 8, 3), Tile(128, 64, 64, 8, 3)),
           (Tile(128, 64, 32, 8, 3), Tile(64, 64, 32, 8, 3), Tile(128, 64, 32, 8, 3))),
    int4=(Tile(64, 64, 32, 8, 1), Tile(64, 64, 32, 8, 1)),
    dct=(Tile(64, 64, 32, 8, 2), Tile(64, 32, 32, 8, 2)),
)
# (The back-projection's float32 operands with a DCT projector take 64 x 32: 64 x 64 x 32 spills
# 120 bytes on sm_80 with a float32 basis on the left side and a rank that is not a multiple of the
# K step, in the back-projection and in Fira's residual kernel, which shares this table; compile
# check --subset full; 64 x 32 x 32 compiles without spills under Triton 3.9 and 3.6 on sm_80 /
# sm_90, and on sm_86 / sm_89 for the left-side rows. The grouped back-projection took 64 x 32 for
# the same reason.)
# project + Adam with 8-bit moments ("project_q8"): a program owns whole quantization blocks
# along the moment's last dim (its tile's N dim), so ``bn`` is not a table value but
# ``max(16, next_pow2(min(block_size, N)))`` (:func:`q8_tile`); the table holds the tile
# for ``bn = 256`` and narrower blocks get ``bm`` scaled up to keep the same tile area
# (at most 32): 16 x 256 and 32 x 128 hold 4096 elements as the float moments' 64 x 64
# tiles; narrower blocks take 32 rows (32 x 256 spills on sm_90 and 64 x 64 on sm_80: the
# requantization's binary search holds normalized values, codes and gathered midpoints).
# Float32 operands with an INT4 projector take a 16-wide K step: 16 x 256 x 32 spills 812 bytes
# on sm_80 (472 on sm_90) with rank 300 on the right side and needs 100 KB of shared memory (over
# sm_86/89's 99 KB); 16 x 256 x 16 (2 stages) does not spill and takes 49 KB (compile check
# --subset full, sm_80 / sm_90, and sm_86 / sm_89 for the rank-300 row, Triton 3.9; the grouped
# table below inherits it; Triton 3.6 takes its own tile, below).
_PROJECT_Q8 = _table(
    dense=(Tile(16, 256, 32, 8, 3), Tile(16, 256, 32, 8, 2)),
    int4=(Tile(16, 256, 32, 8, 2), Tile(16, 256, 16, 8, 2)),
    dct=(Tile(16, 256, 32, 8, 2), Tile(16, 256, 32, 8, 2)),
)
# project + Adam with bf16 stochastic-rounding moments ("project_sr"): the project table,
# except float32 operands with an INT4/DCT projector take 32-row tiles (64 x 64 spills 80
# bytes on sm_90 with the rounding's hash in the epilogue).
_PROJECT_SR = dict(_PROJECT)
_PROJECT_SR[("int4", True)] = _same(Tile(32, 64, 32, 8, 2))
_PROJECT_SR[("dct", True)] = _same(Tile(32, 64, 32, 8, 2))
# The grouped back-projection (one launch for a list): the back-projection table, except
# for float32 operands, where the registers the grouped kernel keeps for its problem's
# addresses and strides make the single kernel's tiles spill on sm_80 (compile check): a
# dense projector takes 64 x 64 x 32 with 2 stages in every bucket (128 x 64: 48 bytes,
# 64 x 64 with 3 stages: 40 bytes with a transposed gradient), a DCT projector 64 x 32
# (64 x 64 x 32: 156 bytes, left side, where the single kernel's spills 120 bytes too,
# python -m lowrank_kernels.compile_check --subset full; 32 x 64: 32 bytes, right side).
# An INT4 projector with float32 operands takes 64 x 64 with 4 warps (8 warps: 16 bytes on
# sm_90 with int64 offsets; 64 x 32 and 32 x 64 spill elsewhere).
_BACKPROJECT_GROUPED = dict(_BACKPROJECT)
_BACKPROJECT_GROUPED[("dense", True)] = _same(Tile(64, 64, 32, 8, 2))
_BACKPROJECT_GROUPED[("dct", True)] = _same(Tile(64, 32, 32, 8, 2))
_BACKPROJECT_GROUPED[("int4", True)] = _same(Tile(64, 64, 32, 4, 1))
# The grouped project + Adam (compile check --subset full, sm_80 / sm_90): float32 operands
# with an INT4 projector, and float32 operands with stochastic-rounding moments, take 32-row
# tiles (64 x 64: 32-76 bytes of spills; with SR and INT4 one stage: 2 stages spill 20 bytes
# on sm_90); 8-bit moments keep the table's 16 rows for narrow quantization blocks (no
# scale-up to 32 rows, :func:`q8_tile`: 32 x 32 and 32 x 64 spill).
_PROJECT_GROUPED = dict(_PROJECT)
_PROJECT_GROUPED[("int4", True)] = _same(Tile(32, 64, 32, 8, 2))
# The grouped project + Adam with 8-bit moments: the project_q8 table, except 16-bit operands
# with a dense projector, whose 16 x 256 x 32 tile (3 stages, and 2) spills 16 bytes on sm_80
# in the launch of an aligned sub-list (its alignment hints keep the single kernel's 16-byte
# loads and cp.async pipeline, at ptxas' 128 registers); a 16-wide K step does not spill.
_PROJECT_Q8_GROUPED = dict(_PROJECT_Q8)
_PROJECT_Q8_GROUPED[("dense", False)] = _same(Tile(16, 256, 16, 8, 3))
_PROJECT_SR_GROUPED = dict(_PROJECT_SR)
_PROJECT_SR_GROUPED[("dense", True)] = _same(Tile(32, 64, 32, 8, 3))
_PROJECT_SR_GROUPED[("int4", True)] = _same(Tile(32, 64, 32, 8, 1))
# Float32 operands ("wide") take 64 x 64 x 32 with 4 warps: 128 x 64 x 32 (8 warps) spills 12 bytes on
# sm_80 under Triton 3.6 in Trion's list step and 8-40 bytes under 3.9 in Fira's; 64 x 64 x 32 with
# 8 warps spills at 80 registers (compile check, ci subset, sm_80 / sm_90).
_DCT_GEMM = _table(
    dense=((Tile(128, 64, 64, 8, 3), Tile(64, 64, 64, 8, 3), Tile(128, 64, 64, 8, 3)),
           Tile(64, 64, 32, 4, 3)),
    dct=((Tile(128, 64, 64, 8, 3), Tile(64, 64, 64, 8, 3), Tile(128, 64, 64, 8, 3)),
         Tile(64, 64, 32, 4, 3)),
)
TABLE_ARCHS = (80, 89, 90)
TABLES = {}
EXTRAS = {}
for _arch in TABLE_ARCHS:
    TABLES[("project", _arch)] = _PROJECT
    TABLES[("backproject", _arch)] = _BACKPROJECT
    TABLES[("dct_gemm", _arch)] = _DCT_GEMM
    TABLES[("project_q8", _arch)] = _PROJECT_Q8
    TABLES[("project_sr", _arch)] = _PROJECT_SR
    EXTRAS[("project", _arch)] = []
    EXTRAS[("backproject", _arch)] = []
    EXTRAS[("dct_gemm", _arch)] = [Tile(128, 128, 64, 8, 3), Tile(64, 64, 64, 4, 3)]
    EXTRAS[("project_q8", _arch)] = []
    EXTRAS[("project_sr", _arch)] = []
    # The grouped (multi-tensor) kernels of the projection family launch one tile for a whole
    # list (:func:`grouped_tile`): the single kernels' tables with the changes above, under
    # their own names so the compile check compiles every default tile of them too.
    TABLES[("project_grouped", _arch)] = _PROJECT_GROUPED
    TABLES[("project_q8_grouped", _arch)] = _PROJECT_Q8_GROUPED
    TABLES[("project_sr_grouped", _arch)] = _PROJECT_SR_GROUPED
    TABLES[("backproject_grouped", _arch)] = _BACKPROJECT_GROUPED
    # Fira's grouped residual kernel (kernels/fira.py) runs the back-projection's GEMM with another
    # epilogue: the grouped back-projection's table, under its own name (changes below).
    TABLES[("residual_grouped", _arch)] = _BACKPROJECT_GROUPED
    EXTRAS[("residual_grouped", _arch)] = []
    for _k in ("project", "project_q8", "project_sr", "backproject"):
        EXTRAS[(_k + "_grouped", _arch)] = []
# sm_80 (A100: the 163 KB table) differs in two single-kernel entries, because Triton 3.6 (the
# GPU machines' image) spills them with int64 offsets where 3.9 does not (compile check --subset
# ci; ptxas holds both at 128 registers there): the wide dense back-projection's 128 x 64 x 32
# tile (8 bytes) becomes 64 x 64 x 32 (118 registers under 3.9, 80 under 3.6), and 8-bit project
# + Adam's small-M tile (left side, rank <= 64: 28 bytes) takes 4 warps (254 registers, no spill
# under either; 4 warps spill the big bucket's right-side problems, which keep 8; 32 x 256 spills
# there too). The grouped kernels keep their own tables.
_BACKPROJECT_80 = dict(_BACKPROJECT)
_BACKPROJECT_80[("dense", True)] = _same(Tile(64, 64, 32, 8, 3))
_PROJECT_Q8_80 = dict(_PROJECT_Q8)
_PROJECT_Q8_80[("dense", False)] = (Tile(16, 256, 32, 8, 3), Tile(16, 256, 32, 4, 3), Tile(16, 256, 32, 8, 3))
TABLES[("backproject", 80)] = _BACKPROJECT_80
TABLES[("project_q8", 80)] = _PROJECT_Q8_80
# Per Triton version: Triton 3.6 (the GPU machines' image) allocates registers differently from
# 3.9, and three grouped entries that are clean under 3.9 spill under 3.6 (compile check --subset
# ci, sm_80 / sm_90), so under Triton < 3.7 they take tiles measured clean under 3.6:
# - 8-bit project + Adam, 16-bit operands, dense projector, sm_80: 16 x 256 x 16 spills 12 bytes
#   (single counterpart) / 16 (grouped) under 3.6, 16 x 256 x 32 (8 warps, 3 stages) none
#   (under 3.9 that one spills 16 bytes in the grouped kernel, hence the 16-wide K step above;
#   4 warps spill the unaligned sub-list under 3.6: 1276 bytes; 2 or 1 stages do not help);
# - project + Adam, float32 operands, dense projector, sm_80: the single counterpart of a
#   transposed gradient with device skip flags spills 28 bytes at 64 x 64 x 32 under 3.6
#   (2 stages: the unaligned grouped launch spills 12), 32 x 64 x 32 (3 stages) none;
# - stochastic-rounding moments, float32 operands, INT4 projector: 32 x 64 x 32 (1 stage) spills
#   16 bytes on sm_90 in the grouped kernel under 3.6, 16 x 64 x 32 none.
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
if TRITON_VERSION < (3, 7):
    _PROJECT_Q8_GROUPED_80 = dict(_PROJECT_Q8_GROUPED)
    _PROJECT_Q8_GROUPED_80[("dense", False)] = _same(Tile(16, 256, 32, 8, 3))
    TABLES[("project_q8_grouped", 80)] = _PROJECT_Q8_GROUPED_80
    _PROJECT_GROUPED_80 = dict(_PROJECT_GROUPED)
    _PROJECT_GROUPED_80[("dense", True)] = _same(Tile(32, 64, 32, 8, 3))
    TABLES[("project_grouped", 80)] = _PROJECT_GROUPED_80
    _PROJECT_SR_GROUPED_36 = dict(_PROJECT_SR_GROUPED)
    _PROJECT_SR_GROUPED_36[("int4", True)] = _same(Tile(16, 64, 32, 8, 1))
    for _arch in TABLE_ARCHS:
        TABLES[("project_sr_grouped", _arch)] = _PROJECT_SR_GROUPED_36
# The DCT GEMM's float32 operands under 3.6: 64 x 64 x 32 with 4 warps and 3 stages (the 3.9 entry
# above) spills 8-48 bytes in the L2 DCT scoring on sm_80 / sm_90 (168 registers), 8 warps spill 8
# bytes in Trion's list step on sm_90; 4 warps with 2 stages do not (ci subset, sm_80 / sm_90).
if TRITON_VERSION < (3, 7):
    _DCT_GEMM_36 = dict(_DCT_GEMM)
    for _cls in ("dense", "dct"):
        _DCT_GEMM_36[(_cls, True)] = _same(Tile(64, 64, 32, 4, 2))
    for _arch in TABLE_ARCHS:
        TABLES[("dct_gemm", _arch)] = _DCT_GEMM_36
# 8-bit project + Adam, float32 operands, INT4 projector (compile check --subset full, sm_80 /
# sm_90, the single and grouped kernels): under 3.6 the 3.9 tile (16 x 256 x 16, 2 stages) spills
# 24 bytes on sm_80 (left side, 256-wide blocks) and its 32-row form for 64-wide blocks 12-36
# bytes; 16 x 256 x 32 with 1 stage spills 16 bytes on sm_90 (left side). Under 3.6 the entry
# takes 16 x 256 x 16 with 1 stage, and narrow blocks keep its 16 rows (:func:`_q8_for`): the
# 32-row forms for 64-wide blocks spill 8-36 bytes with every K step and stage count tried (16 or
# 32, 1 or 2 stages); 16 x 64 does not. Rank 300: 230-250 registers, no spill, 17 KB.
_Q8_KEEP_ROWS_36 = frozenset({("int4", True)})
if TRITON_VERSION < (3, 7):
    for _name in ("project_q8", "project_q8_grouped"):
        for _arch in TABLE_ARCHS:
            TABLES[(_name, _arch)] = dict(TABLES[(_name, _arch)])
            TABLES[(_name, _arch)][("int4", True)] = _same(Tile(16, 256, 16, 8, 1))
# Rows of the full subset (compile check --subset full --only ..., every arch) fixed per Triton version
# and arch, where the tile above spills and the others stay as they are:
# - the DCT GEMM's float32 operands with a dense projector (fp32 DCT scoring, Fira's per-entry
#   projections) on the 99 KB table under 3.6: the 3.6 entry above (64 x 64 x 32, 4 warps, 2 stages)
#   spills 16 bytes on sm_86 / sm_89 in Fira's list step (right side, odd shapes) at 128 registers;
#   the 3.9 entry (3 stages) spills in no dense-projector launch of the full subset there (fp32 DCT
#   scoring, both sides and norms; Fira's list step, both sides; Trion's list step), where 16-wide K
#   steps spill 16 bytes (fp32 L2 scoring with 3 stages, Trion's step with 2);
# - the back-projection with float32 operands and an INT4 projector under 3.6 on sm_90: 64 x 64 x 32
#   with 8 warps spills 100 bytes (float32 weight, right side, even K) at 128 registers; 4 warps do
#   not (the grouped back-projection's tile, above);
# - Fira's grouped residual kernel with float32 operands and a dense projector on the 99 KB table under
#   3.9: the grouped back-projection's 64 x 64 x 32 (8 warps, 2 stages) spills 20 bytes on sm_86 /
#   sm_89 (left side, at 128 registers); 64 x 32 x 32 does not (the DCT projector's tile). The grouped
#   back-projection keeps 64 x 64 there: 64 x 32 spills 8 bytes and 4 warps 20 in its unaligned
#   sub-lists (float32 updates, both sides / left side);
# - 8-bit project + Adam, 16-bit operands, dense projector, sm_80, under 3.9: 16 x 256 x 32 with 8 warps
#   spills 8 bytes when narrow quantization blocks make it 32 x 32 x 32 (right side, rank 24; 64
#   registers, with 1, 2 or 3 stages), and the sm_80 small-M tile (4 warps, for 3.6, above) spills 588
#   bytes on the right side with 256-wide blocks (rank 300; an autotuning candidate there). The grouped
#   kernel's 3.9 tile, 16 x 256 x 16 with 8 warps and 3 stages, spills in neither nor on the left side,
#   so it serves every bucket there (3.6 keeps the tiles above: its 8 warps stop at 128 registers and
#   spill 28 bytes on the left side with int64 offsets, 16-wide K steps 12).
if TRITON_VERSION < (3, 7):
    TABLES[("dct_gemm", 89)] = dict(TABLES[("dct_gemm", 89)])
    TABLES[("dct_gemm", 89)][("dense", True)] = _DCT_GEMM[("dense", True)]
    TABLES[("backproject", 90)] = dict(TABLES[("backproject", 90)])
    TABLES[("backproject", 90)][("int4", True)] = _same(Tile(64, 64, 32, 4, 1))
else:
    TABLES[("residual_grouped", 89)] = dict(TABLES[("residual_grouped", 89)])
    TABLES[("residual_grouped", 89)][("dense", True)] = _same(Tile(64, 32, 32, 8, 2))
    TABLES[("project_q8", 80)] = dict(TABLES[("project_q8", 80)])
    TABLES[("project_q8", 80)][("dense", False)] = _same(Tile(16, 256, 16, 8, 3))
# Alignment-keyed entries: UNALIGNED[(kernel, arch)] is the table a launch takes when its host found it
# unaligned (8-bit project + Adam only: the single kernel's :func:`q8_aligned` check, the grouped
# launch's aligned / unaligned sub-list), TABLES' when aligned; kernels and archs without one take
# TABLES' for both. Under Triton 3.6 ptxas compiles the 8-warp 16 x 256 tiles of aligned
# specializations (16-byte vector loads, cp.async) at 128 registers and spills where 4 warps do not,
# while 4 warps spill in the unaligned ones (scalar epilogue loads), which 8 warps compile clean;
# so these entries take their warps from the alignment (compile check --subset full, sm_80 / 86 /
# 89 / 90, bench/results/compile_check/README.md):
# - 16-bit operands, INT4 projector, every arch: 8 warps spill 12 bytes (single kernel, sm_86 / 89 /
#   90) and 12-28 (grouped aligned sub-list, sm_80 / 86 / 89 / 90) on the left side; aligned launches
#   take 4 warps in every bucket (each bucket's tile is an autotuning candidate of every launch),
#   unaligned ones keep 8;
# - 16-bit operands, dense projector, sm_80: the small-M tile's 4 warps (for the aligned left-side
#   launches, above) spill 432 bytes as an autotuning candidate of the unaligned rank-300 launch;
#   unaligned launches take 8 warps in every bucket.
UNALIGNED = {}
if TRITON_VERSION < (3, 7):
    for _name in ("project_q8", "project_q8_grouped"):
        for _arch in TABLE_ARCHS:
            UNALIGNED[(_name, _arch)] = dict(TABLES[(_name, _arch)])
            TABLES[(_name, _arch)] = dict(TABLES[(_name, _arch)])
            TABLES[(_name, _arch)][("int4", False)] = tuple(t._replace(warps=4) for t in TABLES[(_name, _arch)][
                ("int4", False)])
    UNALIGNED[("project_q8", 80)][("dense", False)] = _same(Tile(16, 256, 32, 8, 3))
FAMILY_OF = {"project": _P, "backproject": _P, "dct_gemm": _D, "project_q8": _P, "project_sr": _P,
             "project_grouped": _P, "backproject_grouped": _P, "project_q8_grouped": _P, "project_sr_grouped": _P,
             "residual_grouped": _P}
MODE_CLASS = {0: "dense", 1: "int4", 2: "dct"}
_Q8_KERNELS = ("project_q8", "project_q8_grouped")
# 8-bit project + Adam entries ``(projector class, wide)`` whose narrow quantization blocks keep
# the table's rows (no scale-up in :func:`_q8_for`); set per Triton version above.
_Q8_KEEP_ROWS = _Q8_KEEP_ROWS_36 if TRITON_VERSION < (3, 7) else frozenset()


def table_arch(arch: int) -> int:
    """The table an arch (capability as ``10 * major + minor``) launches from.

    8.0 / 8.7 (A100, Orin: 163 KB) -> 80; 9.x (H100/H200: 227 KB) -> 90; every other
    capability (8.6 / 8.9 consumer Ampere/Ada, 12.x, unknown) -> 89, the 99 KB table,
    which fits every CUDA GPU with compute capability >= 8.0.
    """
    if arch in (80, 87):
        return 80
    if 90 <= arch < 100:
        return 90
    return 89


def _bucket(M: int, N: int) -> int:
    """0: big (M, N > 64), 1: small M (M <= 64), 2: small N (N <= 64 < M)."""
    if M <= 64:
        return 1
    if N <= 64:
        return 2
    return 0


def q8_tile(tile: Tile, qblock: int) -> Tile:
    """``tile`` (a ``project_q8`` table tile, ``bn = 256``) for quantization blocks of
    ``qblock = min(block_size, N)`` columns: ``bn = max(16, next_pow2(qblock))`` (one block
    per program along N), ``bm`` scaled up by ``256 / bn`` to at most 32."""
    qblock = int(qblock)
    if not 1 <= qblock <= 256:
        raise ValueError(f"q8_tile: qblock must be in [1, 256] (min(block_size, N)), got {qblock!r}")
    bn = max(16, triton.next_power_of_2(qblock))
    return tile._replace(bn=bn, bm=min(32, max(tile.bm, tile.bm * 256 // bn)))


def _q8_for(kernel: str, tile: Tile, qblock: int, mode: int = 0, wide: bool = False) -> Tile:
    """``tile`` for 8-bit moments: :func:`q8_tile`, without the row scale-up for the grouped
    kernel (its narrow-block tiles spill with 32 rows; see ``_PROJECT_GROUPED``) and for the
    ``(projector class, wide)`` entries in :data:`_Q8_KEEP_ROWS`."""
    t = q8_tile(tile, qblock)
    keep = kernel == "project_q8_grouped" or (MODE_CLASS.get(mode), wide) in _Q8_KEEP_ROWS
    return t._replace(bm=tile.bm) if keep else t


def _entry(kernel: str, arch: int, mode: int, wide: bool, aligned: bool = True) -> tuple:
    """The (big, small-M, small-N) tiles of ``kernel`` on ``arch``'s table for projector ``mode`` and
    operand width: from :data:`UNALIGNED` for an unaligned launch where it has a table, else :data:`TABLES`."""
    ta = table_arch(int(arch))
    table = TABLES[(kernel, ta)] if aligned else UNALIGNED.get((kernel, ta), TABLES[(kernel, ta)])
    return table.get((MODE_CLASS[mode], wide), table[("dense", wide)])


def choose_config(kernel: str, arch: Optional[int], *, M: int, N: int, K: int, op_bytes: Sequence[int],
                  side: str = "right", mode: int = 0, qblock: int = 0, aligned: bool = True) -> Tile:
    """The tile ``kernel`` (``"project"``, ``"backproject"``, ``"dct_gemm"``, or the project
    kernel's 8-bit / stochastic-rounding forms ``"project_q8"`` / ``"project_sr"``; each
    projection name + ``"_grouped"`` for the grouped kernels) launches with.

    A pure function of (arch, the pipelined operands' storage bytes, side, projector mode,
    shape bucket of ``M x N``): no timing, so every process and rank chooses the same.
    ``arch``: capability ``10 * major + minor``, or ``None`` under the interpreter.
    ``K`` is accepted for the key but does not change today's choice. ``qblock``: for
    ``"project_q8"`` only, the quantization block width ``min(block_size, N)`` that sets
    the tile's ``bn`` (:func:`q8_tile`). ``aligned``: whether the host found the launch aligned
    (8-bit project + Adam: :func:`q8_aligned`, or the grouped launch's sub-list); only the
    :data:`UNALIGNED` entries depend on it.
    """
    if kernel not in FAMILY_OF:
        raise ValueError(f"choose_config: unknown kernel {kernel!r}; expected one of {sorted(FAMILY_OF)}")
    if side not in ("right", "left"):
        raise ValueError(f"choose_config: side must be 'right' or 'left', got {side!r}")
    if arch is None:
        tile = INTERPRET_TILE._replace(prefetch=FAMILY_OF[kernel] == _P and side == "right")
        return tile._replace(bn=q8_tile(tile, qblock).bn) if kernel in _Q8_KERNELS else tile
    if mode not in MODE_CLASS:
        raise ValueError(f"choose_config: mode must be 0 (dense), 1 (INT4) or 2 (DCT), got {mode!r}")
    wide = max(op_bytes) >= 4
    tile = _entry(kernel, arch, mode, wide, aligned)[_bucket(int(M), int(N))]
    return _q8_for(kernel, tile, qblock, mode, wide) if kernel in _Q8_KERNELS else tile


def default_tiles(kernel: str, arch: int, *, wide: bool, mode: int = 0, qblock: int = 256,
                  aligned: bool = True) -> list:
    """The tiles ``kernel`` launches without autotuning on ``arch`` (one per bucket, deduplicated);
    ``qblock``: the quantization block width of a ``"project_q8"`` launch (:func:`q8_tile`);
    ``aligned``: as :func:`choose_config`."""
    entry = _entry(kernel, arch, mode, wide, aligned)
    if kernel in _Q8_KERNELS:
        entry = [_q8_for(kernel, t, qblock, mode, wide) for t in entry]
    return list(dict.fromkeys(entry))


def candidates(kernel: str, arch: Optional[int], *, wide: bool, mode: int = 0, qblock: int = 256,
               aligned: bool = True) -> list:
    """Every tile ``kernel`` may launch on ``arch`` with ``wide`` operands and projector
    ``mode``: the table's defaults for each bucket, then the autotuning extras (dense
    16-bit operands only; deduplicated, in table order). ``qblock``, ``aligned``: as
    :func:`default_tiles`."""
    if arch is None:
        base = INTERPRET_TILE
        if kernel in _Q8_KERNELS:
            base = base._replace(bn=q8_tile(base, qblock).bn)
        return [base, base._replace(prefetch=True)] if FAMILY_OF[kernel] == _P else [base]
    ta = table_arch(int(arch))
    entry = _entry(kernel, arch, mode, wide, aligned)
    if kernel in _Q8_KERNELS:
        entry = [_q8_for(kernel, t, qblock, mode, wide) for t in entry]
    out = []
    # Extras: 16-bit dense operands only (compiled for sm_80/sm_90: they spill with float32
    # operands); never one whose shared memory cannot fit.
    extras = [t for t in (EXTRAS[(kernel, ta)] if mode == 0 and not wide else ())
              if t.smem_estimate(2) <= SMEM_LIMIT[ta]]
    for t in (*entry, *extras):
        if t not in out:
            out.append(t)
    return out


# --------------------------------------------------------------------------- device
_ARCH_CACHE: dict = {}


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability ``10 * major + minor`` of a CUDA device; ``None`` when interpreting."""
    if INTERPRET or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _ARCH_CACHE:
        major, minor = torch.cuda.get_device_capability(idx)
        _ARCH_CACHE[idx] = 10 * major + minor
    return _ARCH_CACHE[idx]


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the current device), else a no-op."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- device tables (grouped launches)
# Device tables of the grouped launches, by content (device, dtype, values): a step whose
# tensors did not move reuses its table (no host-to-device copy). The rules under CUDA graphs
# (docs/design.md, "capturable=True"):
# - a table made while a graph is captured belongs to that capture: its copy runs only when the
#   graph replays, so it never enters the eager cache and no other capture sees it; within the
#   capture it is reused by content;
# - a capture makes its own tables (it never reads an eager one, whose copy may still be in
#   flight on another stream and whose memory the eager cache may drop);
# - the capture's tables (the device tensor and its pinned host source, which the graph's copy
#   reads on every replay) are kept on the graph object (:func:`_capturing_graph`), so they are
#   released with the graph;
# - an eager table hit from another stream than the one its copy ran on waits for the copy (an
#   event recorded after it) and is recorded for the caching allocator on that stream.
_DEVICE_TABLES: "dict" = {}  # key -> _Table
_DEVICE_TABLES_MAX = 64
_CAPTURE_ATTR = "_lowrank_kernels_tables"


class _Table(NamedTuple):
    dev: torch.Tensor  # the table on the device
    host: Optional[torch.Tensor]  # its pinned host source (CUDA), kept while a graph may replay the copy
    stream: object  # the stream the copy was issued on (None off CUDA)
    event: object  # recorded after the copy on that stream (None off CUDA)


class _GraphTables:
    """The tables one CUDA-graph capture made (``tables``: content key -> :class:`_Table`), kept
    as an attribute of the graph object; :data:`_LIVE_CAPTURES` sees it only while the graph lives."""

    __slots__ = ("tables", "__weakref__")

    def __init__(self):
        self.tables = {}


_LIVE_CAPTURES: "weakref.WeakSet" = weakref.WeakSet()
_NO_GRAPH_TABLES = _GraphTables()  # a capture whose graph object torch does not expose (kept for good)


def _capturing_graph(device: torch.device):
    """The object the current capture's tables are kept on: ``None`` when no CUDA graph is being
    captured on ``device``'s current stream; else the graph torch reports as capturing
    (``torch.cuda.CUDAGraph.get_currently_capturing_graph``), or, with a torch that does not
    say, :data:`_NO_GRAPH_TABLES` (tables kept for the process, with a warning)."""
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return None
    get = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    try:
        graph = get() if get is not None else None
    except Exception:  # noqa: BLE001 - an older torch without the capture registry
        graph = None
    return graph if graph is not None else _NO_GRAPH_TABLES


def _capture_tables(graph) -> _GraphTables:
    """The table cache of the capture of ``graph`` (made on first use)."""
    if graph is not _NO_GRAPH_TABLES:
        tabs = getattr(graph, _CAPTURE_ATTR, None)
        if tabs is None:
            tabs = _GraphTables()
            try:
                setattr(graph, _CAPTURE_ATTR, tabs)
            except (AttributeError, TypeError):
                tabs = None
        if tabs is not None:
            _LIVE_CAPTURES.add(tabs)
            return tabs
    if not _NO_GRAPH_TABLES.tables:
        warnings.warn("lowrank_kernels: this torch does not expose the CUDA graph being captured; the grouped "
                      "launches' problem tables made during capture are kept until the process ends",
                      RuntimeWarning, stacklevel=3)
    _LIVE_CAPTURES.add(_NO_GRAPH_TABLES)
    return _NO_GRAPH_TABLES


def captured_table_count() -> int:
    """How many problem tables are kept for CUDA graphs that are still alive."""
    return sum(len(t.tables) for t in list(_LIVE_CAPTURES))


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _make_table(values, dtype, device) -> _Table:
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return _Table(host.to(device), None, None, None)
    host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    stream = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(stream)
    return _Table(dev, host, stream, event)


def device_table(values, dtype, device):
    """``values`` (a list of Python numbers) as a 1-D ``dtype`` tensor on ``device``: one
    host-to-device copy (from pinned memory, asynchronous, on CUDA), or none when the same
    table was made recently (content-keyed, at most ``_DEVICE_TABLES_MAX`` kept). Under CUDA
    graph capture the rules above apply."""
    if device.type == "meta":  # the compile check: only the argument's type matters
        return torch.zeros(len(values), dtype=dtype, device=device)
    key = (str(device), dtype, tuple(values))
    graph = _capturing_graph(device)
    if graph is not None:
        tabs = _capture_tables(graph).tables
        hit = tabs.get(key)
        if hit is None or hit.stream != _current_stream(device):  # (another capturing stream: its own copy)
            hit = tabs[key] = _make_table(values, dtype, device)
        return hit.dev
    hit = _DEVICE_TABLES.pop(key, None)
    if hit is None:
        hit = _make_table(values, dtype, device)
        if len(_DEVICE_TABLES) >= _DEVICE_TABLES_MAX:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))  # the least recently used
    else:
        stream = _current_stream(device)
        if stream is not None and stream != hit.stream:  # read on another stream than its copy ran on
            stream.wait_event(hit.event)
            hit.dev.record_stream(stream)
    _DEVICE_TABLES[key] = hit  # (re)inserted last: most recently used
    return hit.dev


def search_steps(count: int) -> int:
    """``STEPS`` of a grouped launch over ``count`` problems (kernels/_tl.py ``_grouped_problem``):
    ``ceil(log2(count))`` rounded up to a multiple of 4 (extra steps change nothing), so a list
    that shrinks or grows (a bucket on a refresh step) keeps its compiled kernel unless it
    crosses 16, 256, ... problems."""
    return max(4, -(-max(count - 1, 0).bit_length() // 4) * 4)


def aligned_row(row, bases, x16):
    """A grouped launch's table row (list of ints) as an aligned sub-list's kernels read it
    (kernels/_tl.py ``_grouped_ptr`` / ``_grouped_x16``): address field ``f`` of ``bases``
    (``{field: the address of the launch's tensor argument of that role}``) becomes its byte
    distance from that address divided by 16, each field of ``x16`` its value divided by 16.
    Only for entries whose alignment the host checked: a remainder raises."""
    row = list(row)
    for f, base in bases.items():
        q, rem = divmod(row[f] - base, 16)
        if rem:
            raise ValueError(f"aligned_row: field {f} address {row[f]:#x} is not 16 bytes from {base:#x}")
        row[f] = q
    for f in x16:
        q, rem = divmod(row[f], 16)
        if rem:
            raise ValueError(f"aligned_row: field {f} value {row[f]} is not a multiple of 16")
        row[f] = q
    return row


def address(t: torch.Tensor) -> int:
    """``t``'s address, for the grouped launchers' alignment checks (a ``meta`` tensor's: its
    storage offset in bytes, so the compile check and the host tests see the alignment a real
    tensor of that view would have)."""
    return t.storage_offset() * t.element_size() if t.device.type == "meta" else t.data_ptr()


def q8_aligned(N: int, K: int, qstep: int, tensors: Sequence[torch.Tensor],
               absmax: Sequence[torch.Tensor] = ()) -> bool:
    """Whether a single 8-bit project + Adam launch is aligned (its :data:`UNALIGNED` key): ``N``,
    ``K`` and the quantization step multiples of 16, every tensor of ``tensors`` (the gradient,
    moments and output: what the K loop streams along N or K and the epilogue reads and writes
    along N) at a 16-byte aligned address with strides 1 or multiples of 16, so Triton's
    specialization gives their loads and stores 16-byte vectors, and the ``absmax`` tensors (one
    value per block, no vectors) at 16-byte aligned addresses. The projector is not checked: its
    tile is the small side of the GEMM (left-side rank <= 64: an odd rank's stride is as common as
    an even one's, and the 8-bit int64 launches with rank 24 compile as the aligned ones do)."""
    if any(int(d) % 16 for d in (N, K, qstep)):
        return False
    return all(address(t) % 16 == 0 and all(st == 1 or st % 16 == 0 for st in t.stride()) for t in tensors) and \
        all(address(t) % 16 == 0 for t in absmax)


# --------------------------------------------------------------------------- capture (compile check)
_CAPTURE: Optional[list] = None


class Launch(NamedTuple):
    """One launch recorded by :func:`capture`: everything needed to compile it ahead of time."""

    family: str
    kernel: object  # the JITFunction
    args: tuple
    meta: dict  # constexprs and options, tile included
    tile_kernel: Optional[str]  # "project"/"backproject"/"dct_gemm" (tile from the table), or None
    wide: bool
    key: Optional[dict] = None  # choose_config's keyword arguments (M, N, K, op_bytes, side, mode)

    def tile_for(self, arch: int) -> "Tile":
        """The tile this launch takes on ``arch`` (table choice, no autotuning)."""
        return choose_config(self.tile_kernel, arch, **self.key)

    def with_tile(self, tile: "Tile") -> dict:
        """``meta`` with ``tile`` (and its EVEN_K) in place of the captured one."""
        return dict(self.meta, **_tile_meta(self.family, tile, self.key["K"]))


@contextlib.contextmanager
def capture():
    """Record launches instead of running them (yields the list of :class:`Launch`)."""
    global _CAPTURE
    prev, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = prev


# --------------------------------------------------------------------------- launching
def launch(family: str, kernel, grid, args: tuple, meta: dict, *, device: torch.device) -> None:
    """Run ``kernel[grid](*args, **meta)`` on ``device`` with the family's explicit ``enable_fp_fusion``.

    ``meta`` holds the constexprs and launch options (``num_warps``, ...), the tile's included.
    """
    meta = dict(meta, enable_fp_fusion=FP_FUSION[family])
    if _CAPTURE is not None:
        _CAPTURE.append(Launch(family, kernel, args, meta, None, False))
        return
    with device_guard(device):
        kernel[grid](*args, **meta)


_TUNED: dict = {}
# Every tile launched in this process: (kernel, M, N, K, operand bytes, side, mode, arch) -> tile label
# (printed by ``python -m lowrank_kernels._determinism``).
CHOSEN: dict = {}


def launch_gemm(kernel_name: str, kernel, grid: Callable, args: tuple, meta: dict, *, device: torch.device,
                M: int, N: int, K: int, op_bytes: Sequence[int], side: str = "right", mode: int = 0,
                restore: Sequence[torch.Tensor] = (), qblock: int = 0, aligned: bool = True) -> Tile:
    """Launch a tiled GEMM kernel with the config of :func:`choose_config` (or autotuned).

    ``grid(tile)`` gives the launch grid for a tile; ``restore``: tensors the kernel
    writes, restored after each autotuning trial; ``qblock``: the quantization block width
    of a ``"project_q8"`` launch (:func:`q8_tile`); ``aligned``: the host's alignment check of
    the launch (:func:`choose_config`). Returns the tile launched.
    """
    family = FAMILY_OF[kernel_name]
    wide = max(op_bytes) >= 4
    if _CAPTURE is not None:
        arch = 90  # placeholder: the compile check replaces the tile per target arch
        tile = choose_config(kernel_name, arch, M=M, N=N, K=K, op_bytes=op_bytes, side=side, mode=mode, qblock=qblock,
                             aligned=aligned)
        full = dict(meta, **_tile_meta(family, tile, K), enable_fp_fusion=FP_FUSION[family])
        key = dict(M=M, N=N, K=K, op_bytes=list(op_bytes), side=side, mode=mode, qblock=qblock, aligned=aligned)
        _CAPTURE.append(Launch(family, kernel, args, full, kernel_name, wide, key))
        return tile
    with device_guard(device):
        arch = device_arch(device)
        if AUTOTUNE and arch is not None:
            key = (kernel_name, device.index, M, N, K, tuple(op_bytes), side, mode, qblock, aligned,
                   tuple(sorted((k, str(v)) for k, v in meta.items())))
            tile = _TUNED.get(key)
            if tile is None:
                tile = _autotune(kernel_name, kernel, grid, args, meta, device, arch, wide, K, restore, mode, qblock,
                                 aligned)
                _TUNED[key] = tile
        else:
            tile = choose_config(kernel_name, arch, M=M, N=N, K=K, op_bytes=op_bytes, side=side, mode=mode,
                                 qblock=qblock, aligned=aligned)
        name = _chosen_name(kernel_name, qblock, aligned)
        CHOSEN[(name, M, N, K, tuple(op_bytes), side, mode, arch)] = tile.label()
        kernel[grid(tile)](*args, **meta, **_tile_meta(family, tile, K), enable_fp_fusion=FP_FUSION[family])
    return tile


def grouped_tile(kernel_name: str, device: torch.device, *, problems: Sequence[tuple], op_bytes: Sequence[int],
                 side: str = "right", mode: int = 0, qblock: int = 0, aligned: bool = True) -> Tile:
    """The one tile of a grouped launch (``kernel_name``: a ``*_grouped`` kernel) over
    ``problems`` (``(M, N, K)`` each, at least one): the table's choice
    (:func:`choose_config`, no autotuning) for the problem with the most output elements;
    ``qblock``: the widest quantization block of a ``"project_q8_grouped"`` launch; ``aligned``:
    whether the launch is an aligned sub-list's (constexpr ``ALIGNED``). Under
    :func:`capture` the tile of the placeholder arch 90 (the compile check re-tiles per arch)."""
    if not problems:
        raise ValueError("grouped_tile: problems must not be empty")
    M, N, K = max(problems, key=lambda p: (p[0] * p[1], p))
    arch = 90 if _CAPTURE is not None else device_arch(device)
    return choose_config(kernel_name, arch, M=M, N=N, K=K, op_bytes=op_bytes, side=side, mode=mode, qblock=qblock,
                         aligned=aligned)


def launch_grouped(kernel_name: str, kernel, grid: tuple, args: tuple, meta: dict, *, device: torch.device,
                   tile: Tile, problems: Sequence[tuple], op_bytes: Sequence[int], side: str = "right", mode: int = 0,
                   qblock: int = 0, aligned: bool = True) -> None:
    """Launch a grouped GEMM kernel (one launch for a list of problems) with ``tile`` (from
    :func:`grouped_tile`, which the launcher also used to build its tile table, so the tile
    is fixed before the arguments exist) and the family's explicit ``enable_fp_fusion``.

    ``EVEN_K`` holds for the launch iff every problem's ``K`` is a multiple of ``tile.bk``,
    i.e. iff ``gcd(K_i)`` is: the key recorded for the compile check carries that gcd as its
    ``K`` (which :func:`choose_config` does not use), so re-tiling per arch keeps EVEN_K true.
    No runtime autotuning (a list has no single shape to tune for). ``aligned``: as
    :func:`grouped_tile` (recorded in the key, so the compile check re-tiles as the launcher would).
    """
    family = FAMILY_OF[kernel_name]
    wide = max(op_bytes) >= 4
    k_all = 0
    for p in problems:
        k_all = math.gcd(k_all, int(p[2]))
    M, N, _ = max(problems, key=lambda p: (p[0] * p[1], p))
    full = dict(meta, **_tile_meta(family, tile, k_all), enable_fp_fusion=FP_FUSION[family])
    if _CAPTURE is not None:
        key = dict(M=M, N=N, K=k_all, op_bytes=list(op_bytes), side=side, mode=mode, qblock=qblock, aligned=aligned)
        _CAPTURE.append(Launch(family, kernel, args, full, kernel_name, wide, key))
        return
    with device_guard(device):
        arch = device_arch(device)
        name = _chosen_name(kernel_name, qblock, aligned)
        CHOSEN[(name, M, N, k_all, tuple(op_bytes), side, mode, arch)] = tile.label()
        kernel[grid](*args, **full)


def _chosen_name(kernel_name: str, qblock: int, aligned: bool) -> str:
    """The kernel's name in :data:`CHOSEN`: with its quantization block (8-bit kernels) and
    ``unaligned`` where the launch took the :data:`UNALIGNED` table's choice."""
    if kernel_name not in _Q8_KERNELS:
        return kernel_name
    return f"{kernel_name}[qblock={qblock}" + ("" if aligned else ",unaligned") + "]"


def _tile_meta(family: str, tile: Tile, K: int) -> dict:
    return dict(tile.meta(family), EVEN_K=K % tile.bk == 0)


def _autotune(kernel_name, kernel, grid, args, meta, device, arch, wide, K, restore, mode=0, qblock=256,
              aligned=True) -> Tile:
    """Time every candidate (restoring ``restore`` after each run); rank 0's choice wins."""
    family = FAMILY_OF[kernel_name]
    cands = candidates(kernel_name, arch, wide=wide, mode=mode, qblock=qblock or 256, aligned=aligned)
    saved = [t.clone() for t in restore]

    def put_back():
        for t, s in zip(restore, saved):
            t.copy_(s)

    times = []
    for tile in cands:
        def run(tile=tile):
            kernel[grid(tile)](*args, **meta, **_tile_meta(family, tile, K), enable_fp_fusion=FP_FUSION[family])
            put_back()

        try:
            times.append(triton.testing.do_bench(run, warmup=5, rep=20))
        except Exception:  # a candidate that fails to compile/launch here is never chosen
            times.append(float("inf"))
            put_back()
    best = min(range(len(cands)), key=lambda i: times[i])
    best = broadcast_choice(best, device)
    return cands[best]


def broadcast_choice(index: int, device: torch.device) -> int:
    """Rank 0's ``index`` when ``torch.distributed`` is initialized (every rank calls this), else ``index``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(index)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(index)], dtype=torch.int64, device=on)
    dist.broadcast(t, src=0)
    return int(t.item())
