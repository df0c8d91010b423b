"""Triton kernels of the DCT family: fused DCT scoring (GEMM + norm epilogue) and the
gathered-basis projection ``R = G C[idx]^T`` / ``C[idx] G``.

One GEMM kernel, ``_dct_gemm_kernel``, computes tiles of ``A @ B`` (fp32 accumulation,
bf16/fp16 tensor cores on GPU) and has three epilogues:

- ``EPILOGUE=1|2`` (scoring): ``|acc|`` or ``acc^2`` of the tile is summed over the
  tile's rows (``REDUCE_ROWS``) or columns and stored into a small float32 partial
  buffer ``part[tile, i]``; the ``m x n`` score matrix is never written. A second pass
  sums the partial buffer in a fixed order (deterministic, no atomics).
- ``EPILOGUE=0`` (projection): the tile is stored.

Operands may have any strides. ``GATHER_A`` makes row ``i`` of ``A`` the row
``idx[i]`` of the ``A`` pointer's matrix; ``GATHER_B`` makes column ``j`` of ``B`` the
column ``idx[j]`` of the ``B`` pointer's matrix: the basis rows picked by the indices are
read straight from the shared basis inside the tile loads.

Scoring, ``G`` is ``m x n``, ``C`` the basis:
- right: ``S = G C^T``: ``A = G``, ``B = C^T`` (a strided view), scores = column sums;
- left:  ``S = C G``:   ``A = C``, ``B = G``, scores = row sums.

Top-k: a stable descending sort of the score vector (``n <= ~10^5``; cheap next to the
GEMM), ties to the lower index, exactly as the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.reference import dct as ref


def _interpreting() -> bool:
    return L.INTERPRET


@triton.jit
def _dct_gemm_kernel(
    a_ptr, b_ptr, idx_ptr, out_ptr,
    table_ptr,  # TABLE: int64 distances / 16 of the batch's gradients (a list) from A / B, one per grid row
    M, N, K,
    idx_bound,  # GATHER_*: rows of the gathered matrix; indices outside [0, idx_bound) read zeros
    stride_am, stride_ak, stride_bk, stride_bn, stride_o0, stride_o1,
    stride_ab, stride_bb, stride_ob,  # batch strides (0 for an operand shared by the batch)
    EPILOGUE: tl.constexpr,  # 0: store the tile, 1: sum |.|, 2: sum of squares
    REDUCE_ROWS: tl.constexpr,  # scoring: reduce over the tile's rows (True) or columns
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    IDX64: tl.constexpr,  # some operand spans more than 2^31 elements: int64 offsets
    TABLE: tl.constexpr,  # 0: batch by strides; 1 / 2: A / B of grid row b at A / B + table[b] * 16 bytes
    DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Batch (a 3-D gradient): one grid row per matrix, int64 batch offsets.
    pid_b = tl.program_id(1).to(tl.int64)
    # A list of gradients (TABLE): the operand of grid row b starts table[b] * 16 bytes after
    # the operand argument (row 0's gradient); each distance is a multiple of 16 bytes (host
    # checked) and a constant product carries that to Triton's alignment analysis, where a
    # tl.multiple_of hint on the loaded address would not under Triton 3.6 (kernels/_tl.py).
    # Every other tile computation is the same as for one matrix, so the results are too.
    if TABLE == 1:
        a_ptr += tl.load(table_ptr + pid_b) * (128 // a_ptr.dtype.element_ty.primitive_bitwidth)
    else:
        a_ptr += pid_b * stride_ab
    if TABLE == 2:
        b_ptr += tl.load(table_ptr + pid_b) * (128 // b_ptr.dtype.element_ty.primitive_bitwidth)
    else:
        b_ptr += pid_b * stride_bb
    out_ptr += pid_b * stride_ob
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share their B column panels in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % gm)
    pid_n = (pid % group) // gm

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap (always valid addresses, no load masks); the
    # epilogue masks them out so they are never stored or counted.
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    if IDX64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    # Gathered rows/columns: an index outside [0, idx_bound) reads zeros (masked), never
    # memory outside the basis (CUDA does not check indices; the CPU backends do).
    a_ok = tl.full((BLOCK_M,), 1, tl.int1)
    b_ok = tl.full((BLOCK_N,), 1, tl.int1)
    if GATHER_A:
        rows = tl.load(idx_ptr + rows).to(tl.int64)
        a_ok = (rows >= 0) & (rows < idx_bound)
    if GATHER_B:
        cols = tl.load(idx_ptr + cols).to(tl.int64)
        b_ok = (cols >= 0) & (cols < idx_bound)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            if GATHER_A:
                a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs)
            if GATHER_B:
                b = tl.load(b_ptrs, mask=b_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs)
        else:
            k_left = K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=a_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & b_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m_ok = offs_m < M
    n_ok = offs_n < N
    if EPILOGUE == 0:
        if IDX64:
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
        o_ptrs = out_ptr + offs_m[:, None] * stride_o0 + offs_n[None, :] * stride_o1
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        if EPILOGUE == 1:
            v = tl.abs(acc)
        else:
            v = acc * acc
        if REDUCE_ROWS:
            v = tl.where(m_ok[:, None], v, 0.0)
            part = tl.sum(v, axis=0)
            tl.store(out_ptr + pid_m * stride_o0 + offs_n * stride_o1, part, mask=n_ok)
        else:
            v = tl.where(n_ok[None, :], v, 0.0)
            part = tl.sum(v, axis=1)
            tl.store(out_ptr + pid_n * stride_o0 + offs_m * stride_o1, part, mask=m_ok)


def _dot_dtype(grad):
    """(tl dot dtype, ieee): a bf16/fp16 gradient runs on tensor cores in its own dtype
    (the basis rounded to it, as in the reference's inputs); everything else in fp32
    with ieee precision (torch's default, no tf32). The interpreter always uses fp32
    (its bf16 dot is broken)."""
    if _interpreting():
        return tl.float32, True
    if grad.dtype == torch.bfloat16:
        return tl.bfloat16, False
    if grad.dtype == torch.float16:
        return tl.float16, False
    return tl.float32, True


_needs_int64 = L.needs_int64


def _gemm(a, b, out, M, N, K, sa, sb, so, *, epilogue, reduce_rows=False, idx=None, gather_a=False, gather_b=False,
          idx_bound=0, dot_from=None, batch=1, batch_strides=(0, 0, 0), spans=None, table=None, table_mode=0):
    """Launch ``_dct_gemm_kernel`` with the tile of the shared policy (lowrank_kernels/kernels/_launch.py)."""
    dot_dtype, ieee = _dot_dtype(dot_from)
    grid = lambda tile: (triton.cdiv(M, tile.bm) * triton.cdiv(N, tile.bn), batch)  # noqa: E731
    args = (a, b, idx if idx is not None else a, out, table if table is not None else out, M, N, K, idx_bound,
            sa[0], sa[1], sb[0], sb[1], so[0], so[1], *batch_strides)
    meta = dict(
        EPILOGUE=epilogue, REDUCE_ROWS=reduce_rows, GATHER_A=gather_a, GATHER_B=gather_b,
        IDX64=_needs_int64(*(spans if spans is not None else (a, b, out))), TABLE=table_mode, DOT_DTYPE=dot_dtype,
        IEEE=ieee,
    )
    # Scoring writes its partial sums with plain stores: autotuning trials restore `out`.
    L.launch_gemm("dct_gemm", _dct_gemm_kernel, grid, args, meta, device=out.device, M=M, N=N, K=K,
                  op_bytes=[a.element_size(), b.element_size()],
                  side="right" if (gather_b or (epilogue and reduce_rows)) else "left",
                  mode=2 if (gather_a or gather_b) else 0, restore=(out,) if epilogue else ())


@triton.jit
def _dct_partial_sum_kernel(part_ptr, out_ptr, T, S, stride_pb, stride_pt, stride_ob,
                            SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """``out[b, j] = sum_t part[b, t, j]`` (then ``sqrt`` for the L2 norm), summed in the order
    ``t = 0, 1, ...`` in float32: the same order for any batch size, so a matrix scored alone
    or in a list of gradients gets bitwise the same scores."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    base = part_ptr + b * stride_pb
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        acc += tl.load(base + t * stride_pt + offs, mask=ok, other=0.0)
    if SQRT:
        acc = tl.sqrt_rn(acc)
    tl.store(out_ptr + b * stride_ob + offs, acc, mask=ok)


_SUM_BLOCK = 256


def _reduce_partials(part, norm):
    """Scores ``(batch, s)`` float32 from the partial sums ``part`` (``batch x T x s``, contiguous)."""
    nb, T, s = part.shape
    out = torch.empty((nb, s), dtype=torch.float32, device=part.device)
    if nb > 0 and s > 0:
        L.launch("dct", _dct_partial_sum_kernel, (nb, triton.cdiv(s, _SUM_BLOCK)),
                 (part, out, T, s, part.stride(0), part.stride(1), out.stride(0)),
                 dict(SQRT=norm == 2, BLOCK=_SUM_BLOCK, num_warps=4), device=part.device)
    return out


def _partial_rows(M, N, reduce_rows):
    """Rows of the scoring partial buffer: tiles along the reduced dimension for the
    smallest block of any tile this process may launch (64; 64^3 in the interpreter)."""
    return triton.cdiv(M if reduce_rows else N, 64)


def _score_launch(g, g_strides, nb, basis, side, norm, part, *, batch_stride=0, table=None):
    """Scoring partial sums of ``nb`` gradients of ``g``'s shape (``m x n``, strides
    ``g_strides``) into ``part`` (``nb x T x s``): matrix ``b`` at ``g + b * batch_stride``,
    or at the address ``table[b]`` (a list of gradients)."""
    m, n = g.shape[-2:]
    if side == "right":  # S = G C^T (m x n), score per column
        a, sa = g, g_strides
        b, sb = basis, (basis.stride(1), basis.stride(0))
        M, N, K, reduce_rows = m, n, n, True
        ab, bb, mode = batch_stride, 0, 1
    else:  # S = C G (m x n), score per row
        a, sa = basis, basis.stride()
        b, sb = g, g_strides
        M, N, K, reduce_rows = m, n, m, False
        ab, bb, mode = 0, batch_stride, 2
    if nb == 0 or M == 0 or N == 0:
        return
    one = g if g.dim() == 2 else g[0]
    _gemm(a, b, part, M, N, K, sa, sb, part.stride()[1:], epilogue=norm, reduce_rows=reduce_rows,
          dot_from=g, batch=nb, batch_strides=(ab, bb, part.stride(0)), spans=(one, basis, part[0]),
          table=table, table_mode=mode if table is not None else 0)


def _new_partials(nb, m, n, side, device):
    s = n if side == "right" else m
    # Zero-filled: tiles that a config does not produce add nothing to the sum.
    return torch.zeros((nb, _partial_rows(m, n, side == "right"), s), dtype=torch.float32, device=device)


def _finish(scores, grad_dtype, basis):
    if grad_dtype == torch.float64 or basis.dtype == torch.float64:
        scores = scores.double()
    return scores


def dct_scores_triton(grad, basis, side, norm):
    batched = grad.dim() == 3
    g3 = grad if batched else grad.unsqueeze(0)
    nb, m, n = g3.shape
    part = _new_partials(nb, m, n, side, grad.device)
    _score_launch(g3, g3.stride()[1:], nb, basis, side, norm, part, batch_stride=g3.stride(0))
    scores = _reduce_partials(part, norm)
    return _finish(scores if batched else scores[0], grad.dtype, basis)


def dct_score_topk_triton(grad, basis, k, side, norm):
    return ref.topk_indices(dct_scores_triton(grad, basis, side, norm), k)


_ALIGN = 16  # bytes: the alignment the kernel's table form carries to the compiler


def _address_table(ptrs, device):
    """The int64 table of a list launch, on ``device``: each address's distance from the
    first (the launch's operand argument) divided by 16 (``_dct_gemm_kernel``'s ``TABLE``)."""
    if device.type == "meta":  # the compile check: only the argument's type matters
        return torch.zeros(len(ptrs), dtype=torch.int64, device=device)
    assert all((p - ptrs[0]) % _ALIGN == 0 for p in ptrs), "the list launch's gradients are 16-byte aligned"
    host = torch.tensor([(p - ptrs[0]) // _ALIGN for p in ptrs], dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def dct_foreach_scores_triton(grads, basis, side, norm):
    """Scores ``(len(grads), s)`` of a list of same-shape gradients: ONE scoring launch for all
    of them (a table of their addresses; one more per extra stride pattern or unaligned
    gradient), one reduction launch. Each matrix's tiles, partial sums and their reduction
    are those of :func:`dct_scores_triton` on that matrix alone: bitwise the same scores."""
    nb = len(grads)
    dev = basis.device
    if nb == 0:
        s = basis.shape[0]
        return torch.empty((0, s), dtype=torch.float64 if basis.dtype == torch.float64 else torch.float32, device=dev)
    m, n = grads[0].shape
    part = _new_partials(nb, m, n, side, dev)
    meta = dev.type == "meta"
    groups = {}
    for i, g in enumerate(grads):
        aligned = meta or g.data_ptr() % _ALIGN == 0
        groups.setdefault(tuple(g.stride()) if aligned else ("unaligned", i), []).append(i)
    for key, members in groups.items():
        g0 = grads[members[0]]
        if key[0] == "unaligned":  # an odd view: scored alone, by its own pointer
            _score_launch(g0, g0.stride(), 1, basis, side, norm, part[members[0]:members[0] + 1])
            continue
        table = _address_table([0 if meta else grads[i].data_ptr() for i in members], dev)
        if len(members) == nb:
            _score_launch(g0, g0.stride(), nb, basis, side, norm, part, table=table)
        else:
            sub = _new_partials(len(members), m, n, side, dev)
            _score_launch(g0, g0.stride(), len(members), basis, side, norm, sub, table=table)
            part.index_copy_(0, torch.tensor(members, device=dev), sub)
    return _finish(_reduce_partials(part, norm), grads[0].dtype, basis)


def dct_foreach_score_topk_triton(grads, basis, k, side, norm):
    """Triton backend of ``lowrank_kernels::dct_foreach_score_topk``: ``(len(grads), k)`` int32."""
    return ref.topk_indices(dct_foreach_scores_triton(grads, basis, side, norm), k)


def dct_project_triton(grad, basis, indices, side):
    m, n = grad.shape
    r = indices.shape[0]
    f64 = grad.dtype == torch.float64 or basis.dtype == torch.float64
    if side == "right":  # R = G C[idx]^T (m x r): B[l, a] = C[idx[a], l]
        out = torch.empty((m, r), dtype=torch.float32, device=grad.device)
        _gemm(grad, basis, out, m, r, n, grad.stride(), (basis.stride(1), basis.stride(0)), out.stride(),
              epilogue=0, idx=indices, gather_b=True, idx_bound=basis.shape[0], dot_from=grad)
    else:  # R = C[idx] G (r x n): A[a, i] = C[idx[a], i]
        out = torch.empty((r, n), dtype=torch.float32, device=grad.device)
        _gemm(basis, grad, out, r, n, m, basis.stride(), grad.stride(), out.stride(),
              epilogue=0, idx=indices, gather_a=True, idx_bound=basis.shape[0], dot_from=grad)
    return out.double() if f64 else out
