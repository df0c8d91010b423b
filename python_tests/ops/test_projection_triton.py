"""Kernel-specific cases of the projection family's Triton backend.

Under ``TRITON_INTERPRET=1`` (CPU): tile boundaries of the interpreter's 64^3 tile
(exact multiples and one past), strided views of every operand, mixed dtypes, the
int64-offset variant, float64 rejection that modifies nothing, the dot-dtype policy
and the GPU tile space. With CUDA (``pytest -m gpu`` with ``TRITON_INTERPRET=0``):
compiled kernels on odd shapes and the bf16 showcase step (4096 x 11008, rank 512).

Every comparison is elementwise (``python_tests/_numerics.py``): float32 moments and ``N``
at ~1e-5, 16-bit outputs within one or two roundings of the reference's, and for the ops
that write a weight in place, the change ``W_new - W_old`` against the reference's change
(a global relative norm would hide one wrong edge strip of tiles).
"""
import os

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import use_backend

from .._numerics import (
    assert_change_close,
    assert_close_f32,
    assert_flash_rule,
    assert_within_roundings,
)

kp = pytest.importorskip("lowrank_kernels.kernels.projection")
_launch = pytest.importorskip("lowrank_kernels.kernels._launch")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _inputs(m, n, rank, side, dtype, moment_dtype, device="cpu", proj_dtype=None, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    grad = torch.randn(m, n, generator=g).to(dtype)
    pshape = (rank, n) if side == "right" else (m, rank)
    proj = (torch.randn(pshape, generator=g) / (n if side == "right" else m) ** 0.5).to(proj_dtype or dtype)
    lshape = ops.lowrank_shape(m, n, rank, side)
    ea = (0.1 * torch.randn(lshape, generator=g)).to(moment_dtype)
    eas = (0.1 * torch.rand(lshape, generator=g) + 0.01).to(moment_dtype)
    return [t.to(device) for t in (grad, proj, ea, eas)]


def _project_both(grad, proj, ea, eas, side, backend="triton", clone=lambda t: t.clone()):
    """(reference (N, M, V), backend (N, M, V)) on copies."""
    kw = dict(side=side, beta1=0.9, beta2=0.95, eps=1e-6)
    ra, ras = ea.clone(), eas.clone()
    with use_backend("reference"):
        rn = ops.project_adam_(grad, proj, ra, ras, **kw)
    oa, oas = clone(ea), clone(eas)
    with use_backend(backend):
        on = ops.project_adam_(grad, proj, oa, oas, **kw)
    return (rn, ra, ras), (on, oa, oas)


def _assert_close(out, ref, what, k=1):
    """float32: elementwise at 1e-5 (only the summation order differs); 16-bit: within ``k``
    roundings of the reference's value."""
    assert out.dtype == ref.dtype, (what, out.dtype, ref.dtype)
    if out.dtype == torch.float32:
        assert_close_f32(out, ref, what)
    else:
        assert_within_roundings(out, ref, what, k=k)


def _assert_project_close(ref, out):
    """Moments and N, elementwise. 16-bit N is computed from the (unrounded) float32 moments
    on both sides, but the moments' one rounding may differ: N gets two roundings."""
    (rn, ra, ras), (on, oa, oas) = ref, out
    _assert_close(oa, ra, "exp_avg")
    _assert_close(oas, ras, "exp_avg_sq")
    _assert_close(on, rn, "N", k=2)


# --------------------------------------------------------------------------- tile boundaries
# The interpreter's tile is 64 x 64 x 64: shapes exactly on, one below and one past it.
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank", [(64, 128, 64), (65, 129, 65), (130, 63, 63), (128, 192, 16)])
def test_project_adam_tile_boundaries(side, m, n, rank):
    grad, proj, ea, eas = _inputs(m, n, rank, side, torch.float32, torch.float32)
    ref, out = _project_both(grad, proj, ea, eas, side)
    _assert_project_close(ref, out)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,rank", [(64, 128, 64), (65, 129, 65), (130, 63, 17)])
def test_backproject_apply_tile_boundaries(side, m, n, rank):
    _, proj, upd, _ = _inputs(m, n, rank, side, torch.float32, torch.float32)
    w = torch.randn(m, n)
    rw, ow = w.clone(), w.clone()
    with use_backend("reference"):
        ops.backproject_apply_(rw, upd, proj, side=side, alpha=-0.3, decay=0.99)
    with use_backend("triton"):
        ops.backproject_apply_(ow, upd, proj, side=side, alpha=-0.3, decay=0.99)
    assert_change_close(ow, w, rw, f"backproject_apply {side} {m}x{n} r{rank}")


# --------------------------------------------------------------------------- strided operands
def _transposed(t):
    """The same values as a non-contiguous (column-major) view."""
    return t.T.contiguous().T


@pytest.mark.parametrize("side", ["right", "left"])
def test_project_adam_all_operands_strided(side):
    m, n, rank = 70, 90, 21
    grad, proj, ea, eas = _inputs(m, n, rank, side, torch.bfloat16, torch.float32)
    grad_v, proj_v = _transposed(grad), _transposed(proj)
    assert not grad_v.is_contiguous() and not proj_v.is_contiguous()
    ref, out = _project_both(grad_v, proj_v, ea, eas, side, clone=_transposed)
    assert not out[1].is_contiguous()  # the moments were updated through their strides
    _assert_project_close(ref, out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_backproject_apply_all_operands_strided(side):
    m, n, rank = 70, 90, 21
    _, proj, upd, _ = _inputs(m, n, rank, side, torch.float16, torch.float16)
    w = torch.randn(m, n).half()
    rw, ow = w.clone(), _transposed(w)
    with use_backend("reference"):
        ops.backproject_apply_(rw, upd, proj, side=side, alpha=-0.5, decay=0.9)
    with use_backend("triton"):
        ops.backproject_apply_(ow, _transposed(upd), _transposed(proj), side=side, alpha=-0.5, decay=0.9)
    assert not ow.is_contiguous()
    assert_change_close(ow, w, rw, f"backproject_apply strided {side}")


# --------------------------------------------------------------------------- mixed dtypes, int64 offsets
@pytest.mark.parametrize(
    "dtype,proj_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16)]
)
def test_fused_step_mixed_dtypes(dtype, proj_dtype):
    m, n, rank, side = 77, 50, 9, "right"
    grad, proj, ea, eas = _inputs(m, n, rank, side, dtype, torch.float32, proj_dtype=proj_dtype)
    w = torch.randn(m, n).to(dtype)
    kw = dict(side=side, lr=0.05, step=1, weight_decay=1.0, scale=1.0)  # decay 0.95: a dropped decay is many 16-bit roundings of W
    rw, ra = w.clone(), ea.clone()
    with use_backend("reference"):
        ops.project_update_backproject_(rw, grad, proj, ra, eas.clone(), **kw)
    ow, oa = w.clone(), ea.clone()
    with use_backend("triton"):
        ops.project_update_backproject_(ow, grad, proj, oa, eas.clone(), **kw)
    _assert_close(oa, ra, "exp_avg")
    assert_change_close(ow, w, rw, f"fused step {dtype} / proj {proj_dtype}")


def test_int64_offsets_path(monkeypatch):
    """The IDX64 variant (used for tensors past 2^31 elements) computes the same thing."""
    monkeypatch.setattr(kp, "_needs_int64", lambda *ts: True)
    for side in ("right", "left"):
        grad, proj, ea, eas = _inputs(90, 70, 13, side, torch.float32, torch.float32)
        ref, out = _project_both(grad, proj, ea, eas, side)
        _assert_project_close(ref, out)
        w = torch.randn(90, 70)
        rw, ow = w.clone(), w.clone()
        with use_backend("reference"):
            ops.backproject_apply_(rw, ref[0], proj, side=side, alpha=-0.2, decay=0.95)
        with use_backend("triton"):
            ops.backproject_apply_(ow, ref[0], proj, side=side, alpha=-0.2, decay=0.95)
        assert_change_close(ow, w, rw, f"backproject_apply int64 {side}")


def test_needs_int64():
    assert not kp._needs_int64(torch.empty(1000, 1000, device="meta"))
    assert kp._needs_int64(torch.empty(2**16, 2**16, device="meta"))
    assert kp._needs_int64(torch.empty(2**16, 2**16, device="meta").T)


def test_fixed_config_path(monkeypatch):
    """With autotuning off the launchers run the kernels with the table's config."""
    monkeypatch.setattr(_launch, "AUTOTUNE", False)
    for side in ("right", "left"):
        grad, proj, ea, eas = _inputs(70, 90, 13, side, torch.bfloat16, torch.float32)
        w = torch.randn(70, 90).bfloat16()
        kw = dict(side=side, lr=0.05, step=2, weight_decay=1.0, scale=1.0)  # decay 0.95: a dropped decay is many 16-bit roundings of W
        rw, ra, ras = w.clone(), ea.clone(), eas.clone()
        with use_backend("reference"):
            ops.project_update_backproject_(rw, grad, proj, ra, ras, **kw)
        ow, oa, oas = w.clone(), ea.clone(), eas.clone()
        with use_backend("triton"):
            ops.project_update_backproject_(ow, grad, proj, oa, oas, **kw)
        _assert_close(oa, ra, "exp_avg")
        _assert_close(oas, ras, "exp_avg_sq")
        assert_change_close(ow, w, rw, f"fused step fixed config {side}")


# --------------------------------------------------------------------------- float64 rejection
def _f64_cases():
    g, p, ea, eas = _inputs(20, 12, 3, "right", torch.float64, torch.float64)
    yield "project_adam", "grad", lambda: ops.project_adam_(g, p, ea, eas, side="right"), (ea, eas)
    g32, p32, ea32, eas32 = _inputs(20, 12, 3, "right", torch.float32, torch.float32)
    yield "project_adam", "proj", lambda: ops.project_adam_(g32, p, ea32, eas32, side="right"), (ea32, eas32)
    w32 = torch.randn(20, 12)
    yield "backproject_apply", "update", lambda: ops.backproject_apply_(w32, ea, p32, side="right", alpha=1.0), (w32,)
    w64 = torch.randn(20, 12, dtype=torch.float64)
    yield (
        "project_update_backproject",
        "param",
        lambda: ops.project_update_backproject_(w64, g, p, ea, eas, side="right", lr=0.1, step=1),
        (w64, ea, eas),
    )
    yield (
        "project_update_backproject",
        "proj",
        lambda: ops.project_update_backproject_(w32, g32, p, ea32, eas32, side="right", lr=0.1, step=1),
        (w32, ea32, eas32),
    )


@pytest.mark.parametrize("case", range(5))
def test_float64_rejected_before_any_write(case):
    op, name, call, mutated = list(_f64_cases())[case]
    before = [t.clone() for t in mutated]
    with use_backend("triton"), pytest.raises(TypeError, match=rf"{op}: {name} has dtype torch.float64.*triton backend supports float32/bfloat16/float16"):
        call()
    for t, b in zip(mutated, before):
        assert torch.equal(t, b)


# --------------------------------------------------------------------------- launch policy (pure Python)
def test_dot_dtype_policy(monkeypatch):
    tl = kp.tl
    monkeypatch.setattr(_launch, "INTERPRET", False)
    assert kp._dot_config(torch.float32, torch.float32) == (tl.float32, "ieee")  # torch's default: no TF32
    assert kp._dot_config(torch.bfloat16, torch.bfloat16)[0] == tl.bfloat16
    assert kp._dot_config(torch.float32, torch.bfloat16)[0] == tl.bfloat16  # fp32 N meets a bf16 projector
    assert kp._dot_config(torch.float16, torch.float32)[0] == tl.float16
    assert kp._dot_config(torch.bfloat16, torch.float16) == (tl.float32, "tf32")  # exact for both
    monkeypatch.setattr(_launch, "INTERPRET", True)
    assert kp._dot_config(torch.bfloat16, torch.bfloat16) == (tl.float32, "ieee")  # interpreter bf16 bug


# The tile table (configs per arch, shared memory, determinism): python_tests/kernels/test_launch_policy.py.


# --------------------------------------------------------------------------- CUDA (compiled kernels)
needs_compiled = pytest.mark.skipif(
    INTERPRETING, reason="compiled-kernel tests: run them with `TRITON_INTERPRET=0 pytest -m gpu`"
)


# Each case compiles its own kernel specialisations (seconds each on the GPU machine), so the
# cases are few and chosen: every dtype and side, rank 1 and rank = min(m, n), transposed
# gradients, moments in fp32 and in the parameter dtype, and one autotuned shape.
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GPU_CASES = [
    # dtype, moment dtype, side, m, n, rank, autotune
    (BF16, FP32, "right", 123, 77, 1, False),
    (BF16, FP32, "left", 123, 77, 1, False),
    (BF16, BF16, "left", 130, 200, 130, False),
    (FP16, FP16, "right", 130, 200, 130, False),
    (FP32, FP32, "left", 123, 77, 33, False),
    (BF16, FP32, "right", 123, 77, 33, True),
]


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype,moment_dtype,side,m,n,rank,autotune", GPU_CASES)
def test_gpu_odd_shapes_vs_reference(dtype, moment_dtype, side, m, n, rank, autotune, monkeypatch):
    monkeypatch.setattr(_launch, "AUTOTUNE", autotune)
    grad, proj, ea, eas = _inputs(m, n, rank, side, dtype, moment_dtype, device="cuda")
    grad = _transposed(grad)
    ref, out = _project_both(grad, proj, ea, eas, side)
    _assert_project_close(ref, out)
    w = (0.02 * torch.randn(m, n, device="cuda")).to(dtype)
    kw = dict(side=side, lr=0.05, step=1, weight_decay=1.0, scale=1.0)  # decay 0.95: a dropped decay is many 16-bit roundings of W
    rw, ow = w.clone(), w.clone()
    with use_backend("reference"):
        ops.project_update_backproject_(rw, grad, proj, ea.clone(), eas.clone(), **kw)
    with use_backend("triton"):
        ops.project_update_backproject_(ow, grad, proj, ea.clone(), eas.clone(), **kw)
    assert_change_close(ow, w, rw, f"gpu fused step {dtype} {side} {m}x{n} r{rank}")


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("moment_dtype", [torch.float32])
def test_gpu_showcase_fused_step_bf16(moment_dtype):
    """The benchmark's headline case: bf16 4096 x 11008, rank 512 (left side, m < n)."""
    m, n, rank, side = 4096, 11008, 512, "left"
    grad, proj, ea, eas = _inputs(m, n, rank, side, torch.bfloat16, moment_dtype, device="cuda")
    w = (0.02 * torch.randn(m, n, device="cuda")).to(torch.bfloat16)
    kw = dict(side=side, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, step=3, weight_decay=0.1, scale=0.25)
    rw, ra, ras = w.clone(), ea.clone(), eas.clone()
    with use_backend("reference"):
        ops.project_update_backproject_(rw, grad, proj, ra, ras, **kw)
    ow, oa, oas = w.clone(), ea.clone(), eas.clone()
    with use_backend("triton"):
        ops.project_update_backproject_(ow, grad, proj, oa, oas, **kw)
    torch.cuda.synchronize()
    _assert_close(oa, ra, "exp_avg")
    _assert_close(oas, ras, "exp_avg_sq")
    # Plain PyTorch in bf16 (bf16 matmuls, fp32 moments) for scale: flash-attention's rule,
    # the kernel's error is at most twice that of the usual mixed-precision code.
    b1, b2, lr, wd, sc, t = 0.9, 0.999, 0.05, 0.1, 0.25, 3
    r = (proj.T @ grad).float()
    mm = b1 * ea.float() + (1 - b1) * r
    vv = b2 * eas.float() + (1 - b2) * r * r
    nn = (mm / (vv.sqrt() + 1e-8)).to(torch.bfloat16)
    step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
    tw = ((1 - lr * wd) * w.float() - step_size * sc * (proj @ nn).float()).to(torch.bfloat16)
    # the float64 truth of the step from the same inputs
    g64, p64, w64 = grad.double(), proj.double(), w.double()
    r64 = p64.T @ g64
    m64 = b1 * ea.double() + (1 - b1) * r64
    v64 = b2 * eas.double() + (1 - b2) * r64 * r64
    truth = (1 - lr * wd) * w64 - step_size * sc * (p64 @ (m64 / (v64.sqrt() + 1e-8)))
    assert_flash_rule(ow.double() - w64, truth - w64, tw.double() - w64, "showcase bf16 step (change)")
    assert_change_close(ow, w, rw, "showcase bf16 step vs reference")
