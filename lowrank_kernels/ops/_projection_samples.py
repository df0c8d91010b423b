"""Sample arguments of the projection family's ops, for ``torch.library.opcheck``
(re-exported by :mod:`lowrank_kernels.ops.projection`, which the opcheck test reads)."""
from __future__ import annotations

import torch


def _sample_moments8(shape, block_size, gen):
    """A non-trivial 8-bit moment state (codes of random moments): ``[exp_avg, exp_avg_sq,
    m_absmax, v_absmax]``."""
    from lowrank_kernels.reference import moments as mref

    m = 0.1 * torch.randn(shape, generator=gen)
    v = (0.1 * torch.randn(shape, generator=gen)) ** 2
    cm, am = mref.moments_quantize_ref(m, signed=True, block_size=block_size)
    cv, av = mref.moments_quantize_ref(v, signed=False, block_size=block_size)
    return [cm, cv, am, av]


def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the projection family's ops, for ``torch.library.opcheck``.

    Returns ``[(op name, label, args), ...]``: small random problems (made afresh at each
    call, since the ops write into their arguments) covering each op's variants: the three
    projector kinds (dense, DCT rows by int32 and int64 indices, packed INT4), both sides,
    float32 and bfloat16, the optional arguments (``rank``, per-row ``row_decay`` /
    ``row_alpha``), the moment formats (32-bit, 8-bit with absmax, bfloat16 with stochastic
    rounding) and the multi-tensor step with its device flags (``skip``, ``coeffs``).
    """
    from lowrank_kernels.reference import quant as qref

    from .dct import dct_basis
    from .projection import lowrank_shape

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    def rand(*shape):
        return torch.rand(shape, generator=gen)

    def orthonormal(k, rank, side, dtype=torch.float32):
        """A dense projector ``(rank, k)`` (right; column-major, as ``Q.T``) or ``(k, rank)`` (left)."""
        q = torch.linalg.qr(torch.randn(k, rank, generator=gen, dtype=torch.float64))[0]
        return (q.T if side == "right" else q).to(dtype)

    def int4(k, rank, side, group_size=16):
        """``(packed, scale, minimum)`` of a dense projector."""
        return qref.quant_int4_pack_ref(orthonormal(k, rank, side), group_size)

    out = []

    def case(name, label, *args):
        out.append((name, label, tuple(args)))

    hyper = (0.9, 0.999, 1e-8)
    step_hyper = (0.01, *hyper, 3, 0.1, 0.25)  # lr, beta1, beta2, eps, step, weight_decay, scale
    g, w = randn(20, 13), randn(20, 13)
    br, bl = dct_basis(13), dct_basis(20)
    idx = torch.tensor([4, 0, 9, 2], dtype=torch.int32)

    # projection_project: dense (right, left bf16, an explicit rank), DCT, INT4
    case("projection_project", "dense-right", g, randn(4, 13), "right")
    case("projection_project", "dense-left-bf16", g.to(torch.bfloat16), randn(20, 4, dtype=torch.bfloat16), "left")
    case("projection_project", "dense-right-rank", g, randn(4, 13), "right", None, None, None, 4, 0)
    case("projection_project", "dct-right-int32", g, br, "right", idx)
    case("projection_project", "dct-left-int64-rank", g, bl, "left", idx.long(), None, None, 4)
    packed, scale, minimum = int4(13, 4, "right")
    int4_right = (None, scale, minimum, 4, 16)
    case("projection_project", "int4-right", g, packed, "right", *int4_right)

    # projection_project_adam: dense (right, left with bf16 moments), DCT, INT4, 8-bit and
    # bf16 stochastic-rounding moments
    p = orthonormal(13, 4, "right")
    ea, eas = 0.1 * randn(20, 4), 0.1 * rand(20, 4)
    case("projection_project_adam", "dense-right", g, p, ea, eas, "right", *hyper)
    gl, pl = randn(13, 20, dtype=torch.bfloat16), orthonormal(13, 4, "left", torch.bfloat16)
    case("projection_project_adam", "dense-left-bf16", gl, pl, (0.1 * randn(4, 20)).bfloat16(),
         (0.1 * rand(4, 20)).bfloat16(), "left", *hyper)
    case("projection_project_adam", "dct-right", g, br, randn(20, 4), rand(20, 4), "right", *hyper, idx)
    case("projection_project_adam", "int4-right", g, packed, 0.1 * randn(20, 4), 0.1 * rand(20, 4), "right", *hyper,
         *int4_right)
    g8, p8 = randn(12, 9), randn(3, 9)
    st = _sample_moments8((12, 3), 2, gen)
    none5 = (None, None, None, 0, 0)
    case("projection_project_adam", "dense-right-8bit", g8, p8, st[0], st[1], "right", 0.9, 0.99, 1e-8, *none5,
         st[2], st[3], 2, -1)
    case("projection_project_adam", "dense-right-bf16-sr", g8.to(torch.bfloat16), p8,
         torch.zeros(12, 3, dtype=torch.bfloat16), torch.zeros(12, 3, dtype=torch.bfloat16), "right", 0.9, 0.99,
         1e-8, *none5, None, None, 0, 5)

    # projection_backproject_apply: dense, per-row factors (both, row_alpha alone), DCT, INT4
    rd, ra = rand(20), randn(20)
    case("projection_backproject_apply", "dense-right", w, ea, p, "right", -0.5, 0.9)
    case("projection_backproject_apply", "dense-right-rows", w, randn(20, 4), randn(4, 13), "right", -0.5, 0.9,
         *none5, rd, ra)
    case("projection_backproject_apply", "dense-left-row-alpha", w, randn(4, 13), randn(20, 4), "left", -0.5, 1.0,
         *none5, None, ra)
    case("projection_backproject_apply", "dct-left-int64", w, randn(4, 13), bl, "left", -0.5, 0.9, idx.long())
    case("projection_backproject_apply", "dct-left-row-decay", w, randn(4, 13), bl, "left", 0.5, 0.9,
         torch.tensor([3, 0, 7, 1]), None, None, 0, 0, rd, None)
    case("projection_backproject_apply", "int4-right", randn(20, 13), 0.1 * randn(20, 4), packed, "right", -0.5, 0.9,
         *int4_right)

    # projection_project_update_backproject: dense, DCT, INT4 (left), 8-bit moments
    case("projection_project_update_backproject", "dense-right", w, g, p, ea, eas, "right", *step_hyper)
    case("projection_project_update_backproject", "dct-right", w, g, br, ea, eas, "right", *step_hyper, idx)
    packed_l, scale_l, minimum_l = int4(13, 4, "left")
    case("projection_project_update_backproject", "int4-left", randn(13, 20), randn(13, 20), packed_l,
         0.1 * randn(4, 20), 0.1 * rand(4, 20), "left", *step_hyper, None, scale_l, minimum_l, 4, 16)
    st = _sample_moments8((12, 3), 2, gen)
    case("projection_project_update_backproject", "dense-right-8bit", randn(12, 9), g8, p8, st[0], st[1], "right",
         0.01, 0.9, 0.99, 1e-8, 2, 0.1, 1.0, *none5, st[2], st[3], 2, -1)

    # projection_foreach_project_update_backproject: a bucket of odd shapes per kind (dense
    # left, DCT right, INT4 right), 8-bit moments, the device flags skip / coeffs (DCT left)
    shapes = [(37, 23, 5), (19, 41, 1), (16, 16, 16), (64, 9, 3)]

    def bucket(side):
        n_ = len(shapes)
        params = [randn(m, n) for m, n, _ in shapes]
        grads = [randn(m, n) for m, n, _ in shapes]
        lows = [lowrank_shape(m, n, r, side) for m, n, r in shapes]
        eas_ = [0.1 * randn(*s) for s in lows]
        easqs = [0.1 * rand(*s) for s in lows]
        lists = ([0.01] * n_, 0.9, 0.999, 1e-8, [2] * n_, [0.1] * n_, [1.0] * n_)
        return params, grads, eas_, easqs, lists

    def side_size(m, n, side):
        return n if side == "right" else m

    params, grads, eas_, easqs, lists = bucket("left")
    projs = [orthonormal(side_size(m, n, "left"), r, "left").contiguous() for m, n, r in shapes]
    case("projection_foreach_project_update_backproject", "dense-left", params, grads, projs, eas_, easqs, "left",
         *lists, [], [], [], [], 0, [], [], 0, [])
    params, grads, eas_, easqs, lists = bucket("right")
    bases = [dct_basis(n) for m, n, r in shapes]
    indices = [torch.randperm(n, generator=gen)[:r].to(torch.int32) for m, n, r in shapes]
    case("projection_foreach_project_update_backproject", "dct-right", params, grads, bases, eas_, easqs, "right",
         *lists, indices, [], [], [], 0, [], [], 0, [])
    params, grads, eas_, easqs, lists = bucket("right")
    q4 = [qref.quant_int4_pack_ref(orthonormal(n, r, "right").contiguous(), 16) for m, n, r in shapes]
    case("projection_foreach_project_update_backproject", "int4-right", params, grads, [q[0] for q in q4], eas_,
         easqs, "right", *lists, [], [q[1] for q in q4], [q[2] for q in q4], [r for _, _, r in shapes], 16, [], [],
         0, [])
    st = _sample_moments8((12, 3), 2, gen)
    case("projection_foreach_project_update_backproject", "dense-right-8bit", [randn(12, 9)], [g8], [p8], [st[0]],
         [st[1]], "right", [0.01], 0.9, 0.99, 1e-8, [2], [0.1], [1.0], [], [], [], [], 0, [st[2]], [st[3]], 2, [])
    flagged = [(37, 23), (19, 41), (30, 30)]
    lr, steps, wd, sc = [1e-2, 2e-2, 3e-3], [3, 7, 1], [0.1, 0.0, 0.3], [0.25, 1.0, 0.5]
    coeffs = torch.tensor([[l_ * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t) * s, 1.0 - l_ * d]
                           for l_, t, s, d in zip(lr, steps, sc, wd)], dtype=torch.float32)
    case("projection_foreach_project_update_backproject", "dct-left-skip-coeffs",
         [randn(m, n) for m, n in flagged], [randn(m, n) for m, n in flagged], [dct_basis(m) for m, n in flagged],
         [0.1 * randn(5, n) for m, n in flagged], [0.01 * rand(5, n) for m, n in flagged], "left", lr, 0.9, 0.999,
         1e-8, steps, wd, sc, [torch.randperm(m, generator=gen)[:5].to(torch.int32) for m, n in flagged], [], [], [],
         0, [], [], 0, [], torch.tensor([0, 1, 0], dtype=torch.uint8), coeffs)
    return out
