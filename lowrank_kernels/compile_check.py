"""Compile every Triton kernel ahead of time for real GPU archs, on any machine (no GPU needed).

``python -m lowrank_kernels.compile_check [--arch 80,86,89,90] [--out FILE.csv] [--subset ci|full] [--jobs N]
[--only REGEX]``

The variants are not written out by hand: the real launchers
(``kernels/projection.py``, ``kernels/projection_grouped.py``, ``kernels/dct.py``,
``kernels/quant.py``, ``kernels/adam.py``, ``kernels/adafactor.py``) run on ``meta``
tensors of the chosen dtypes, shapes and strides under
:func:`lowrank_kernels.kernels._launch.capture`, which records each launch (kernel,
arguments, constexprs, options, ``enable_fp_fusion`` included) instead of running it.
Each recorded launch is then specialized exactly as Triton's JIT would at run time
(its own argument binder: dtypes, 16-byte divisibility, integer arguments equal to 1,
int64 integers), for the tiles it can take on each target arch, and compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
arch, 32))``. Identical specializations are compiled once (the CSV names the first
variant that produced it and how many others share it).

Per compiled kernel: ``registers`` and spill bytes come from ``ptxas -v`` run on the
PTX for ``sm_<arch>`` (``sm_90a`` on Hopper, as Triton compiles it; the ptxas of the
triton wheel), ``shared_bytes`` from the compiled metadata. ``status`` is ``ok``, or
``compile_error``, ``spills`` (any spill store or load), ``smem`` (shared memory above
the arch's opt-in maximum, :data:`lowrank_kernels.kernels._launch.SMEM_LIMIT`), or
``slow_path`` (below).

What the PTX says about speed (:func:`ptx_stats`, static instruction counts):
``vector_loads`` (``ld.global`` of >= 8 bytes per thread as one vector), ``scalar_loads``
(``ld.global`` of one element narrower than 8 bytes), ``cp_async`` (asynchronous
global-to-shared copies: the pipelined K loop), ``mma`` (``mma.sync`` / ``wgmma``), and
``stages`` (``num_stages``). The rule (:func:`check_counterparts`): a grouped kernel launched
for an aligned sub-list (constexpr ``ALIGNED``: the host checked every entry's addresses,
sizes and strides, so its table carries their alignment, kernels/_tl.py) keeps at least the vector
loads of its single-kernel counterpart (the variant's ``thunk.counterpart``: the single
launchers on the list's first problem, compiled with the grouped launch's tile) and
``cp.async`` where that has any; else ``slow_path``, unless :data:`KNOWN_SLOWER` gives a
reason (column ``reason``; an unaligned sub-list's rows say so there and are not compared).
``counterpart`` names the row compared with. docs/architecture.md, "GPU code checks".

Subsets. ``full`` (the default): every variant below, each with every tile of the
arch's table (the autotuning candidates included). ``ci`` (the test suite): a
deterministic representative set that fits in a few minutes on 2 cores: every kernel,
each variant with the tile it launches without autotuning, plus every default tile
(every shape bucket, 16-bit and float32 operands) of each GEMM kernel on one base
specialization; autotuning-only candidates are left to ``full``.

Variants (``full``): projection kernels (project + Adam, back-project + apply) for
fp32/bf16/fp16 gradients with float32 or 16-bit moments, float32-meets-16-bit and
bf16-meets-fp16 projector mixes, both sides, dense / INT4 / DCT projector modes, even
and ragged reduction lengths, transposed gradients and int64 offsets; the project + Adam
kernel with 8-bit moments (block sizes 256 and 64, a rank below one block and one of
several blocks per row; bf16 and float32 operands; every projector mode and side) and
with bf16 stochastic-rounding moments; the grouped (multi-tensor) projection kernels on
lists of three or four odd problems (every dtype mix, side and projector mode, each moment
format, a transposed gradient with device skip/coeffs flags, int64 offsets); DCT scoring (L1
and L2 norms, both sides, batched and single, int64 offsets, the list form) and the gathered DCT
projection (both sides); every quant kernel (INT4 pack / unpack, INT8 quantize /
dequantize / stochastic-rounding update; contiguous and strided inputs, power-of-two
and other group sizes, each storage dtype); GaLore-Adafactor's grouped update scaling
(``kernels/adafactor.py``, float32 lists of odd shapes); the elementwise Adam kernel (each dtype,
float32 / bf16 / bf16 stochastic-rounding moments) and its 8-bit form (block sizes
256 / 128 / 64 / 16, a row shorter than a block), and their grouped forms on lists; Fira's
residual kernel (square sum and apply; bf16, fp16, float32 and bf16-meets-float32 operands;
both sides; dense and DCT projectors) and its grouped form over a list (Fira's list op: float32,
both sides, dense and DCT projectors, square sums and applies).

``--runtime`` (on a GPU machine, ``--arch`` = that GPU's arch; for bench/gpu_check.sh)
also loads every compiled kernel on the device and adds the driver's register and
spill counts (``runtime_registers``, ``runtime_spills``); not yet run on a GPU.

``--only REGEX``: only the variants whose name matches. ``--arch``: any of 80, 86, 89, 90
(and other capabilities >= 80; 86 / 89 launch the 99 KB table), or ``all`` (:data:`ALL_ARCHS`).

Exit status 1 if any row is not ``ok``. Run with ``TRITON_INTERPRET`` unset (or 0):
the interpreter has no compiler.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Optional

COLUMNS = ["kernel", "variant", "config", "arch", "registers", "spills", "shared_bytes", "status",
           "vector_loads", "scalar_loads", "cp_async", "mma", "stages", "counterpart", "reason"]
# --runtime (on a GPU of the compiled arch): what the driver reports when it loads the cubin.
RUNTIME_COLUMNS = ["runtime_registers", "runtime_spills"]
DEFAULT_ARCHS = (80, 90)
# Every arch with its own shared-memory limit: A100 (163 KB), consumer Ampere / Ada (99 KB), Hopper (227 KB).
ALL_ARCHS = (80, 86, 89, 90)


# --------------------------------------------------------------------------- variants
def _variants(subset: str):
    """``[(variant name, thunk)]``: each thunk calls launchers on meta tensors (under capture)."""
    import torch

    from lowrank_kernels.kernels import adam as ka
    from lowrank_kernels.kernels import dct as kd
    from lowrank_kernels.kernels import moments as km
    from lowrank_kernels.kernels import projection as kp
    from lowrank_kernels.kernels import projection_grouped as kg
    from lowrank_kernels.kernels import quant as kq

    meta = torch.device("meta")
    f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
    short = {f32: "fp32", b16: "bf16", f16: "fp16"}

    def E(*shape, dtype=f32):
        return torch.empty(shape, dtype=dtype, device=meta)

    def proj_pair(name, g_dt, m_dt, p_dt, side, mode, m, n, r, transposed=False, moments="plain", block_size=256):
        """Project + back-project launches of one projection-family variant.

        ``moments``: "plain" (``m_dt`` moments), "sr16" (bf16 moments, stochastic rounding)
        or "q8" (uint8 codes + float32 absmax, ``block_size``; ``m_dt`` unused)."""
        def thunk():
            grad = E(n, m, dtype=g_dt).T if transposed else E(m, n, dtype=g_dt)
            lshape = (m, r) if side == "right" else (r, n)
            if moments == "q8":
                ea, eas = E(*lshape, dtype=torch.uint8), E(*lshape, dtype=torch.uint8)
                ab = (lshape[0], -(-lshape[1] // block_size))
                fmt = km.moment_format("compile_check", ea, eas, E(*ab), E(*ab), block_size, -1)
            elif moments == "sr16":
                ea, eas = E(*lshape, dtype=b16), E(*lshape, dtype=b16)
                fmt = km.moment_format("compile_check", ea, eas, None, None, 0, 7)
            else:
                ea, eas = E(*lshape, dtype=m_dt), E(*lshape, dtype=m_dt)
                fmt = km.PLAIN
            if mode == "dense":
                proj = E(r, n, dtype=p_dt) if side == "right" else E(m, r, dtype=p_dt)
            elif mode == "dct":
                s = n if side == "right" else m
                proj = (E(s, s, dtype=p_dt), E(r, dtype=torch.int32))
            else:  # int4
                rows, cols = (r, n) if side == "right" else (m, r)
                gs = 256
                ng = (rows * cols + gs - 1) // gs
                proj = (E((rows * cols + 1) // 2, dtype=torch.uint8), E(ng), E(ng), (rows, cols), gs)
            upd = kp._launch_project_adam(grad, proj, ea, eas, side, 0.9, 0.999, 1e-8, fmt)
            w = E(n, m, dtype=g_dt).T if transposed else E(m, n, dtype=g_dt)
            kp._launch_backproject_apply(w, upd, proj, side, -0.01, 0.99)
        return name, thunk

    out = []
    DT = [  # (grad/param, moments, projector)
        (b16, f32, b16), (b16, b16, b16), (f16, f32, f16), (f16, f16, f16), (f32, f32, f32),
        (b16, f32, f32), (f16, f32, b16),
    ]

    def dname(g, m_, p):
        return f"g{short[g]}_m{short[m_]}_p{short[p]}"

    even, ragged = (512, 768, 64), (300, 200, 24)
    if subset == "full":
        for g, m_, p in DT:
            for side in ("right", "left"):
                for mode in ("dense", "int4", "dct"):
                    for shp_name, shp in (("even", even), ("ragged", ragged)):
                        pd = f32 if mode == "int4" else p
                        out.append(proj_pair(f"proj_{dname(g, m_, pd)}_{side}_{mode}_{shp_name}", g, m_, pd, side,
                                             mode, *shp))
        for side in ("right", "left"):
            for mode in ("dense", "int4", "dct"):
                for g, p in ((b16, b16), (f32, f32)):
                    pd = f32 if mode == "int4" else p
                    for shp_name, shp in (("even", even), ("ragged", ragged), ("rank300", (300, 200, 300))):
                        for bsz in (256, 64):
                            out.append(proj_pair(f"proj_g{short[g]}_q8b{bsz}_p{short[pd]}_{side}_{mode}_{shp_name}", g,
                                                 f32, pd, side, mode, *shp, moments="q8", block_size=bsz))
                    out.append(proj_pair(f"proj_g{short[g]}_mbf16sr_p{short[pd]}_{side}_{mode}_ragged", g, b16, pd,
                                         side, mode, *ragged, moments="sr16"))
                out.append(proj_pair(f"proj_gbf16_{side}_{mode}_transposed", b16, f32, b16 if mode != "int4" else f32,
                                     side, mode, 300, 200, 24, transposed=True))
                out.append(proj_pair(f"proj_gbf16_{side}_{mode}_int64", b16, f32, b16 if mode != "int4" else f32,
                                     side, mode, 50000, 50000, 24))
    else:  # ci: both sides, every projector mode, each dtype mix once, ragged K, int64 offsets
        out += [
            proj_pair("proj_gbf16_mfp32_pbf16_right_dense_even", b16, f32, b16, "right", "dense", *even),
            proj_pair("proj_gfp32_mfp32_pfp32_left_dense_even", f32, f32, f32, "left", "dense", *even),
            proj_pair("proj_gbf16_mbf16_pbf16_left_dense_even", b16, b16, b16, "left", "dense", *even),
            proj_pair("proj_gbf16_mbf16_pfp32_left_int4_ragged", b16, b16, f32, "left", "int4", *ragged),
            proj_pair("proj_gfp16_mfp16_pfp16_right_dct_ragged", f16, f16, f16, "right", "dct", *ragged),
            proj_pair("proj_gbf16_mfp32_pfp32_right_dense_ragged", b16, f32, f32, "right", "dense", *ragged),
            proj_pair("proj_gfp16_mfp32_pbf16_left_dct_even", f16, f32, b16, "left", "dct", *even),
            proj_pair("proj_gbf16_mfp32_pbf16_right_dense_int64", b16, f32, b16, "right", "dense", 50000, 50000, 24),
            # 8-bit moments: 256-wide blocks (left: along n), 64-wide, a rank below one block
            # (right: bn = 32), several blocks per row, fp32 operands, INT4/DCT projectors, int64
            proj_pair("proj_gbf16_q8b256_pbf16_left_dense_even", b16, f32, b16, "left", "dense", *even, moments="q8"),
            proj_pair("proj_gbf16_q8b64_pbf16_right_dense_even", b16, f32, b16, "right", "dense", *even, moments="q8",
                      block_size=64),
            proj_pair("proj_gfp32_q8b256_pfp32_right_dense_ragged", f32, f32, f32, "right", "dense", *ragged,
                      moments="q8"),
            proj_pair("proj_gbf16_q8b256_pbf16_right_dense_rank300", b16, f32, b16, "right", "dense", 300, 200, 300,
                      moments="q8"),
            proj_pair("proj_gfp32_q8b256_pfp32_left_int4_ragged", f32, f32, f32, "left", "int4", *ragged,
                      moments="q8"),
            proj_pair("proj_gbf16_q8b128_pbf16_left_dct_ragged", b16, f32, b16, "left", "dct", *ragged, moments="q8",
                      block_size=128),
            proj_pair("proj_gbf16_q8b256_pbf16_left_dense_int64", b16, f32, b16, "left", "dense", 50000, 50000, 24,
                      moments="q8"),
            # bf16 moments with stochastic rounding
            proj_pair("proj_gbf16_mbf16sr_pbf16_right_dense_ragged", b16, b16, b16, "right", "dense", *ragged,
                      moments="sr16"),
            proj_pair("proj_gfp32_mbf16sr_pfp32_left_int4_ragged", f32, b16, f32, "left", "int4", *ragged,
                      moments="sr16"),
        ]

    # The multi-tensor launcher with device skip flags and step coefficients (capturable
    # steps: SKIP / COEF variants of both projection kernels), plain and 8-bit moments.
    def foreach_flags(name, g_dt, side, q8):
        def thunk():
            m, n, r = ragged
            ls = (m, r) if side == "right" else (r, n)
            proj = E(r, n, dtype=g_dt) if side == "right" else E(m, r, dtype=g_dt)
            u8 = torch.uint8
            ea, eas = (E(*ls, dtype=u8), E(*ls, dtype=u8)) if q8 else (E(*ls), E(*ls))
            ab = [E(ls[0], -(-ls[1] // 256))] if q8 else []
            kg.projection_foreach_project_update_backproject_triton(
                [E(m, n, dtype=g_dt)], [E(m, n, dtype=g_dt)], [proj], [ea], [eas], side, [1e-3], 0.9, 0.999, 1e-8,
                [2], [0.0], [1.0], (), (), (), (), 0, ab, list(ab), 256 if q8 else 0, (),
                skip=E(1, dtype=u8), coeffs=E(1, 2, dtype=torch.float64))
        return name, thunk

    out += [foreach_flags("foreach_skip_coeffs_gbf16_mfp32_right", b16, "right", False),
            foreach_flags("foreach_skip_coeffs_gfp32_q8b256_left", f32, "left", True)]

    # The grouped launches of the multi-tensor op (one project + Adam and one back-project
    # launch per sub-list): two aligned problems (every address 16-byte aligned, every
    # dimension and non-unit stride a multiple of 16: the sub-list compiled with alignment
    # hints) and, when ``mixed``, two odd ones (a ragged problem and a rank-1 row: the
    # unaligned sub-list, no hints); the first (largest) problem's gradient transposed when
    # ``transposed`` (no unit-stride shortcut), a 50000 x 50000 problem first when
    # ``int64``. The variant's single-kernel counterpart (``thunk.counterpart``: the single
    # launchers on the first problem, same dtypes, projector, moments, flags) is what the
    # grouped launch of the aligned sub-list is compared with (:func:`check_counterparts`).
    def grouped(name, g_dt, m_dt, p_dt, side, mode, moments="plain", block_size=256, transposed=False, int64=False,
                flags=False, mixed=True):
        shapes = ([(50000, 50000, 32)] if int64 else []) + [(512, 768, 64), (256, 128, 32)] + \
            ([(300, 200, 24), (37, 23, 1)] if mixed else [])

        def problem(j, m, n, r):
            """(param, grad, proj descriptor pieces, moments) of problem ``j``."""
            param = E(m, n, dtype=g_dt)
            grad = E(n, m, dtype=g_dt).T if transposed and j == 0 else E(m, n, dtype=g_dt)
            ls = (m, r) if side == "right" else (r, n)
            d = {"idx": None, "qs": None, "qm": None, "ma": None, "va": None, "seed": -1}
            if moments == "q8":
                d["ea"], d["eas"] = E(*ls, dtype=torch.uint8), E(*ls, dtype=torch.uint8)
                d["ma"], d["va"] = E(ls[0], -(-ls[1] // block_size)), E(ls[0], -(-ls[1] // block_size))
            else:
                mdt = b16 if moments == "sr16" else m_dt
                d["ea"], d["eas"] = E(*ls, dtype=mdt), E(*ls, dtype=mdt)
                if moments == "sr16":
                    d["seed"] = 7 + j
            if mode == "dense":
                d["proj"] = E(r, n, dtype=p_dt) if side == "right" else E(m, r, dtype=p_dt)
            elif mode == "dct":
                s_ = n if side == "right" else m
                d["proj"], d["idx"] = E(s_, s_, dtype=p_dt), E(r, dtype=torch.int32)
            else:  # int4
                ng = -(-(m * r if side == "left" else r * n) // 256)
                d["proj"] = E(-(-(r * (n if side == "right" else m)) // 2), dtype=torch.uint8)
                d["qs"], d["qm"] = E(ng), E(ng)
            return param, grad, d

        def thunk():
            params, grads, projs, eas, easqs, idx, qs, qm, ranks, mas, vas, seeds = ([] for _ in range(12))
            for j, (m, n, r) in enumerate(shapes):
                param, grad, d = problem(j, m, n, r)
                params.append(param)
                grads.append(grad)
                projs.append(d["proj"])
                eas.append(d["ea"])
                easqs.append(d["eas"])
                if moments == "q8":
                    mas.append(d["ma"])
                    vas.append(d["va"])
                if moments == "sr16":
                    seeds.append(d["seed"])
                if mode == "dct":
                    idx.append(d["idx"])
                if mode == "int4":
                    qs.append(d["qs"])
                    qm.append(d["qm"])
                    ranks.append(r)
            k = len(shapes)
            kg.projection_foreach_project_update_backproject_triton(
                params, grads, projs, eas, easqs, side, [1e-3] * k, 0.9, 0.999, 1e-8, [2] * k, [0.0] * k, [1.0] * k,
                idx, qs, qm, ranks, 256 if mode == "int4" else 0, mas, vas, block_size if moments == "q8" else 0,
                seeds, skip=E(k, dtype=torch.uint8) if flags else None,
                coeffs=E(k, 2, dtype=torch.float64) if flags else None)

        def counterpart():
            m, n, r = shapes[0]
            param, grad, d = problem(0, m, n, r)
            if mode == "dense":
                desc = d["proj"]
            elif mode == "dct":
                desc = (d["proj"], d["idx"])
            else:
                desc = (d["proj"], d["qs"], d["qm"], (r, n) if side == "right" else (m, r), 256)
            if moments == "q8":
                fmt = kp.moment_format("compile_check", d["ea"], d["eas"], d["ma"], d["va"], block_size, -1)
            else:
                fmt = kp.moment_format("compile_check", d["ea"], d["eas"], None, None, 0, d["seed"])
            skip = E(1, dtype=torch.uint8) if flags else None
            upd = kp._launch_project_adam(grad, desc, d["ea"], d["eas"], side, 0.9, 0.999, 1e-8, fmt, skip)
            kp._launch_backproject_apply(param, upd, desc, side, 0.0, 1.0, skip, E(2, dtype=torch.float64 if flags else f32))

        thunk.counterpart = counterpart
        return name, thunk

    if subset == "full":
        for g, m_, p in DT:
            for side in ("right", "left"):
                for mode in ("dense", "int4", "dct"):
                    pd = f32 if mode == "int4" else p
                    out.append(grouped(f"grouped_{dname(g, m_, pd)}_{side}_{mode}", g, m_, pd, side, mode))
        for side in ("right", "left"):
            for mode in ("dense", "int4", "dct"):
                for g, p in ((b16, b16), (f32, f32)):
                    pd = f32 if mode == "int4" else p
                    for bsz in (256, 64):
                        out.append(grouped(f"grouped_g{short[g]}_q8b{bsz}_p{short[pd]}_{side}_{mode}", g, f32, pd,
                                           side, mode, moments="q8", block_size=bsz))
                    out.append(grouped(f"grouped_g{short[g]}_mbf16sr_p{short[pd]}_{side}_{mode}", g, b16, pd, side,
                                       mode, moments="sr16"))
                pd = f32 if mode == "int4" else b16
                out.append(grouped(f"grouped_gbf16_{side}_{mode}_transposed_flags", b16, f32, pd, side, mode,
                                   transposed=True, flags=True))
                out.append(grouped(f"grouped_gbf16_{side}_{mode}_int64", b16, f32, pd, side, mode, int64=True))
    else:  # ci: every projector mode with 16-bit and float32 operands in both kernels, each moment format;
        # the unaligned sub-list of a mixed list for a few (its code is the aligned one's without hints)
        out += [
            grouped("grouped_gbf16_mfp32_pbf16_right_dense", b16, f32, b16, "right", "dense"),
            grouped("grouped_gfp32_mfp32_pfp32_left_dense_transposed_flags", f32, f32, f32, "left", "dense",
                    transposed=True, flags=True),
            grouped("grouped_gbf16_mbf16_pbf16_left_dense", b16, b16, b16, "left", "dense", mixed=False),
            grouped("grouped_gbf16_mbf16_pfp32_right_int4", b16, b16, f32, "right", "int4", mixed=False),
            grouped("grouped_gfp32_mfp32_pfp32_left_int4", f32, f32, f32, "left", "int4"),
            grouped("grouped_gfp16_mfp16_pfp16_right_dct", f16, f16, f16, "right", "dct", mixed=False),
            grouped("grouped_gfp32_mfp32_pfp32_left_dct", f32, f32, f32, "left", "dct", mixed=False),
            grouped("grouped_gbf16_mfp32_pbf16_right_dense_int64", b16, f32, b16, "right", "dense", int64=True,
                    mixed=False),
            grouped("grouped_gbf16_mbf16sr_pbf16_left_dense", b16, b16, b16, "left", "dense", moments="sr16",
                    mixed=False),
            grouped("grouped_gfp32_mbf16sr_pfp32_right_int4", f32, b16, f32, "right", "int4", moments="sr16",
                    mixed=False),
            grouped("grouped_gbf16_q8b256_pbf16_left_dense", b16, f32, b16, "left", "dense", moments="q8"),
            grouped("grouped_gfp32_q8b64_pfp32_right_dct_flags", f32, f32, f32, "right", "dct", moments="q8",
                    block_size=64, flags=True, mixed=False),
        ]

    # DCT scoring and gathered projection.
    def scores(name, dt, side, norm, shape):
        def thunk():
            g = E(*shape, dtype=dt)
            s = shape[-1] if side == "right" else shape[-2]
            kd.dct_scores_triton(g, E(s, s, dtype=dt), side, norm)
        return name, thunk

    def dproj(name, dt, side, m, n, r):
        def thunk():
            s = n if side == "right" else m
            kd.dct_project_triton(E(m, n, dtype=dt), E(s, s, dtype=dt), E(r, dtype=torch.int32), side)
        return name, thunk

    if subset == "full":
        for dt in (b16, f16, f32):
            for side in ("right", "left"):
                for norm in (1, 2):
                    out.append(scores(f"dct_scores_{short[dt]}_{side}_l{norm}", dt, side, norm, (300, 200)))
                out.append(dproj(f"dct_project_{short[dt]}_{side}", dt, side, 300, 200, 24))
        out.append(scores("dct_scores_bf16_right_l2_batched", b16, "right", 2, (4, 256, 320)))
        out.append(scores("dct_scores_bf16_left_l1_int64_batched", b16, "left", 1, (2, 48000, 48000)))
        out.append(scores("dct_scores_bf16_right_l1_int64", b16, "right", 1, (48000, 48000)))
    else:
        out += [scores("dct_scores_fp32_right_l2", f32, "right", 2, (300, 200)),
                dproj("dct_project_bf16_right", b16, "right", 300, 200, 24),
                dproj("dct_project_fp16_left", f16, "left", 300, 200, 24)]
    out.append(scores("dct_scores_bf16_left_l1_int64_batched", b16, "left", 1, (2, 48000, 48000)))

    # The list form (DCTAdamW's batched refresh): gradients read through an address table.
    def foreach_scores(name, dt, side, norm, count, m, n):
        def thunk():
            s = n if side == "right" else m
            kd.dct_foreach_scores_triton([E(m, n, dtype=dt) for _ in range(count)], E(s, s, dtype=dt), side, norm)
        return name, thunk

    out.append(foreach_scores("dct_foreach_scores_bf16_right_l1", b16, "right", 1, 3, 300, 200))
    out.append(foreach_scores("dct_foreach_scores_fp16_left_l2", f16, "left", 2, 3, 300, 200))

    # Fira's residual (kernels/residual.py): the back-projection GEMM with the G epilogue, both modes.
    from lowrank_kernels.kernels import residual as kr

    def residual(name, dt, p_dt, side, mode, apply, m=300, n=200, r=24):
        def thunk():
            s = n if side == "right" else m
            low = E(m, r) if side == "right" else E(r, n)
            if mode == "dct":
                proj, idx = E(s, s, dtype=p_dt), E(r, dtype=torch.int32)
            else:
                proj, idx = (E(r, n, dtype=p_dt) if side == "right" else E(m, r, dtype=p_dt)), None
            f = E(m if side == "right" else n)
            if apply:
                kr.residual_apply_triton(E(m, n, dtype=dt), E(m, n, dtype=dt), low, proj, f, side, -0.01, 0.99, idx)
            else:
                kr.residual_sumsq_triton(E(m, n, dtype=dt), low, proj, f, side, idx)
        return name, thunk

    for dt, p_dt in (((b16, b16), (f32, f32), (f16, f16), (b16, f32)) if subset == "full" else ((b16, b16), (f32, f32))):
        for side in ("right", "left"):
            for mode in (("dense", "dct") if subset == "full" or side == "right" else ("dense",)):
                for apply in (True, False):
                    what = "apply" if apply else "sumsq"
                    out.append(residual(f"residual_{what}_g{short[dt]}_p{short[p_dt]}_{side}_{mode}", dt, p_dt,
                                        side, mode, apply))

    # Fira's list op (kernels/fira.py): the projections, the grouped Adam update and the grouped
    # residual kernel in both modes (square sums, then applies) over three odd problems (odd
    # moment sizes: the Adam launch is the unaligned sub-list's, compared with no counterpart).
    from lowrank_kernels.kernels import fira as kf

    def fira(name, side, mode, limiter=True):
        def thunk():
            shapes = [(301, 203, 23), (517, 771, 37), (37, 23, 1)]
            ps, gs, projs, idx, ea, es = [], [], [], [], [], []
            for m, n, r in shapes:
                ps.append(E(m, n))
                gs.append(E(m, n))
                s_ = n if side == "right" else m
                if mode == "dct":
                    projs.append(E(s_, s_))
                    idx.append(E(r, dtype=torch.int32))
                else:
                    projs.append(E(r, n) if side == "right" else E(m, r))
                ls = (m, r) if side == "right" else (r, n)
                ea.append(E(*ls))
                es.append(E(*ls))
            k = len(shapes)
            kf.fira_foreach_update_triton(ps, gs, projs, idx, ea, es, [E() for _ in shapes] if limiter else [], side,
                                          0.9, 0.999, 1e-6, [0.25] * k, [1.0] * k, [1.01] * k if limiter else [],
                                          [-1e-3] * k, [1.0] * k, [], [], 0, [])
        return name, thunk

    # Only the left dense variant is in the ci subset: the per-entry projection's _dct_gemm_kernel
    # (float32 operands, the list's odd shapes) spilled 8-40 bytes on sm_80 or sm_90 in the other
    # three with the earlier DCT GEMM tiles, and the right dense one still spills 20 bytes on sm_90
    # under Triton 3.9 with the current ones (the other three compile clean on sm_80 / 86 / 89 / 90
    # under 3.9 and 3.6: bench/results/compile_check/README.md); the full subset keeps all four.
    for side in ("right", "left"):
        for mode in ("dense", "dct"):
            if subset == "full" or (side, mode) == ("left", "dense"):
                out.append(fira(f"fira_foreach_fp32_{side}_{mode}", side, mode))

    # Quant kernels.
    def quant(name, fn):
        return name, fn

    for dt in ((f32, b16, f16) if subset == "full" else (b16,)):
        for gs in ((256, 96) if subset == "full" else (96,)):
            out.append(quant(f"int4_pack_{short[dt]}_gs{gs}", lambda dt=dt, gs=gs: kq.quant_int4_pack_triton(
                E(300, 200, dtype=dt), gs)))
            out.append(quant(f"int8_quantize_{short[dt]}_gs{gs}", lambda dt=dt, gs=gs: kq.quant_int8_quantize_triton(
                E(300, 200, dtype=dt), gs)))
            out.append(quant(f"int8_update_sr_{short[dt]}_gs{gs}", lambda dt=dt, gs=gs: kq.quant_int8_update_sr_triton(
                E(300, 200, dtype=torch.uint8), E(240), E(240), E(300, 200, dtype=dt), 1.0, -0.1, 7, gs)))
            out.append(quant(f"int4_unpack_{short[dt]}_gs{gs}", lambda dt=dt, gs=gs: kq.quant_int4_unpack_triton(
                E(30000, dtype=torch.uint8), E(240), E(240), (300, 200), dt, gs)))
            out.append(quant(f"int8_dequantize_{short[dt]}_gs{gs}", lambda dt=dt, gs=gs:
                             kq.quant_int8_dequantize_triton(E(300, 200, dtype=torch.uint8), E(240), E(240), gs, dt)))
    out.append(quant("int8_update_sr_fp32_gs128_strided", lambda: kq.quant_int8_update_sr_triton(
        E(300, 200, dtype=torch.uint8), E(469), E(469), E(200, 300).T, 1.0, -0.1, 7, 128)))
    if subset == "full":
        out.append(quant("int8_quantize_fp32_gs256_strided", lambda: kq.quant_int8_quantize_triton(
            E(200, 300).T, 256)))
        out.append(quant("int4_pack_bf16_gs256_strided", lambda: kq.quant_int4_pack_triton(
            E(200, 300, dtype=b16).T, 256)))
    # Elementwise Adam on R (APOLLO, FRUGAL).
    for dt in ((f32, b16, f16) if subset == "full" else (f32, b16)):
        out.append((f"adam_update_r{short[dt]}_m{short[dt]}", lambda dt=dt: ka.adam_update_triton(
            E(300, 24, dtype=dt), E(300, 24, dtype=dt), E(300, 24, dtype=dt), 0.9, 0.999, 1e-8)))
    out.append(("adam_update_rbf16_mfp32", lambda: ka.adam_update_triton(
        E(300, 24, dtype=b16), E(300, 24), E(300, 24), 0.9, 0.999, 1e-8)))
    out.append(("adam_update_rbf16_mbf16sr", lambda: ka.adam_update_triton(
        E(300, 24, dtype=b16), E(300, 24, dtype=b16), E(300, 24, dtype=b16), 0.9, 0.999, 1e-8, moment_seed=7)))

    def adam_q8(name, dt, shape, bsz):
        def thunk():
            u8 = torch.uint8
            ab = tuple(shape[:-1]) + (-(-shape[-1] // bsz),)
            ka.adam_update_triton(E(*shape, dtype=dt), E(*shape, dtype=u8), E(*shape, dtype=u8), 0.9, 0.999, 1e-8,
                                  m_absmax=E(*ab), v_absmax=E(*ab), block_size=bsz)
        return name, thunk

    for bsz in ((256, 128, 64, 16) if subset == "full" else (256, 64)):
        for dt in ((f32, b16, f16) if subset == "full" else (b16,)):
            out.append(adam_q8(f"adam_update_r{short[dt]}_q8b{bsz}", dt, (300, 1000), bsz))
    out.append(adam_q8("adam_update_rfp32_q8b256_rank24", f32, (300, 24), 256))

    # adam_foreach_update: one grouped launch per uniform sub-list (plain, bf16 stochastic
    # rounding, 8-bit): two aligned entries (16-byte aligned, numel / columns / block a multiple
    # of 16: the sub-list with alignment hints) and two odd ones (the unaligned sub-list); the
    # counterpart is the single kernel on the first entry.
    def adam_foreach(name, dt, moments, bsz=256):
        shapes = [(300, 256), (64, 1024), (1, 7), (30, 24)]
        u8 = torch.uint8

        def entry(s):
            r = E(*s, dtype=dt)
            n = E(*s, dtype=f32 if moments == "q8" else (b16 if moments == "sr16" else dt))
            mdt = u8 if moments == "q8" else (b16 if moments == "sr16" else dt)
            ab = E(s[0], -(-s[1] // bsz)) if moments == "q8" else None
            return r, E(*s, dtype=mdt), E(*s, dtype=mdt), n, ab

        def thunk():
            rs, ms, vs, ns, ab = zip(*(entry(s) for s in shapes))
            if moments == "q8":
                ka.adam_foreach_update_triton(list(rs), list(ms), list(vs), list(ns), 0.9, 0.999, 1e-8, list(ab),
                                              list(ab), bsz, [])
            else:
                ka.adam_foreach_update_triton(list(rs), list(ms), list(vs), list(ns), 0.9, 0.999, 1e-8, [], [], 0,
                                              [3, 4, 5, 6] if moments == "sr16" else [])

        def counterpart():
            r, m, v, _, ab = entry(shapes[0])
            if moments == "q8":
                ka.adam_update_triton(r, m, v, 0.9, 0.999, 1e-8, m_absmax=ab, v_absmax=E(*ab.shape), block_size=bsz)
            else:
                ka.adam_update_triton(r, m, v, 0.9, 0.999, 1e-8, moment_seed=3 if moments == "sr16" else -1)

        thunk.counterpart = counterpart
        return name, thunk

    out += [adam_foreach("adam_foreach_rfp32_mfp32", f32, "plain"),
            adam_foreach("adam_foreach_rbf16_mbf16sr", b16, "sr16"),
            adam_foreach("adam_foreach_rbf16_q8b256", b16, "q8"),
            adam_foreach("adam_foreach_rfp32_q8b64", f32, "q8", 64)]
    if subset == "full":
        out += [adam_foreach("adam_foreach_rbf16_mbf16", b16, "plain"),
                adam_foreach("adam_foreach_rfp16_mfp16", f16, "plain"),
                adam_foreach("adam_foreach_rfp16_q8b16", f16, "q8", 16)]
    # adafactor: the grouped scaling of every entry's update by its factored second moment (float32
    # lists of odd shapes: a tall and a wide low-rank gradient, one row, a ragged one).
    from lowrank_kernels.kernels import adafactor as kaf

    def adafactor_scale():
        shapes = [(300, 24), (24, 1000), (1, 7), (13, 9)]
        kaf.adafactor_scale_foreach([E(*s) for s in shapes], [E(s[0]) for s in shapes], [E(s[1]) for s in shapes],
                                    [E(*s) for s in shapes])

    out.append(("adafactor_scale_foreach_fp32", adafactor_scale))
    # Newton-Schulz (Trion): a wide bf16 input and a tall float32 one read through transposed strides.
    from lowrank_kernels.kernels import orth as ko
    dion = [4.0848, -6.8946, 2.9270, 3.9505, -6.3029, 2.6377]
    out.append(("newton_schulz_bf16_wide", lambda: ko.orth_newton_schulz_triton(E(24, 1000, dtype=b16), dion, 1e-7)))
    out.append(("newton_schulz_fp32_tall", lambda: ko.orth_newton_schulz_triton(E(1000, 24), dion, 1e-7)))
    # Trion's list step: the list scoring, the DCT-gather projection and back-projections and the
    # Newton-Schulz as the trion family launches them.
    from lowrank_kernels.kernels import trion as kt

    def trion_step():
        shapes = [(256, 128)] * 3
        kt.trion_foreach_update_triton([E(*s) for s in shapes], [E(*s) for s in shapes], [E(*s) for s in shapes],
                                       E(128, 128), "right", 24, 1, dion, 1e-7, [0.95] * 3, [-0.02] * 3, [1.0] * 3)

    out.append(("trion_foreach_fp32_right", trion_step))
    return out


# --------------------------------------------------------------------------- compile jobs
class Job(NamedTuple):
    kernel: str  # "module:attribute" of the JITFunction
    variant: str
    config: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    runtime: bool = False
    pair: Optional[int] = None  # the single-kernel counterpart job (grouped kernels, aligned sub-list): its index
    reason: str = ""  # why a grouped row is not compared with a counterpart, or may be slower


# The grouped (multi-tensor) kernels and the single kernel whose code runs each of their tiles.
GROUPED_COUNTERPART = {
    "_projection_project_adam_grouped_kernel": "_projection_project_adam_kernel",
    "_projection_backproject_apply_grouped_kernel": "_projection_backproject_apply_kernel",
    "_adam_update_grouped_kernel": "_adam_update_kernel",
    "_adam_update_q8_grouped_kernel": "_adam_update_q8_kernel",
}
# Grouped variants allowed fewer vector loads / no cp.async than their counterpart, each with the
# reason written to the CSV: ``(kernel, variant substring, reason)``. Empty: every aligned grouped
# launch keeps its single kernel's vector loads and pipelining.
KNOWN_SLOWER: List[tuple] = []
UNALIGNED_REASON = "unaligned sub-list: entries the host found unaligned get no alignment hints (by design)"


def _jobs(archs, subset: str, only: Optional[str] = None) -> List[Job]:
    """Every (launch, tile, arch) specialization, deduplicated (first variant names it).

    A grouped launch of an aligned sub-list (constexpr ``ALIGNED``) is paired with its
    variant's single-kernel counterpart launch (``thunk.counterpart``), compiled with the
    grouped launch's tile and ``EVEN_K``: its job's ``pair`` is the counterpart job's key.
    ``only``: a regular expression; only variants whose name it finds are compiled.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from lowrank_kernels.kernels import _launch as L

    launches = []
    counterparts = {}  # id(grouped launch) -> the counterpart launches of its variant
    for name, thunk in _variants(subset):
        if only and not re.search(only, name):
            continue
        with L.capture() as caps:
            thunk()
        if not caps:
            raise RuntimeError(f"compile_check: variant {name} launched nothing")
        single = getattr(thunk, "counterpart", None)
        if single is not None:
            with L.capture() as cps:
                single()
            for c in caps:
                counterparts[id(c)] = cps
        launches += [(name, c) for c in caps]
    if not launches:
        raise ValueError(f"compile_check: no variant matches {only!r}")

    # Base specializations on which every default tile is compiled (ci): the first
    # launch of each GEMM kernel per operand width and projector mode (with the tiles of that
    # launch's alignment, where the table has an alignment-keyed entry: _launch.UNALIGNED).
    base = {}
    for name, c in launches:
        if c.tile_kernel is not None:
            base.setdefault((c.tile_kernel, c.wide, c.key["mode"], c.key.get("qblock", 0)), (name, c))

    jobs: Dict[tuple, Job] = {}
    shared_by: Dict[tuple, int] = {}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)

        def add(name, c, meta, cfg, pair=None, reason=""):
            jf = c.kernel
            binder = create_function_from_signature(jf.signature, jf.params, backend)
            bound, spec, opts = binder(*c.args, **meta)
            options, signature, constexprs, attrs = jf._pack_args(backend, meta, bound, spec, opts)
            fn_name = f"{jf.fn.__module__}:{jf.fn.__name__}"
            key = (fn_name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs.items(), key=str)), repr(sorted(options.__dict__.items(), key=str)))
            if key in jobs:
                shared_by[key] += 1
                if pair is not None and jobs[key].pair is None:
                    jobs[key] = jobs[key]._replace(pair=pair, reason="")
                return key
            shared_by[key] = 0
            jobs[key] = Job(fn_name, name, cfg, arch, signature, constexprs, attrs, dict(options.__dict__),
                            pair=pair, reason=reason)
            return key

        todo = []
        for name, c in launches:
            if c.tile_kernel is None:
                todo.append((name, c, None))
            elif subset == "full":
                todo += [(name, c, t) for t in L.candidates(c.tile_kernel, arch, wide=c.wide, mode=c.key["mode"],
                                                            qblock=c.key.get("qblock") or 256,
                                                            aligned=c.key.get("aligned", True))]
            else:
                todo.append((name, c, c.tile_for(arch)))
        if subset != "full":
            for (tk, wide, mode, qblock), (name, c) in base.items():
                todo += [(f"{name}[tile]", c, t) for t in L.default_tiles(tk, arch, wide=wide, mode=mode,
                                                                           qblock=qblock or 256,
                                                                           aligned=c.key.get("aligned", True))]
        for name, c, tile in todo:
            meta = c.meta if tile is None else c.with_tile(tile)
            cfg = tile.label() if tile is not None else "fixed_" + "_".join(
                f"{k}{meta[k]}" for k in sorted(meta) if k in ("GPP", "CH", "BLOCK", "BLOCK_R", "BLOCK_C")) + \
                f"_w{meta.get('num_warps', 4)}"
            pair, reason = None, ""
            single_name = GROUPED_COUNTERPART.get(c.kernel.fn.__name__)
            if single_name is not None:
                if not meta.get("ALIGNED", False):
                    reason = UNALIGNED_REASON
                else:
                    cp = [x for x in counterparts.get(id(c), ()) if x.kernel.fn.__name__ == single_name]
                    if not cp:
                        raise RuntimeError(f"compile_check: variant {name}: no {single_name} counterpart launch")
                    cp = cp[0]
                    cmeta = cp.meta if tile is None else dict(cp.with_tile(tile), EVEN_K=meta["EVEN_K"])
                    pair = add(f"{name}[single]", cp, cmeta, cfg)
            add(name, c, meta, cfg, pair, reason)
    index = {k: i for i, k in enumerate(jobs)}  # pair: the counterpart's position in the returned list
    return [j._replace(variant=j.variant + (f" (+{shared_by[k]})" if shared_by[k] else ""),
                       pair=None if j.pair is None else index[j.pair]) for k, j in jobs.items()]


_PTXAS_CACHE = None


def _parse_ptxas(log: str) -> Optional[dict]:
    """Registers (the maximum over the functions ptxas reports) and spill bytes (their sum)."""
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        return None
    return {"registers": max(regs), "spill_stores": sum(int(a) for a, _ in spills),
            "spill_loads": sum(int(b) for _, b in spills)}


def _ptxas_stats(ptx: str, arch: int, fusion: bool, log: str = "") -> dict:
    """``{"registers", "spill_stores", "spill_loads"}`` from ``ptxas -v`` on ``ptx``.

    ``log``: the ``ptxas -v`` output of Triton's own compile of this PTX when it ran
    (same command line as below); otherwise ptxas runs here. Cached by PTX hash.
    """
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    gpu = sm_arch_from_capability(arch)
    h = hashlib.sha256(f"{gpu}|{fusion}|".encode() + ptx.encode()).hexdigest()
    cache_dir = os.path.join(knobs.cache.dir, "lowrank_kernels_ptxas")
    path = os.path.join(cache_dir, h + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    stats = _parse_ptxas(log)
    if stats is None:
        stats = _run_ptxas(ptx, arch, fusion)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)
    return stats


def _run_ptxas(ptx: str, arch: int, fusion: bool) -> dict:
    """``ptxas -v`` with the flags Triton uses (``--fmad=false`` without fp fusion)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    gpu = sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    stats = _parse_ptxas(r.stderr + r.stdout)
    if stats is None:
        raise RuntimeError(f"could not parse ptxas -v output: {(r.stderr + r.stdout)[-2000:]}")
    return stats


# Global loads in the PTX (static instruction counts): ``ld.global[.<qualifiers>][.v2|.v4|.v8].<type>``.
_LD_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global((?:\.[\w:]+)*)\s", re.M)
_CP_ASYNC_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg|bulk)(?!\.(?:commit|wait))[\w:.]*\s", re.M)
_MMA_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)[\w:.]*\s", re.M)


def ptx_stats(ptx: str) -> dict:
    """Static counts of the instructions that tell a fast kernel from a slow one in ``ptx``.

    ``vector_loads``: ``ld.global`` instructions that move at least 8 bytes per thread as a
    vector (``.v2`` / ``.v4`` / ``.v8`` of an element type whose width times the vector length
    is >= 8 bytes: ``ld.global.v2.b32``, ``ld.global.v4.b32``, ``ld.global.v4.b16``, ...).
    ``scalar_loads``: ``ld.global`` instructions of one element narrower than 8 bytes
    (``.b8`` / ``.b16`` / ``.b32``, no vector suffix): per-element loads of tile data. 8-byte
    scalars (``.b64``: table fields, addresses) and narrower vectors are in neither count.
    ``cp_async``: asynchronous global-to-shared copies (``cp.async.ca`` / ``cp.async.cg`` /
    ``cp.async.bulk``, not the commit / wait instructions): the software-pipelined K loop.
    ``mma``: tensor-core instructions (``mma.sync``, ``wgmma.mma_async``)."""
    vec = sca = 0
    for quals in _LD_RE.findall(ptx):
        parts = quals.split(".")
        width = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 0) // 8
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        if lanes > 1 and lanes * width >= 8:
            vec += 1
        elif lanes == 1 and 0 < width < 8:
            sca += 1
    return {"vector_loads": vec, "scalar_loads": sca, "cp_async": len(_CP_ASYNC_RE.findall(ptx)),
            "mma": len(_MMA_RE.findall(ptx))}


def check_counterparts(rows: List[dict], jobs: List[Job]) -> None:
    """The fast-path rule, in place on ``rows`` (one per job, same order).

    A grouped kernel's row compiled for an aligned sub-list must keep what its single-kernel
    counterpart (same dtypes, projector, moments, tile) has: at least as many vector loads,
    and ``cp.async`` when the counterpart has any. Otherwise its status becomes ``slow_path``
    unless :data:`KNOWN_SLOWER` gives a reason (written to ``reason``, status unchanged).
    ``counterpart`` names the row compared with; an unaligned sub-list's row says so in
    ``reason`` and is not compared."""
    for row, job in zip(rows, jobs):
        if job.reason and not row.get("reason"):
            row["reason"] = job.reason
        if job.pair is None:
            continue
        single = rows[job.pair]
        row["counterpart"] = f"{single['kernel']} {single['config']} ({single['variant']})"
        if row["status"] != "ok" or single["status"] != "ok":
            continue
        lost = []
        if int(row["vector_loads"]) < int(single["vector_loads"]):
            lost.append(f"vector_loads {row['vector_loads']} < {single['vector_loads']}")
        if int(single["cp_async"]) > 0 and int(row["cp_async"]) == 0:
            lost.append(f"no cp.async ({single['cp_async']} in the single kernel)")
        if not lost:
            continue
        known = [r for k, v, r in KNOWN_SLOWER if k == row["kernel"] and v in row["variant"]]
        if known:
            row["reason"] = known[0]
        else:
            row["status"] = "slow_path: " + ", ".join(lost)


def _compile(job: Job) -> dict:
    """Compile one job; the CSV row."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowrank_kernels.kernels import _launch as L

    mod, attr = job.kernel.split(":")
    jf = getattr(importlib.import_module(mod), attr)
    row = {c: "" for c in COLUMNS}
    row.update(kernel=attr, variant=job.variant, config=job.config, arch=f"sm_{job.arch}",
               stages=job.options.get("num_stages", ""))
    try:
        # Triton runs `ptxas -v` itself when it compiles (not on a cache hit): keep its log.
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(buf):
                k = triton.compile(ASTSource(jf, job.signature, job.constexprs, job.attrs),
                                   target=GPUTarget("cuda", job.arch, 32), options=job.options)
        finally:
            knobs.nvidia.dump_ptxas_log = False
        stats = _ptxas_stats(k.asm["ptx"], job.arch, bool(job.options.get("enable_fp_fusion")), buf.getvalue())
    except Exception as e:  # noqa: BLE001  (reported as a failed row, never swallowed)
        row["status"] = "compile_error: " + " ".join(str(e).split())[:300]
        return row
    if job.runtime:
        try:
            k._init_handles()  # loads the cubin on the current CUDA device
            row.update(runtime_registers=k.n_regs, runtime_spills=k.n_spills)
        except Exception as e:  # noqa: BLE001
            row["status"] = "load_error: " + " ".join(str(e).split())[:300]
            return row
    shared = int(k.metadata.shared)
    row.update(ptx_stats(k.asm["ptx"]))
    row.update(registers=stats["registers"], spills=stats["spill_stores"] + stats["spill_loads"], shared_bytes=shared)
    limit = L.SMEM_LIMIT[job.arch] if job.arch in L.SMEM_LIMIT else L.SMEM_LIMIT[L.table_arch(job.arch)]
    if row["spills"] or row.get("runtime_spills"):
        row["status"] = "spills"
    elif shared > limit:
        row["status"] = f"smem>{limit}"
    else:
        row["status"] = "ok"
    return row


def run(archs=DEFAULT_ARCHS, subset: str = "full", jobs: Optional[int] = None, progress=None,
        runtime: bool = False, only: Optional[str] = None) -> List[dict]:
    """Compile every variant for ``archs``; the CSV rows (see the module doc).

    ``runtime``: also load each kernel on the current CUDA device (whose arch must be the
    only one in ``archs``) and report the driver's register and spill counts.
    """
    from lowrank_kernels.kernels import _launch as L

    if L.INTERPRET:
        raise RuntimeError("compile_check: TRITON_INTERPRET=1 is set; the interpreter has no compiler "
                           "(run with TRITON_INTERPRET unset or 0)")
    if subset not in ("ci", "full"):
        raise ValueError(f"compile_check: subset must be 'ci' or 'full', got {subset!r}")
    bad = [a for a in archs if a < 80]
    if bad:
        raise ValueError(f"compile_check: arch {bad[0]} unsupported (the kernels target sm_80 and newer)")
    if runtime:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("compile_check --runtime: no CUDA device")
        major, minor = torch.cuda.get_device_capability()
        if list(archs) != [10 * major + minor]:
            raise ValueError(f"compile_check --runtime: --arch must be this GPU's arch, {10 * major + minor}")
    todo = [j._replace(runtime=runtime) for j in _jobs(tuple(archs), subset, only)]
    n = max(1, int(jobs or min(16, os.cpu_count() or 1)))
    rows = []
    if n == 1:
        for j in todo:
            rows.append(_compile(j))
            if progress:
                progress(rows[-1], len(rows), len(todo))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as ex:
            for row in ex.map(_compile, todo):
                rows.append(row)
                if progress:
                    progress(row, len(rows), len(todo))
    check_counterparts(rows, todo)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                    help="comma-separated compute capabilities, e.g. 80,89,90, or 'all' for "
                         f"{','.join(map(str, ALL_ARCHS))} (default: 80,90)")
    ap.add_argument("--out", default=None, help="CSV file to write (default: stdout)")
    ap.add_argument("--subset", default="full", choices=("ci", "full"))
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: the CPU count, at most 16)")
    ap.add_argument("--runtime", action="store_true",
                    help="also load each kernel on this machine's GPU (arch = --arch) and add the driver's "
                         "register/spill counts (columns runtime_registers, runtime_spills)")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="compile only the variants whose name matches this regular expression")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        archs = list(ALL_ARCHS) if args.arch.strip() == "all" else [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--arch: expected comma-separated integers like 80,90, got {args.arch!r}")
    if not archs:
        ap.error("--arch: no arch given")

    def progress(row, i, n):
        if not args.quiet:
            print(f"[{i}/{n}] {row['arch']} {row['kernel']} {row['config']} regs={row['registers']} "
                  f"spills={row['spills']} smem={row['shared_bytes']} vec={row['vector_loads']} "
                  f"scalar={row['scalar_loads']} cp.async={row['cp_async']} mma={row['mma']} {row['status']}  "
                  f"({row['variant']})",
                  file=sys.stderr, flush=True)

    try:
        rows = run(archs, args.subset, args.jobs, progress, runtime=args.runtime, only=args.only)
    except (RuntimeError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    f = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        w = csv.DictWriter(f, fieldnames=COLUMNS + (RUNTIME_COLUMNS if args.runtime else []))
        w.writeheader()
        w.writerows(rows)
    finally:
        if args.out:
            f.close()
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"compile_check: {len(rows)} kernels compiled for {','.join(f'sm_{a}' for a in archs)}, "
          f"{len(bad)} not ok", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
