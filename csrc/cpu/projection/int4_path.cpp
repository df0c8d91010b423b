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
// dispatcher call.
//
// Two steps go further, each where it is checked to give ATen's bits: the two GEMMs are
// the very sgemm_ calls at::cpu::mm_out / addmm_ make (direct::blas_addmm, cpu/direct.h:
// no meta checks, no conj views; each call layout checked once against ATen's call), and
// the float32 epilogue on moments that are one dense block in the same memory order as R
// runs on raw pointers with ATen's per-element arithmetic (adam_block below: the fused
// multiply-adds of torch 2.13's add_-with-alpha and addcmul_ kernels, MKL's vmsSqrt in the
// mode ATen's sqrt calls it with, a plain add and divide), after a one-time check per
// kernel variant that compares it bitwise with the ATen sequence above on every tail
// length of the vector loops; where a check fails, the ATen calls above run.
#include "cpu/projection/int4_path.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Config.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/direct.h"
#include "cpu/fast_f32.h"
#include "cpu/moments8.h"
#include "cpu/projection/fast_path.h"

#if AT_MKL_ENABLED()
// MKL's vector square root (in torch's LP64 MKL), as ATen's vml::vsqrt calls it.
extern "C" void vmsSqrt(int n, const float* a, float* r, long long mode);
#endif

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

// The float32 Adam epilogue as int4_lean_step's ATen calls make it, on flat tensors.
void adam_epilogue_aten(Tensor& M, Tensor& V, Tensor& R, double beta1, double beta2, double eps) {
  at::cpu::mul_(M, at::native::wrapped_scalar_tensor(beta1));
  at::cpu::add_(M, R, 1.0 - beta1);
  at::cpu::mul_(V, at::native::wrapped_scalar_tensor(beta2));
  at::cpu::addcmul_(V, R, R, 1.0 - beta2);
  at::cpu::sqrt_out(R, V);
  at::cpu::add_(R, at::native::wrapped_scalar_tensor(eps));
  at::cpu::div_out(R, M, R);
}

// Deterministic data of the epilogue's check: a 64-bit LCG's high bits as floats in (-4, 4),
// one value in seven scaled by 2^-20 or 2^20 so that roundings differ; |x| for v.
void check_fill(float* x, int64_t n, uint64_t seed, bool positive) {
  uint64_t st = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < n; ++i) {
    st = st * 6364136223846793005ULL + 1442695040888963407ULL;
    float f = static_cast<float>(static_cast<int64_t>(st >> 40) - (int64_t{1} << 23)) / static_cast<float>(1 << 21);
    if (i % 7 == 3) f = f * (st & 1 ? 9.5367431640625e-07f : 1048576.0f);
    x[i] = positive ? std::abs(f) : f;
  }
}

#if AT_MKL_ENABLED()
// ATen's vml::vsqrt: vmsSqrt(n, in, out, VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE).
constexpr long long kVmlMode = 0x00000002 | 0x00140000 | 0x00000100;
constexpr bool kHaveVml = true;
void vml_sqrt(const float* in, float* out, int64_t n) { vmsSqrt(static_cast<int>(n), in, out, kVmlMode); }
#else
constexpr bool kHaveVml = false;
void vml_sqrt(const float*, float*, int64_t) { TORCH_INTERNAL_ASSERT(false); }
#endif

// Blocks up to this many elements: ATen's element-wise loops run them as one serial chunk
// (at::internal::GRAIN_SIZE), one vmsSqrt call over the whole block.
constexpr int64_t kMaxBlock = 32768;

// The moments' update of adam_epilogue_aten per element, as torch 2.13's CPU kernels round it:
//   m = fma(g, 1 - b1, m * b1)          (mul_, then add_ with alpha: one fused multiply-add)
//   v = fma((1 - b2) * g, g, v * b2)    (mul_, then addcmul_: the scaled factor, then fused)
void moments_portable(float* m, float* v, const float* g, int64_t n, const fast::AdamConsts& c) {
  for (int64_t i = 0; i < n; ++i) {
    const float mb = m[i] * c.b1, vb = v[i] * c.b2, t = c.ob2 * g[i];
    m[i] = std::fma(g[i], c.ob1, mb);
    v[i] = std::fma(t, g[i], vb);
  }
}

#if LOWRANK_FAST_X86
__attribute__((target("avx2,fma"))) void moments_avx2(float* m, float* v, const float* g, int64_t n,
                                                      const fast::AdamConsts& c) {
  const __m256 b1 = _mm256_set1_ps(c.b1), ob1 = _mm256_set1_ps(c.ob1), b2 = _mm256_set1_ps(c.b2),
               ob2 = _mm256_set1_ps(c.ob2);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(m + i, _mm256_fmadd_ps(gv, ob1, _mm256_mul_ps(_mm256_loadu_ps(m + i), b1)));
    _mm256_storeu_ps(v + i, _mm256_fmadd_ps(_mm256_mul_ps(ob2, gv), gv, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2)));
  }
  for (; i < n; ++i) {
    const float mb = m[i] * c.b1, vb = v[i] * c.b2, t = c.ob2 * g[i];
    m[i] = __builtin_fmaf(g[i], c.ob1, mb);
    v[i] = __builtin_fmaf(t, g[i], vb);
  }
}
#endif

// adam_epilogue_aten on n contiguous elements (N over R): the moments, then R = sqrt(v) by
// vmsSqrt, then R = m / (R + eps) (add_ of a scalar: one rounding; div_out: one rounding).
void adam_block(float* m, float* v, float* r, int64_t n, const fast::AdamConsts& c, bool portable) {
#if LOWRANK_FAST_X86
  if (!portable && fast::have_avx2_fma()) {
    moments_avx2(m, v, r, n, c);
  } else {
    moments_portable(m, v, r, n, c);
  }
#else
  moments_portable(m, v, r, n, c);
#endif
  vml_sqrt(v, r, n);
  for (int64_t i = 0; i < n; ++i) {
    const float d = r[i] + c.eps;
    r[i] = m[i] / d;
  }
}

// Whether adam_block (portable or not) equals adam_epilogue_aten bit for bit: every run
// length up to 80 (past the tails of ATen's 8- and 16-lane loops, two vectors per step),
// at two offsets from a 64-byte boundary, and two sets of betas.
bool adam_block_matches_aten(bool portable) {
  constexpr int64_t kMaxLen = 80;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  for (const auto& b : {std::array<double, 3>{0.9, 0.999, 1e-8}, std::array<double, 3>{0.8, 0.95, 1e-6}}) {
    for (int64_t len = 1; len <= kMaxLen; ++len) {
      for (int64_t off : {int64_t{0}, int64_t{3}}) {
        Tensor m = at::empty({len + off}, opts), v = at::empty({len + off}, opts), r = at::empty({len + off}, opts);
        check_fill(m.data_ptr<float>(), len + off, 11 + len, false);
        check_fill(v.data_ptr<float>(), len + off, 23 + len, true);
        check_fill(r.data_ptr<float>(), len + off, 37 + len, false);
        std::vector<float> m2(m.data_ptr<float>() + off, m.data_ptr<float>() + off + len);
        std::vector<float> v2(v.data_ptr<float>() + off, v.data_ptr<float>() + off + len);
        std::vector<float> r2(r.data_ptr<float>() + off, r.data_ptr<float>() + off + len);
        Tensor mv = restride(m, {len}, {1}, off), vv = restride(v, {len}, {1}, off), rv = restride(r, {len}, {1}, off);
        adam_epilogue_aten(mv, vv, rv, b[0], b[1], b[2]);
        adam_block(m2.data(), v2.data(), r2.data(), len, fast::adam_consts(b[0], b[1], b[2]), portable);
        const size_t bytes = sizeof(float) * len;
        if (std::memcmp(m2.data(), m.data_ptr<float>() + off, bytes) != 0 ||
            std::memcmp(v2.data(), v.data_ptr<float>() + off, bytes) != 0 ||
            std::memcmp(r2.data(), r.data_ptr<float>() + off, bytes) != 0) {
          return false;
        }
      }
    }
  }
  return true;
}

// adam_block's check, once per process and variant (0 unchecked, 1 passed, 2 failed).
bool adam_block_checked(bool portable) {
  if (!kHaveVml) return false;
  static std::atomic<int> state[2] = {{0}, {0}};
  std::atomic<int>& s = state[portable ? 1 : 0];
  int v = s.load(std::memory_order_acquire);
  if (v == 0) {
    v = adam_block_matches_aten(portable) ? 1 : 2;
    s.store(v, std::memory_order_release);
  }
  return v == 1;
}

// Whether M, V and R are each one dense block of memory in the same order (row- or
// column-major, the same strides), so that the epilogue can run over them as flat arrays.
bool same_dense_block(const Tensor& M, const Tensor& V, const Tensor& R) {
  if (!row_or_col_major(M) || M.strides() != V.strides() || M.strides() != R.strides()) return false;
  return M.is_non_overlapping_and_dense();
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
    // int4_value(pk, s, mn, f, gs) for every stored index f in order (group and position
    // in P tracked by counters instead of a division per element): element (a, k) of P is
    // stored at f = k * r + a (side="left") or a * K + k.
    const bool sl = src.stored_left;
    int64_t g = 0, in_g = 0, a = 0, k = 0;
    for (int64_t f = 0; f < r * K; ++f) {
      const int q = (pk[f >> 1] >> ((f & 1) * 4)) & 15;
      o[a * K + k] = mn[g] + s[g] * static_cast<float>(q);
      if (++in_g == gs) {
        in_g = 0;
        ++g;
      }
      if (sl) {
        if (++a == r) {
          a = 0;
          ++k;
        }
      } else if (++k == K) {
        k = 0;
        ++a;
      }
    }
  }
  const Tensor PT = restride(ws, {K, r}, {1, K}, base);
  // R, then N: rows x r, laid out like the moments (column-major when they are).
  Tensor R = col_major(M) ? restride(ws, {rows, r}, {1, rows}, base + p_len)
                          : restride(ws, {rows, r}, {r, 1}, base + p_len);
  if (!direct::blas_addmm(R, G, PT, 0.0, 1.0)) at::cpu::mm_out(R, G, PT);

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
    //   sqrt_out(R, v); R.add_(eps); div_out(R, m, R);
    // as adam_block over the flat block where its check passed, else the ATen calls.
    const bool portable = fast_path_mode(-1) == 2;
    if (R.numel() <= kMaxBlock && same_dense_block(M, V, R) && adam_block_checked(portable)) {
      adam_block(M.data_ptr<float>(), V.data_ptr<float>(), R.data_ptr<float>(), R.numel(),
                 fast::adam_consts(beta1, beta2, eps), portable);
    } else {
      adam_epilogue_aten(M, V, R, beta1, beta2, eps);
    }
  }

  // engine.cpp's one-GEMM apply: W <- decay W, then W += alpha N P (beta 1).
  if (decay != 1.0) at::cpu::mul_(W, at::native::wrapped_scalar_tensor(decay));
  if (!direct::blas_addmm(W, R, P, 1.0, alpha)) at::cpu::addmm_(W, R, P, 1.0, alpha);
}

}  // namespace projection
}  // namespace lowrank_kernels
