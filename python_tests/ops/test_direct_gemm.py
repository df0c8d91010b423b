"""The dispatcher-free float32 GEMM of the C++ kernels (csrc/cpu/direct_gemm.cpp,
``direct::blas_addmm``): the BLAS call torch's ``addmm_`` / ``mm`` make, made directly.

- wherever it serves a call (row- and column-major results and operands, leading
  dimensions larger than the matrix, size-1 dimensions, beta 0 / 1 / other, alpha 1 / other)
  its result is bitwise torch's ``addmm_`` (or ``mm`` for beta 0 and alpha 1);
- it serves the layouts of the optimizer steps that use it (FRUGAL's projection and
  back-projections, Q-GaLore's INT4 route), so their speed does not depend on a fallback;
- where it does not serve (strides torch copies, other dtypes, conjugate views) it returns
  False and leaves the result untouched, so the caller's ATen call decides.

The optimizer-level bitwise checks are the step-replay fixture, the bucketed-step tests and
test_projection_cpp_fast.py's INT4-route test.
"""
import importlib
import itertools

import pytest
import torch

from lowrank_kernels.ops import _registry as reg


@pytest.fixture(autouse=True)
def _need_cpp():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")


def _blas_addmm(c, a, b, beta, alpha):
    return importlib.import_module("lowrank_kernels._C").direct_blas_addmm(c, a, b, beta, alpha)


def _layout(rows, cols, order, gen):
    """A rows x cols float32 matrix: "row" / "col" major, or "pad": row-major inside a wider
    buffer (leading dimension cols + 3)."""
    if order == "row":
        return torch.randn(rows, cols, generator=gen)
    if order == "col":
        return torch.randn(cols, rows, generator=gen).t()
    return torch.randn(rows, cols + 3, generator=gen)[:, :cols]


SHAPES = [(64, 172, 8), (172, 64, 8), (17, 9, 5), (1, 16, 3), (16, 1, 3), (5, 7, 1), (1, 1, 1), (33, 130, 129)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_equals_torch_addmm_bitwise(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    served = 0
    for oc, oa, ob in itertools.product(("row", "col", "pad"), repeat=3):
        for beta, alpha in ((0.0, 1.0), (1.0, -0.37), (1.0, 1.0), (0.5, 2.0)):
            c = _layout(m, n, oc, gen)
            a = _layout(m, k, oa, gen)
            b = _layout(k, n, ob, gen)
            want = c.clone()
            if beta == 0.0 and alpha == 1.0:
                torch.mm(a, b, out=want)
            else:
                want.addmm_(a, b, beta=beta, alpha=alpha)
            mine = c.clone()
            before = mine.clone()
            took = _blas_addmm(mine, a, b, beta, alpha)
            if took:
                served += 1
                assert torch.equal(mine, want), (oc, oa, ob, beta, alpha)
            else:
                assert torch.equal(mine, before), (oc, oa, ob, beta, alpha)
    # row- and column-major results with row- or column-major operands are served
    assert served >= 8 * 4


@pytest.mark.parametrize("m,n,r", [(64, 172, 8), (172, 64, 8), (33, 17, 3)])
def test_serves_the_step_layouts(m, n, r):
    """The GEMMs FRUGAL and the INT4 route make (contiguous G and W, a row-major projector,
    transposed views for side="left", row- or column-major low-rank results) are served."""
    g = torch.randn(m, n)
    p_right = torch.randn(r, n)
    p_left = torch.randn(m, r)
    low_r = torch.empty(m, r)
    assert _blas_addmm(low_r, g, p_right.t(), 0.0, 1.0)
    low_l = torch.empty(r, n)
    assert _blas_addmm(low_l, p_left.t(), g, 0.0, 1.0)
    w = torch.randn(m, n)
    assert _blas_addmm(w, low_r, p_right, 1.0, -0.01)
    assert _blas_addmm(w.t(), low_l.t(), p_left.t(), 1.0, -0.01)
    assert _blas_addmm(torch.empty(r, m).t(), g, p_right.t(), 0.0, 1.0)


def test_declines_what_it_cannot_promise():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=gen), torch.randn(4, 5, generator=gen)
    # a result torch computes through a Fortran-contiguous copy (neither stride is 1)
    c = torch.randn(12, 10, generator=gen)[::2, ::2]
    before = c.clone()
    assert not _blas_addmm(c, a, b, 1.0, 1.0)
    assert torch.equal(c, before)
    # an operand torch clones (neither stride is 1)
    assert not _blas_addmm(torch.zeros(6, 5), torch.randn(12, 8, generator=gen)[::2, ::2], b, 0.0, 1.0)
    # float64, and an empty inner dimension
    assert not _blas_addmm(torch.zeros(6, 5, dtype=torch.float64), a.double(), b.double(), 0.0, 1.0)
    assert not _blas_addmm(torch.zeros(6, 5), torch.zeros(6, 0), torch.zeros(0, 5), 0.0, 1.0)


def test_declines_below_highest_matmul_precision():
    a, b = torch.randn(6, 4), torch.randn(4, 5)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not _blas_addmm(torch.zeros(6, 5), a, b, 0.0, 1.0)
    finally:
        torch.set_float32_matmul_precision(old)
    assert _blas_addmm(torch.zeros(6, 5), a, b, 0.0, 1.0)
