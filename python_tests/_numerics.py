"""Tolerances at the size of the real error (ARCHITECTURE.md, Tests).

- float32 outputs (moments, ``N``, float32 weights): elementwise ``assert_close`` at
  ~1e-5, even when the inputs are bf16 (the products of 16-bit values are exact in float32
  and the sums are float32: only summation order differs between backends);
- in-place apply ops: compare the *change* ``W_new - W_old`` with the reference change,
  elementwise, with an absolute term for the one rounding of ``W_new`` in its dtype
  (never one global relative norm, which hides a wrong edge strip of tiles);
- 16-bit outputs: flash-attention's rule: our max error against a float64 truth at most
  twice plain PyTorch's max error in the same dtype (plus a tiny absolute term).
"""
from __future__ import annotations

import torch

F32_RTOL = 1e-5


def assert_close_f32(out: torch.Tensor, ref: torch.Tensor, what: str = "", rtol: float = F32_RTOL) -> None:
    """Elementwise: ``|out - ref| <= rtol * |ref| + rtol * max|ref|`` (float32 accuracy)."""
    ref = ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * scale + 1e-30,
                               msg=lambda m: f"{what}: {m}")


def assert_change_close(w_new: torch.Tensor, w_old: torch.Tensor, ref_new: torch.Tensor, what: str = "",
                        rtol: float = F32_RTOL) -> None:
    """What an in-place op changed, against the reference's change, elementwise.

    The absolute term allows one rounding of the new weight in its dtype (twice: ours and
    the reference's) plus ``rtol`` of the largest change."""
    old = w_old.double()
    d_out, d_ref = w_new.double() - old, ref_new.double() - old
    ulp = torch.finfo(w_new.dtype).eps
    atol = 2 * ulp * float(torch.maximum(old.abs(), ref_new.double().abs()).max()) + rtol * float(d_ref.abs().max())
    torch.testing.assert_close(d_out, d_ref, rtol=rtol, atol=atol + 1e-30, msg=lambda m: f"{what} (change): {m}")
    assert bool(torch.isfinite(w_new).all()), f"{what}: non-finite output"


def assert_flash_rule(out: torch.Tensor, truth: torch.Tensor, plain: torch.Tensor, what: str = "",
                      factor: float = 2.0) -> None:
    """``max|out - truth| <= factor * max|plain - truth| + 1e-6 * max|truth|`` (flash-attention's test)."""
    truth = truth.double()
    err = float((out.double() - truth).abs().max())
    base = float((plain.double() - truth).abs().max())
    slack = 1e-6 * float(truth.abs().max())
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    assert err <= factor * base + slack, f"{what}: max error {err:.3g} > {factor} x plain PyTorch's {base:.3g}"


def assert_within_roundings(out: torch.Tensor, ref: torch.Tensor, what: str = "", k: int = 1) -> None:
    """Two backends that round the same float32 value (equal to ~1e-6) into a 16-bit dtype:
    elementwise at most ``k`` units of the 16-bit dtype's precision apart."""
    ulp = torch.finfo(out.dtype).eps
    r = ref.double()
    diff = (out.double() - r).abs()
    bound = k * ulp * r.abs() + 1e-6 * float(r.abs().max()) + 1e-30
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    assert bool((diff <= bound).all()), f"{what}: {float((diff / bound).max()):.3g} x the allowed rounding apart"


def assert_matches_backend(out: torch.Tensor, ref: torch.Tensor, what: str = "", rtol: float = F32_RTOL) -> None:
    """A backend's output against the reference's, by the output dtype: float64 at 1e-10, float32
    elementwise at ``rtol``, 16-bit within one rounding."""
    if out.dtype == torch.float64:
        assert_close_f32(out, ref, what, rtol=1e-10)
    elif out.dtype == torch.float32:
        assert_close_f32(out, ref, what, rtol=rtol)
    else:
        assert_within_roundings(out, ref, what)
