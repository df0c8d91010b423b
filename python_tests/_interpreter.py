"""What the Triton interpreter that runs the kernel tests does differently from the compiler.

:data:`FMA_ROUNDS_TWICE`: whether this Triton's interpreter runs ``tl.fma(x, y, z)`` as a
multiply and then an add, rounding twice. Triton 3.6's interpreter does (``create_fma`` is
``x * y + z`` in numpy float32); Triton 3.9's rounds once, as the compiled kernels'
``fma.rn.f32`` and the reference's fused torch ops on the CPU do. The kernels' Adam moment
update is ``tl.fma(r, 1 - beta1, beta1 * m)`` (and ``tl.fma((1 - beta2) r, r, beta2 * v)``),
so under such an interpreter a moment may differ from the reference by one float32 rounding
of the product term: not a kernel error (the GPU, which the tests stand in for, rounds
once), so the tests that compare the moments or ``N`` to the last bits allow that rounding
there (:func:`fma_slack`). Decided by running ``tl.fma`` once on values whose product is not
a float32, so no Triton version number is assumed.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> bool:
    if not INTERPRET:
        return False
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False

    @triton.jit
    def _fma_probe_kernel(x_ptr, y_ptr, z_ptr, out_ptr):
        tl.store(out_ptr, tl.fma(tl.load(x_ptr), tl.load(y_ptr), tl.load(z_ptr)))

    # x * y = 1 + 2^-12 + 3 * 2^-13 + 3 * 2^-25: its last term is below float32's spacing at 1,
    # so a product rounded first loses it and the sum with z = -fl(x * y) is 0; one fused
    # rounding keeps it (3 * 2^-25).
    x = torch.tensor([1 + 3 * 2.0**-13], dtype=torch.float32)
    y = torch.tensor([1 + 2.0**-12], dtype=torch.float32)
    z = -(x * y)
    out = torch.empty(1, dtype=torch.float32)
    _fma_probe_kernel[(1,)](x, y, z, out)
    return float(out[0]) == 0.0


FMA_ROUNDS_TWICE = _probe()


def fma_slack(rtol: float) -> float:
    """``rtol`` as it is, or at least ``1e-4`` where the interpreter rounds ``tl.fma`` twice
    (one float32 rounding of ``(1 - beta1) r``, ~6e-8 of it, seen up to 7e-5 of ``N`` where
    ``beta1 m`` nearly cancels it)."""
    return max(rtol, 1e-4) if FMA_ROUNDS_TWICE else rtol
