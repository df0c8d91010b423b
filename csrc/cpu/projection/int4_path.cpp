// The packed-INT4 projector's lean route through the fused step (ops.cpp, fused_step()).
//
// The fast path (fast_path.cpp) serves float32 dense and DCT projectors with its own GEMMs;
// a packed INT4 projector goes through the general engine (engine.cpp, run()), whose
// results the committed optimizer results (Q-GaLore's) are pinned to: its GEMMs are
// torch's BLAS (at::mm_out, addmm_), and a GEMM of our own would round differently. On a
// small weight that engine spends most of its time around the arithmetic: some 40 ATen
// calls through the dispatcher (each ~0.5-1 us: argument boxing, profiler hooks, the
// scalar arguments wrapped and converted to tensors per call) and four allocations.
//
// This route computes exactly what run() computes for the common case, with the same ATen
// kernels called without the dispatcher (the at::cpu:: entry points of the structured
// kernels: the same meta checks and CPU kernels, so the same BLAS calls and the same
// element-wise loops over the same views), and no allocation:
//   P      the INT4 projector dequantized (int4_value(), as ProjectorSource::materialize)
//          into a per-thread workspace, r x K row-major, 64-byte aligned as at::empty's;
//   R      = G P^T by at::cpu::mm_out into the workspace, laid out like the moments (as
//          run(): column-major when the oriented moments are);
//   Adam   the engine's epilogue ops in its order (adam_epilogue: mul_, add_, mul_,
//          addcmul_, sqrt_out, add_, div_out; the scalars wrapped once per call as
//          Tensor::mul_(Scalar) wraps them), or the 8-bit block loop (adam8_epilogue);
//   W      decay W (skipped when decay is 1), then W += alpha N P by at::cpu::addmm_ (the
//          engine's single-GEMM apply).
// Transposed views (side="left") are made as TensorImpls over the same storage, with no
// dispatcher call. The case: float32 param and grad, float32 or 8-bit moments (no
// stochastic rounding), rank <= kBlasSingleKBlock and W stored row- or column-major, i.e.
// the engine's one-GEMM project and one-GEMM apply; anything else takes run().
#include "cpu/projection/int4_path.h"

#include <ATen/CPUFunctions.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cpu/moments8.h"
#include "cpu/projection/fast_path.h"

namespace lowrank_kernels {
namespace projection {
namespace {

// Ranks up to this: the engine's apply is one GEMM (engine.cpp, kBlasSingleKBlock).
constexpr int64_t kLeanMaxRank = 128;
// Workspace pieces start on 64-byte boundaries (16 floats), as at::empty's allocations.
constexpr int64_t kAlignFloats = 16;
// Workspace up to this many floats is kept per thread between calls (4 MB).
constexpr int64_t kKeepWorkspace = 1 << 20;

int64_t aligned(int64_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

// A view of `base`'s storage with these sizes, strides and storage offset: a TensorImpl
// made here, no dispatcher call (Tensor::t() and narrow() are ATen ops).
Tensor restride(const Tensor& base, at::IntArrayRef sizes, at::IntArrayRef strides, int64_t offset) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), base.dtype());
  impl->set_sizes_and_strides(sizes, strides, offset);
  return Tensor(std::move(impl));
}

// The transpose of a 2-D tensor.
Tensor transposed(const Tensor& t) {
  return restride(t, {t.size(1), t.size(0)}, {t.stride(1), t.stride(0)}, t.storage_offset());
}

Tensor orient(const Tensor& t, bool left) { return left ? transposed(t) : t; }

bool row_or_col_major(const Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  const bool row = (c == 1 || t.stride(1) == 1) && (r == 1 || t.stride(0) == c);
  const bool col = (r == 1 || t.stride(0) == 1) && (c == 1 || t.stride(1) == r);
  return row || col;
}

// As engine.cpp's col_major(): dim 0 has the smaller stride.
bool col_major(const Tensor& t) {
  if (t.size(0) <= 1) return false;
  if (t.size(1) <= 1) return true;
  return t.stride(0) < t.stride(1);
}

// This thread's float32 workspace of at least n elements (a fresh one above kKeepWorkspace).
Tensor workspace(int64_t n) {
  thread_local Tensor kept;
  if (n > kKeepWorkspace) return at::detail::empty_cpu({n}, at::kFloat);
  if (!kept.defined() || kept.numel() < n) kept = at::detail::empty_cpu({std::max<int64_t>(n, 4096)}, at::kFloat);
  return kept;
}

}  // namespace

bool int4_lean_eligible(const Tensor& param, const Tensor& grad, const Tensor& ea, const Tensor& eas,
                        const ProjectorSource& src, bool eight, int64_t seed) {
  if (src.kind != ProjKind::Int4 || fast_path_mode(-1) == 0) return false;
  if (param.scalar_type() != at::kFloat || grad.scalar_type() != at::kFloat || seed >= 0) return false;
  if (!eight && (ea.scalar_type() != at::kFloat || eas.scalar_type() != at::kFloat)) return false;
  return src.r <= kLeanMaxRank && row_or_col_major(param);
}

void int4_lean_step(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, const ProjectorSource& src,
                    bool left, double beta1, double beta2, double eps, double alpha, double decay,
                    const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size) {
  const Tensor G = orient(grad, left);
  Tensor W = orient(param, left);
  Tensor M = orient(exp_avg, left), V = orient(exp_avg_sq, left);
  const int64_t rows = G.size(0), K = G.size(1), r = src.r;
  TORCH_INTERNAL_ASSERT(r >= 1 && rows >= 1 && K >= 1 && src.K == K);

  const int64_t p_len = aligned(r * K);
  const Tensor ws = workspace(p_len + rows * r);
  const int64_t base = ws.storage_offset();
  // P (r x K, row-major), dequantized as ProjectorSource::materialize does.
  const Tensor P = restride(ws, {r, K}, {K, 1}, base);
  {
    const uint8_t* pk = src.packed.data_ptr<uint8_t>();
    const float* s = src.qscale.data_ptr<float>();
    const float* mn = src.qmin.data_ptr<float>();
    float* o = ws.data_ptr<float>();
    const int64_t gs = src.gs;
    for (int64_t a = 0; a < r; ++a) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t f = src.stored_left ? k * r + a : a * K + k;
        o[a * K + k] = int4_value(pk, s, mn, f, gs);
      }
    }
  }
  const Tensor PT = restride(ws, {K, r}, {1, K}, base);
  // R, then N: rows x r, laid out like the moments (column-major when they are).
  Tensor R = col_major(M) ? restride(ws, {rows, r}, {1, rows}, base + p_len)
                          : restride(ws, {rows, r}, {r, 1}, base + p_len);
  at::cpu::mm_out(R, G, PT);

  if (m_absmax.has_value() && m_absmax->defined()) {
    // engine.cpp, adam8_epilogue: the block loop in the moments' own orientation.
    const Tensor Ro = left ? transposed(R) : R;
    TORCH_INTERNAL_ASSERT(exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() && m_absmax->is_contiguous() &&
                          v_absmax->is_contiguous());
    float* rp = Ro.data_ptr<float>();
    moments8::adam8_step<float, float>(rp, Ro.stride(0), Ro.stride(1), exp_avg.data_ptr<uint8_t>(),
                                       exp_avg_sq.data_ptr<uint8_t>(), m_absmax->data_ptr<float>(),
                                       v_absmax->data_ptr<float>(), rp, Ro.stride(0), Ro.stride(1), Ro.size(0),
                                       Ro.size(1), block_size, beta1, beta2, eps);
  } else {
    // engine.cpp, adam_epilogue on float32 moments (in place), the same ops in its order:
    //   m.mul_(b1).add_(R, 1 - b1); v.mul_(b2).addcmul_(R, R, 1 - b2);
    //   sqrt_out(R, v); R.add_(eps); div_out(R, m, R).
    at::cpu::mul_(M, at::native::wrapped_scalar_tensor(beta1));
    at::cpu::add_(M, R, 1.0 - beta1);
    at::cpu::mul_(V, at::native::wrapped_scalar_tensor(beta2));
    at::cpu::addcmul_(V, R, R, 1.0 - beta2);
    at::cpu::sqrt_out(R, V);
    at::cpu::add_(R, at::native::wrapped_scalar_tensor(eps));
    at::cpu::div_out(R, M, R);
  }

  // engine.cpp's one-GEMM apply: W <- decay W, then W += alpha N P (beta 1).
  if (decay != 1.0) at::cpu::mul_(W, at::native::wrapped_scalar_tensor(decay));
  at::cpu::addmm_(W, R, P, 1.0, alpha);
}

}  // namespace projection
}  // namespace lowrank_kernels
