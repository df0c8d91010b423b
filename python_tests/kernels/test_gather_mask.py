"""DCT gathers are masked by ``0 <= idx < basis rows`` in every Triton gather.

The ops validate indices on the host, but a GPU kernel reading ``basis[idx]`` checks
nothing: an index outside the basis (a corrupted checkpoint, a bug upstream) would read
other memory. The kernels read zeros instead. Here the launchers are called directly
(no op-level validation) with indices -1 and s, on a basis that is a view into a
larger buffer whose neighbouring rows are NaN: an unmasked gather reads the NaN."""
import pytest
import torch

from lowrank_kernels.reference import projection as pref

kd = pytest.importorskip("lowrank_kernels.kernels.dct")
kp = pytest.importorskip("lowrank_kernels.kernels.projection")

pytestmark = pytest.mark.skipif(not kp._INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or CUDA")


def _basis_with_nan_neighbours(s):
    big = torch.full((s + 2, s), float("nan"))
    big[1:s + 1] = torch.randn(s, s, generator=torch.Generator().manual_seed(0))
    return big[1:s + 1]  # rows -1 and s of this view are NaN


def _dense(basis, idx):
    """C[idx] with rows of out-of-range indices zero (what the kernels compute)."""
    s = basis.shape[0]
    ok = (idx >= 0) & (idx < s)
    p = torch.zeros(idx.shape[0], basis.shape[1])
    p[ok] = basis[idx[ok].long()]
    return p


@pytest.mark.parametrize("side", ["right", "left"])
def test_dct_project_gather_masks_bad_indices(side):
    m, n = 70, 45
    s = n if side == "right" else m
    basis = _basis_with_nan_neighbours(s)
    idx = torch.tensor([3, -1, s - 1, s, 0], dtype=torch.int32)
    g = torch.randn(m, n)
    out = kd.dct_project_triton(g, basis, idx, side)
    p = _dense(basis, idx)
    ref = g @ p.T if side == "right" else p @ g
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_projection_dct_mode_masks_bad_indices(side):
    m, n = 70, 45
    s = n if side == "right" else m
    basis = _basis_with_nan_neighbours(s)
    idx = torch.tensor([3, -1, s - 1, s, 0], dtype=torch.int32)
    g = torch.randn(m, n)
    r = idx.shape[0]
    lshape = (m, r) if side == "right" else (r, n)
    ea, eas = 0.1 * torch.randn(lshape), 0.1 * torch.rand(lshape) + 0.01
    p = _dense(basis, idx)
    dense_p = p if side == "right" else p.T.contiguous()
    ra, ras = ea.clone(), eas.clone()
    ref_n = pref.projection_project_adam_ref(g, dense_p, ra, ras, side, 0.9, 0.99, 1e-6)
    oa, oas = ea.clone(), eas.clone()
    out_n = kp._launch_project_adam(g, (basis, idx), oa, oas, side, 0.9, 0.99, 1e-6)
    torch.testing.assert_close(out_n, ref_n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(oas, ras, rtol=1e-5, atol=1e-6)
    w = torch.randn(m, n)
    rw, ow = w.clone(), w.clone()
    pref.projection_backproject_apply_ref(rw, ref_n, dense_p, side, -0.1, 0.99)
    kp._launch_backproject_apply(ow, ref_n, (basis, idx), side, -0.1, 0.99)
    torch.testing.assert_close(ow - w, rw - w, rtol=1e-4, atol=1e-5)
