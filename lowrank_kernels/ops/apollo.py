"""The apollo family: APOLLO's non-refresh step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``apollo_foreach_update(params![], grads[], seeds, exp_avg![], exp_avg_sq![], prev_norm![],
  side, rank, channel, beta1, beta2, eps, front, alpha, decay, m_absmax![], v_absmax![],
  block_size, moment_seed) -> ()`` (Python: :func:`foreach_apollo_update_`).

Per entry (the specification: ``lowrank_kernels/reference/apollo.py``): the random projector
regenerated from its seed, ``R`` = the projected gradient, the Adam update ``N`` of ``R``
(any moment format, as ``adam_update_``), the scaling factors ``||N|| / ||R||`` per channel
or per tensor, the optional norm-growth limiter against ``prev_norm`` (updated in place),
then ``W <- decay W + alpha * G * s``. Bit-identical on CPU to ``APOLLOAdamW``'s
per-parameter step.

Backends: the reference (a loop; serves every device), C++ (the loop behind one
dispatcher call, float32 weights on CPU) and Triton (``kernels/apollo.py``: the Adam update of
the whole list in one grouped launch, the rest per entry).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import apollo as ref
from lowrank_kernels.reference.projection import moment_tail

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .projection import _check_hyper, foreach_moment_args

def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import apollo as kernels

    return kernels


_OP = "foreach_apollo_update_"


def validate_foreach_apollo_update(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel, beta1,
                                   beta2, eps, front, alpha, decay, m_absmax=(), v_absmax=(), block_size=0,
                                   moment_seed=(), *, op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("seeds", seeds), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                   ("front", front), ("alpha", alpha), ("decay", decay)),
                  (("prev_norm", prev_norm), ("m_absmax", m_absmax), ("v_absmax", v_absmax),
                   ("moment_seed", moment_seed)))
    C.check_side(side, op)
    C.fail_type(isinstance(rank, int) and not isinstance(rank, bool), op, lambda: f"rank must be an int, got {rank!r}")
    _check_hyper(op, beta1, beta2, eps)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                              ("prev_norm", prev_norm), ("m_absmax", m_absmax), ("v_absmax", v_absmax)])
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g = params[i], grads[i]
        C.check_step_entry(p, g, where)
        m, k = p.shape
        C.check_rank(rank, m, k, where, "rank")
        shape = (m, rank) if side == "right" else (rank, k)
        mine = C.check_moment_state(where, exp_avg[i], exp_avg_sq[i], shape, p.dtype,
                                    *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        if len(prev_norm):
            t = prev_norm[i]
            C.check_float(t, "prev_norm", where, (torch.float32,))
            C.fail_value(t.numel() == 1, where, lambda: f"prev_norm must hold one value, got shape {tuple(t.shape)}")
            mine.append(("prev_norm", t))
        C.check_same_device(where, [("params", p), ("grads", g)] + mine)
        t = seeds[i]
        C.check_tensor(t, "seeds", where)
        C.fail_type(t.dtype == torch.int64 and t.device.type == "cpu" and t.numel() == 1, where,
                    lambda: f"seeds must be one-value int64 CPU tensors, got {t.dtype} of shape {tuple(t.shape)} "
                            f"on {t.device}")
        written += [(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in mine]
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)])


def _cache_key(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel, beta1, beta2, eps, front,
               alpha, decay, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """What the structural checks read: the signatures of every tensor (the gradients' without
    their pointers), side, rank, block size, which moment seeds are given and the list lengths.
    The betas, eps and the gradients' memory are the recheck's."""
    sig = C.tensor_signature(params, seeds, exp_avg, exp_avg_sq, prev_norm, m_absmax, v_absmax)
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    return (side, rank, block_size, tuple(s >= 0 for s in moment_seed), len(seeds), len(front), len(alpha),
            len(decay), sig, grads_sig)


def _remember(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, *rest):
    m_absmax, v_absmax = (rest[9], rest[10]) if len(rest) > 10 else ((), ())
    return C.SpanIndex([*params, *exp_avg, *exp_avg_sq, *prev_norm, *m_absmax, *v_absmax])


def _recheck(written, params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel, beta1, beta2, eps,
             *rest):
    ok = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0 and not written.any_overlap(grads)
    if not ok:
        validate_foreach_apollo_update(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel,
                                       beta1, beta2, eps, *rest)


foreach_apollo_update_op = define_op(
    "apollo_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] seeds, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
    "Tensor(d!)[] prev_norm, str side, int rank, bool channel, float beta1, float beta2, float eps, float[] front, "
    "float[] alpha, float[] decay, Tensor(e!)[] m_absmax, Tensor(f!)[] v_absmax, int block_size, "
    "int[] moment_seed) -> ()",
    family="apollo",
    triton=lambda: _kernels().apollo_foreach_update_triton,
    cpp="apollo_foreach_update_cpu",
    reference=ref.apollo_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_apollo_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_apollo_update_op)


def foreach_apollo_update_(params, grads, seeds, exp_avg, exp_avg_sq, *, side, rank, channel, beta1, beta2, eps,
                           front, alpha, decay, prev_norm=None, m_absmax=None, v_absmax=None, block_size=256,
                           moment_seed=None) -> None:
    """APOLLO's non-refresh step on a list of 2-D float32 weights, in place, in one op call.

    Per weight ``i``: the projector ``randn / sqrt(rank)`` drawn from a generator seeded with
    ``seeds[i]`` (a one-value int64 CPU tensor, read by the kernel) (``rank x n`` for ``side="right"``, ``m x rank`` for ``"left"``), the
    projected gradient ``R``, its Adam update ``N`` (moments ``exp_avg[i]``,
    ``exp_avg_sq[i]`` of ``R``'s shape, any moment format as :func:`adam_update_`), the
    scaling factors ``s = ||N|| / (||R|| + 1e-8)`` per channel of the full dimension
    (``channel=True``) or per tensor, times ``front[i]``; with ``prev_norm`` (a list of
    one-value float32 tensors, updated in place) the norm-growth limiter of Fira/APOLLO;
    then ``W <- decay[i] W + alpha[i] * G * s``. ``front``, ``alpha``, ``decay``: one number
    per weight. Every entry is validated before anything is written.
    """
    _eager_op(list(params), list(grads), list(seeds), list(exp_avg), list(exp_avg_sq),
              [] if prev_norm is None else list(prev_norm), side, int(rank), bool(channel), float(beta1), float(beta2),
              float(eps), [float(x) for x in front], [float(x) for x in alpha], [float(x) for x in decay],
              *foreach_moment_args(_OP, m_absmax, v_absmax, block_size, moment_seed))


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the apollo family's op, for ``torch.library.opcheck``: both sides,
    channel and tensor scaling, with and without the limiter, 8-bit and 16-bit moments."""
    from .projection import _sample_moments8

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    out = []
    shapes = [(6, 9), (7, 5)]
    r = 2
    for side, channel, limiter in (("right", True, True), ("left", False, False), ("left", True, False)):
        low = [(m, r) if side == "right" else (r, n) for m, n in shapes]
        out.append(("apollo_foreach_update", f"{side}-{'channel' if channel else 'tensor'}-{'limiter' if limiter else 'free'}", (
            [randn(*s) for s in shapes], [randn(*s) for s in shapes], [torch.tensor(3), torch.tensor(11)], [randn(*s) for s in low],
            [randn(*s).abs() for s in low], [randn(1).abs().reshape(()) for _ in shapes] if limiter else [], side, r,
            channel, 0.9, 0.999, 1e-6, [1.0, 2.0], [-1e-2, -2e-2], [0.99, 1.0], [], [], 0, [])))
    st = _sample_moments8((6, 2), 2, gen)
    out.append(("apollo_foreach_update", "8bit", (
        [randn(6, 9)], [randn(6, 9)], [torch.tensor(5)], [st[0]], [st[1]], [], "right", 2, True, 0.9, 0.999, 1e-6, [1.0], [-1e-2],
        [1.0], [st[2]], [st[3]], 2, [])))
    out.append(("apollo_foreach_update", "bf16-sr", (
        [randn(6, 9)], [randn(6, 9)], [torch.tensor(5)], [torch.zeros(6, 2, dtype=torch.bfloat16)],
        [torch.zeros(6, 2, dtype=torch.bfloat16)], [], "right", 2, False, 0.9, 0.999, 1e-6, [1.0], [-1e-2], [1.0],
        [], [], 0, [7])))
    return out
