// ATen's float32 CPU reductions reproduced on raw pointers, in ATen's very order, for the
// per-weight loops over small weights where each ATen call (dispatch, TensorIterator setup,
// an output allocation: several microseconds) costs more than the arithmetic. Used only
// where a one-time self-check (ready()) has compared them bitwise with ATen's own calls in
// this process; everywhere else the callers keep ATen's calls.
//
//   sum_lastdim(x, rows, cols, out)  at::sum(x, -1) of a contiguous rows x cols tensor
//                                    (and at::sum of a contiguous vector: rows = 1);
//   row_dots(x, y, rows, cols, out)  at::sum(at::mul(x, y), -1) (no product tensor);
//   sum_dim0(x, rows, cols, out)     at::sum(x, 0);
//   norm_all(x, n)                   at::linalg_vector_norm(x, 2, dtype=float32) over all
//                                    of a contiguous tensor;
//   vsqrt(x, out, n)                 at::sqrt of contiguous float32 data: where torch's MKL
//                                    is there, its vector square root (what ATen's sqrt
//                                    kernel calls on contiguous data: vmsSqrt, high accuracy,
//                                    denormals kept), reached through its exported Fortran
//                                    entry VMSSQRT_ once its own self-check agrees with
//                                    at::sqrt; else false (the caller uses ATen);
//   mm_into(out, a, b)               at::mm_out(out, a, b) of float32 CPU matrices: the BLAS
//                                    call ATen's CPU mm makes (addmm_impl_cpu_: its choice of
//                                    transposes and leading dimensions, then cpublas::gemm's
//                                    normalize_last_dims and sgemm), made directly to torch's
//                                    exported MKL sgemm, per layout only after a one-time
//                                    bitwise comparison with at::cpu::mm_out on data of that
//                                    layout and alignment; else at::cpu::mm_out itself.
//
// The sums are ATen's cascade_sum (aten/src/ATen/native/cpu/SumKernel.cpp, float32
// accumulates in float32): the output is filled with 0 and the sum is added to it; along
// contiguous memory (the reduced dimension innermost, >= 8 long) vectorized_inner_sum:
// per row, 8-lane vectors in 4 interleaved partial sums (row_sum, each a multi_row_sum:
// chunks of 2^level_power summed in up to 4 levels), the scalar tail, then the 8 lanes in
// order; across rows of a row-major matrix (sum over dim 0) vectorized_outer_sum: blocks of
// 32 columns (4 vectors, each summed down the rows by multi_row_sum), then blocks of 8
// (row_sum of vectors), then single columns (row_sum of scalars); fewer than 8 columns or
// rows: the scalar versions (scalar_outer_sum: groups of 4 columns, then single ones). A
// vector lane is an independent float32 accumulator, so 8 scalar accumulators reproduce
// it exactly (additions only: nothing to contract). The norm is apollo.cpp's
// (binary_kernel_reduce_lastdim of the AVX2 build: 8 lanes of unfused x * x + s, lanes
// folded in order, a 4-element unfused tail, the rest fused).
//
// Limits (else the callers use ATen): ATen's AVX2 kernels (at::get_cpu_capability), a CPU
// with AVX2 and FMA, float32, contiguous, both dimensions >= 2 for the 2-D sums, and the
// serial reduction: fewer than at::internal::GRAIN_SIZE (32768) elements or one thread
// (ATen splits larger reductions across threads, which changes the order).
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <dlfcn.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cpu/direct.h"

namespace lowrank_kernels {
namespace aten_order {

inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// ATen's multi_row_sum: NR accumulators of L lanes; load(i, k, l) is element (i, k, l).
template <int NR, int L, typename Load>
inline void multi_row_sum(int64_t size, const Load& load, float (&out)[NR][L]) {
  constexpr int kLevels = 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t step = int64_t(1) << power;
  const int64_t mask = step - 1;
  float acc[kLevels][NR][L];
  for (int j = 0; j < kLevels; ++j)
    for (int k = 0; k < NR; ++k)
      for (int l = 0; l < L; ++l) acc[j][k][l] = 0.0f;
  int64_t i = 0;
  for (; i + step <= size;) {
    for (int64_t j = 0; j < step; ++j, ++i) {
      for (int k = 0; k < NR; ++k)
        for (int l = 0; l < L; ++l) acc[0][k][l] += load(i, k, l);
    }
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < NR; ++k) {
        for (int l = 0; l < L; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int k = 0; k < NR; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += load(i, k, l);
  }
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < NR; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  for (int k = 0; k < NR; ++k)
    for (int l = 0; l < L; ++l) out[k][l] = acc[0][k][l];
}

// ATen's row_sum (4 interleaved partial sums): load(i, l) is lane l of element i.
template <int L, typename Load>
inline void row_sum(int64_t size, const Load& load, float (&out)[L]) {
  constexpr int kIlp = 4;
  const int64_t size_ilp = size / kIlp;
  float part[kIlp][L];
  multi_row_sum<kIlp, L>(size_ilp, [&](int64_t i, int k, int l) { return load(i * kIlp + k, l); }, part);
  for (int64_t i = size_ilp * kIlp; i < size; ++i)
    for (int l = 0; l < L; ++l) part[0][l] += load(i, l);
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < L; ++l) part[0][l] += part[k][l];
  for (int l = 0; l < L; ++l) out[l] = part[0][l];
}

// One contiguous row of n floats as ATen sums it along its memory (vectorized_inner_sum for
// n >= 8, else scalar_inner_sum), added to an output of 0.
inline float sum_row(const float* x, int64_t n) {
  if (n >= 8) {
    const int64_t vs = n / 8;
    float lanes[8];
    row_sum<8>(vs, [&](int64_t i, int l) { return x[i * 8 + l]; }, lanes);
    float fin = 0.0f;
    for (int64_t k = vs * 8; k < n; ++k) fin += x[k];
    for (int l = 0; l < 8; ++l) fin += lanes[l];
    return 0.0f + fin;
  }
  float s[1];
  row_sum<1>(n, [&](int64_t i, int) { return x[i]; }, s);
  return 0.0f + s[0];
}

// sum_row of the products x[k] * y[k] of fewer than 8 elements (scalar_inner_sum).
inline float sum_row_scalar_dot(const float* x, const float* y, int64_t n) {
  float s[1];
  row_sum<1>(n, [&](int64_t i, int) { return x[i] * y[i]; }, s);
  return 0.0f + s[0];
}

// sum_row on 8-float AVX vectors (n >= 8): the same additions in the same order (an AVX add
// is 8 independent float32 additions), with the element loaded as x[k] or, when y is given,
// as the float32 product x[k] * y[k] (at::mul's rounding: compiled without FMA, nothing is
// contracted). Used only after ready(), which requires AVX2.
template <bool kProduct>
__attribute__((target("avx2"))) inline float sum_row_avx2(const float* x, const float* y, int64_t n) {
#define LK_ATEN_ORDER_LOAD(i) \
  (kProduct ? _mm256_mul_ps(_mm256_loadu_ps(x + 8 * (i)), _mm256_loadu_ps(y + 8 * (i))) : _mm256_loadu_ps(x + 8 * (i)))
  const int64_t vs = n / 8, size = vs / 4;
  constexpr int kLevels = 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t step = int64_t(1) << power;
  const int64_t mask = step - 1;
  __m256 acc[kLevels][4];
  for (int j = 0; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[j][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + step <= size;) {
    for (int64_t j = 0; j < step; ++j, ++i) {
      for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], LK_ATEN_ORDER_LOAD(i * 4 + k));
    }
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i) {
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], LK_ATEN_ORDER_LOAD(i * 4 + k));
  }
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  for (int64_t v = size * 4; v < vs; ++v) acc[0][0] = _mm256_add_ps(acc[0][0], LK_ATEN_ORDER_LOAD(v));
  for (int k = 1; k < 4; ++k) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
  float fin = 0.0f;
  for (int64_t k = vs * 8; k < n; ++k) {
    const float e = kProduct ? x[k] * y[k] : x[k];
    fin += e;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc[0][0]);
  for (int l = 0; l < 8; ++l) fin += lanes[l];
  return 0.0f + fin;
#undef LK_ATEN_ORDER_LOAD
}

// at::sum(x, -1) of a contiguous rows x cols float32 tensor (rows = 1: the sum of a vector).
inline void sum_lastdim(const float* x, int64_t rows, int64_t cols, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    out[i] = cols >= 8 ? sum_row_avx2<false>(x + i * cols, nullptr, cols) : sum_row(x + i * cols, cols);
  }
}

// at::sum(at::mul(x, y), -1) of two contiguous rows x cols float32 tensors.
inline void row_dots(const float* x, const float* y, int64_t rows, int64_t cols, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * cols;
    const float* yr = y + i * cols;
    if (cols >= 8) {
      out[i] = sum_row_avx2<true>(xr, yr, cols);
    } else {
      out[i] = sum_row_scalar_dot(xr, yr, cols);
    }
  }
}

// at::sum(x, 0) of a contiguous rows x cols float32 tensor (rows, cols >= 2).
inline void sum_dim0(const float* x, int64_t rows, int64_t cols, float* out) {
  int64_t j = 0;
  if (cols >= 8) {  // vectorized_outer_sum
    for (; j + 32 <= cols; j += 32) {
      float s[4][8];
      const float* b = x + j;
      multi_row_sum<4, 8>(rows, [&](int64_t i, int k, int l) { return b[i * cols + k * 8 + l]; }, s);
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 8; ++l) out[j + k * 8 + l] = 0.0f + s[k][l];
    }
    for (; j + 8 <= cols; j += 8) {
      float s[8];
      const float* b = x + j;
      row_sum<8>(rows, [&](int64_t i, int l) { return b[i * cols + l]; }, s);
      for (int l = 0; l < 8; ++l) out[j + l] = 0.0f + s[l];
    }
  } else {  // scalar_outer_sum: groups of 4 columns
    for (; j + 3 < cols; j += 4) {
      float s[4][1];
      const float* b = x + j;
      multi_row_sum<4, 1>(rows, [&](int64_t i, int k, int) { return b[i * cols + k]; }, s);
      for (int k = 0; k < 4; ++k) out[j + k] = 0.0f + s[k][0];
    }
  }
  for (; j < cols; ++j) {
    float s[1];
    const float* b = x + j;
    row_sum<1>(rows, [&](int64_t i, int) { return b[i * cols]; }, s);
    out[j] = 0.0f + s[0];
  }
}

// at::linalg_vector_norm(x, 2, dtype=float32) over all n elements of contiguous float32 data
// (ATen's AVX2 binary_kernel_reduce_lastdim; compiled for AVX2 without FMA: nothing contracted).
__attribute__((target("avx2"))) inline float norm_all(const float* x, int64_t size) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d < size - (size % 8); d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, acc);
  float s = buf[0];
  for (int j = 1; j < 8; ++j) s = s + buf[j];
  if (size - d >= 4) {
    for (int j = 0; j < 4; ++j, ++d) {
      const float p = x[d] * x[d];
      s = s + p;
    }
  }
  for (; d < size; ++d) s = __builtin_fmaf(x[d], x[d], s);
  return std::sqrt(s);
}

// The deterministic data of the self-check: a 64-bit LCG's high bits as floats in (-4, 4),
// one value in seven scaled by 2^-20 or 2^20 so that roundings differ.
inline std::vector<float> check_data(int64_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t st = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < n; ++i) {
    st = st * 6364136223846793005ULL + 1442695040888963407ULL;
    float f = static_cast<float>(static_cast<int64_t>(st >> 40) - (int64_t{1} << 23)) / static_cast<float>(1 << 21);
    if (i % 7 == 3) f = f * (st & 1 ? 9.5367431640625e-07f : 1048576.0f);
    v[i] = f;
  }
  return v;
}

// ---------------------------------------------------------------------- torch's own MKL
// A symbol of the library holding ATen's CPU kernels (libtorch_cpu, where torch's MKL is linked
// in), else of the global scope; null if absent (the callers then keep ATen's calls).
inline void* torch_symbol(const char* name) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
    if (void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {  // already loaded: no new load
      if (void* f = dlsym(h, name)) return f;  // the handle is kept: the library stays loaded anyway
    }
  }
  return dlsym(RTLD_DEFAULT, name);
}

// ---------------------------------------------------------------------- square roots
using VmsSqrtFn = void (*)(const int*, const float*, float*, const long long*);
constexpr long long kVmlMode = 0x00000002 | 0x00140000 | 0x00000100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE

inline VmsSqrtFn vms_sqrt_symbol() {
  static const VmsSqrtFn f = reinterpret_cast<VmsSqrtFn>(torch_symbol("VMSSQRT_"));
  return f;
}

inline bool vsqrt_checked() {
  const VmsSqrtFn f = vms_sqrt_symbol();
  if (f == nullptr) return false;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  for (int64_t n : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 172, 1000, 4099}) {
    std::vector<float> x = check_data(n, static_cast<uint64_t>(n) + 101);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::fabs(x[i]);
      if (i % 11 == 5) x[i] = x[i] * 1e-39f;  // denormal inputs
      if (i % 13 == 7) x[i] = 0.0f;
    }
    std::vector<float> mine(n);
    const int len = static_cast<int>(n);
    f(&len, x.data(), mine.data(), &kVmlMode);
    const at::Tensor ref = at::sqrt(at::from_blob(x.data(), {n}, opts));
    if (std::memcmp(ref.data_ptr<float>(), mine.data(), n * sizeof(float)) != 0) return false;
  }
  return true;
}

// out[0:n] = at::sqrt of x[0:n] (contiguous float32, n < 2^31) where available; false: not done.
inline bool vsqrt(const float* x, float* out, int64_t n) {
  static const bool ok = vsqrt_checked();
  // ATen's kernel makes one MKL call over the whole length when it does not split it among
  // threads (grain 2048): only then is this the same call.
  if (!ok || n <= 0 || n > (int64_t{1} << 30) || (n >= 2048 && at::get_num_threads() > 1)) return false;
  const int len = static_cast<int>(n);
  vms_sqrt_symbol()(&len, x, out, &kVmlMode);
  return true;
}

// ---------------------------------------------------------------------- matrix products
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

inline SgemmFn sgemm_symbol() {
  static const SgemmFn f = reinterpret_cast<SgemmFn>(torch_symbol("sgemm"));
  return f;
}

// The arguments of the sgemm call ATen's addmm_impl_cpu_ makes for out = a b (beta 0, alpha 1)
// with out, a, b of these sizes and strides; false where ATen would copy an operand first.
struct GemmCall {
  char ta = 'n', tb = 'n';
  int m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  bool swap = false;  // a's matrix is b's tensor
};

inline bool gemm_call(int64_t M, int64_t N, int64_t K, int64_t sa0, int64_t sa1, int64_t sb0, int64_t sb1,
                      int64_t sc0, int64_t sc1, GemmCall& g) {
  if (M <= 0 || N <= 0 || K <= 0) return false;
  std::array<int64_t, 2> m1z{M, K}, m2z{K, N}, m1s{sa0, sa1}, m2s{sb0, sb1};
  bool tc;
  if (sc0 == 1 && (N == 1 || sc1 >= std::max<int64_t>(1, M))) {
    tc = false;
  } else if (sc1 == 1 && (M == 1 || sc0 >= std::max<int64_t>(1, N))) {
    std::swap(m1z, m2z);
    std::swap(m1s, m2s);
    tc = true;
  } else {
    return false;
  }
  const int64_t m = tc ? N : M, n = tc ? M : N, k = m1z[tc ? 0 : 1];
  bool ta, tb;
  if (m1s[tc ? 1 : 0] == 1 && m1s[tc ? 0 : 1] >= std::max<int64_t>(1, m)) {
    ta = false;
  } else if (m1s[tc ? 0 : 1] == 1 && m1s[tc ? 1 : 0] >= std::max<int64_t>(1, k)) {
    ta = true;
  } else {
    return false;
  }
  if (m2s[tc ? 1 : 0] == 1 && m2s[tc ? 0 : 1] >= std::max<int64_t>(1, k)) {
    tb = false;
  } else if (m2s[tc ? 0 : 1] == 1 && m2s[tc ? 1 : 0] >= std::max<int64_t>(1, n)) {
    tb = true;
  } else {
    return false;
  }
  int64_t lda = m1s[(ta == tc) ? 1 : 0], ldb = m2s[(tb == tc) ? 1 : 0], ldc = tc ? sc0 : sc1;
  // cpublas::gemm's normalize_last_dims
  if (n == 1) ldc = m;
  if (ta) {
    if (m == 1) lda = k;
  } else if (k == 1) {
    lda = m;
  }
  if (tb) {
    if (k == 1) ldb = n;
  } else if (n == 1) {
    ldb = k;
  }
  for (int64_t v : {m, n, k, lda, ldb, ldc}) {
    if (v > INT_MAX) return false;
  }
  // cpublas's use_blas_gemm
  if (!(lda >= std::max<int64_t>(1, ta ? k : m) && ldb >= std::max<int64_t>(1, tb ? n : k) &&
        ldc >= std::max<int64_t>(1, m))) {
    return false;
  }
  g.ta = ta ? 't' : 'n';
  g.tb = tb ? 't' : 'n';
  g.m = static_cast<int>(m);
  g.n = static_cast<int>(n);
  g.k = static_cast<int>(k);
  g.lda = static_cast<int>(lda);
  g.ldb = static_cast<int>(ldb);
  g.ldc = static_cast<int>(ldc);
  g.swap = tc;
  return true;
}

inline void run_gemm(const GemmCall& g, const float* a, const float* b, float* c) {
  const float one = 1.0f, zero = 0.0f;
  const float* x = g.swap ? b : a;
  const float* y = g.swap ? a : b;
  sgemm_symbol()(&g.ta, &g.tb, &g.m, &g.n, &g.k, &one, x, &g.lda, y, &g.ldb, &zero, c, &g.ldc);
}

inline int64_t align_of(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 64); }

// Whether the direct call agrees with at::cpu::mm_out for this layout (sizes, strides and
// the operands' alignments), on data of every magnitude with a zero row and column.
inline bool gemm_layout_agrees(const std::array<int64_t, 15>& key) {
  const int64_t M = key[0], N = key[1], K = key[2];
  const int64_t sa0 = key[3], sa1 = key[4], sb0 = key[5], sb1 = key[6], sc0 = key[7], sc1 = key[8];
  const int64_t al[3] = {key[9] / 4, key[10] / 4, key[11] / 4};
  GemmCall g;
  if (!gemm_call(M, N, K, sa0, sa1, sb0, sb1, sc0, sc1, g)) return false;
  auto span = [](int64_t r, int64_t c, int64_t s0, int64_t s1) { return (r - 1) * s0 + (c - 1) * s1 + 1; };
  const int64_t na = span(M, K, sa0, sa1), nb = span(K, N, sb0, sb1), nc = span(M, N, sc0, sc1);
  std::vector<float> va(na + 32), vb(nb + 32), vc(nc + 32), vd(nc + 32);
  auto base = [](std::vector<float>& v, int64_t off) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63)) + off;
  };
  float* a = base(va, al[0]);
  float* b = base(vb, al[1]);
  float* c = base(vc, al[2]);
  float* d = base(vd, al[2]);
  for (uint64_t seed : {21u, 22u}) {
    const std::vector<float> x = check_data(na + nb, seed * 7777 + static_cast<uint64_t>(M * 131 + N * 17 + K));
    std::copy(x.begin(), x.begin() + na, a);
    std::copy(x.begin() + na, x.end(), b);
    for (int64_t j = 0; j < K; ++j) a[j * sa1] = 0.0f;  // a zero row of a
    for (int64_t j = 0; j < K; ++j) b[j * sb0] = 0.0f;  // a zero column of b
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor ct = at::from_blob(c, {M, N}, {sc0, sc1}, opts);
    at::cpu::mm_out(ct, at::from_blob(a, {M, K}, {sa0, sa1}, opts), at::from_blob(b, {K, N}, {sb0, sb1}, opts));
    run_gemm(g, a, b, d);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        if (std::memcmp(c + i * sc0 + j * sc1, d + i * sc0 + j * sc1, sizeof(float)) != 0) return false;
      }
    }
  }
  return true;
}

// out = a b as at::mm_out(out, a, b) (float32 CPU 2-D tensors, out of the product's shape).
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  GemmCall g;
  // (as direct::blas_addmm: not under a float32 matmul precision that lets oneDNN's bf16/tf32
  // GEMM serve ATen's call, and not on conjugate or negative views, which ATen resolves first)
  if (sgemm_symbol() != nullptr && !a.is_conj() && !b.is_conj() && !a.is_neg() && !b.is_neg() &&
      direct::ieee_matmul() &&
      gemm_call(M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), g)) {
    const float* ap = a.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    float* cp = out.data_ptr<float>();
    const std::array<int64_t, 15> key{M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                                      out.stride(1), align_of(ap), align_of(bp), align_of(cp),
                                      static_cast<int64_t>(at::get_num_threads()), 0, 0};
    static std::mutex mu;
    static std::map<std::array<int64_t, 15>, bool> known;
    bool ok;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = known.find(key);
      ok = it != known.end() && it->second;
      if (it == known.end()) ok = known[key] = gemm_layout_agrees(key);
    }
    if (ok) {
      run_gemm(g, ap, bp, cp);
      return;
    }
  }
  at::cpu::mm_out(out, a, b);
}

constexpr int64_t kSerialElems = 32768;  // at::internal::GRAIN_SIZE

// Whether ATen reduces a tensor of numel elements serially (the order reproduced here).
inline bool serial(int64_t numel) { return numel < kSerialElems || at::get_num_threads() == 1; }

inline bool same_bits(const at::Tensor& ref, const float* mine, int64_t n) {
  const at::Tensor r = ref.contiguous();
  return r.numel() == n && std::memcmp(r.data_ptr<float>(), mine, n * sizeof(float)) == 0;
}

// The one-time comparison with ATen's calls: every row length 1..40 (all vector tails and
// partial-sum interleavings), lengths past the first cascade levels (16 and 256 vectors),
// and short and tall matrices along both dimensions, on data whose roundings differ.
inline bool self_check() {
  if (at::get_cpu_capability() != "AVX2" || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    return false;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  std::vector<int64_t> sizes;
  for (int64_t s = 2; s <= 40; ++s) sizes.push_back(s);
  for (int64_t s : {63, 64, 65, 100, 127, 128, 129, 172, 257, 300, 513, 1030, 2100}) sizes.push_back(s);
  std::vector<float> mine(4096);
  for (int64_t rows : {2, 3, 5, 7, 8, 9, 16, 33, 64, 130, 172, 520}) {
    for (int64_t cols : sizes) {
      if (rows * cols >= kSerialElems) continue;
      std::vector<float> data = check_data(rows * cols, static_cast<uint64_t>(rows * 7919 + cols));
      const at::Tensor x = at::from_blob(data.data(), {rows, cols}, opts);
      sum_lastdim(data.data(), rows, cols, mine.data());
      if (!same_bits(at::sum(x, {-1}), mine.data(), rows)) return false;
      sum_dim0(data.data(), rows, cols, mine.data());
      if (!same_bits(at::sum(x, {0}), mine.data(), cols)) return false;
      std::vector<float> other = check_data(rows * cols, static_cast<uint64_t>(rows * 31 + cols * 7));
      const at::Tensor y = at::from_blob(other.data(), {rows, cols}, opts);
      row_dots(data.data(), other.data(), rows, cols, mine.data());
      if (!same_bits(at::sum(at::mul(x, y), {-1}), mine.data(), rows)) return false;
      sum_lastdim(data.data(), 1, rows * cols, mine.data());
      if (!same_bits(at::sum(x.view({-1}), {0}), mine.data(), 1)) return false;
      mine[0] = norm_all(data.data(), rows * cols);
      if (!same_bits(at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat), mine.data(), 1)) return false;
    }
  }
  for (int64_t n : sizes) {  // vectors (1-D sums and norms)
    std::vector<float> data = check_data(n, static_cast<uint64_t>(n) + 17);
    const at::Tensor x = at::from_blob(data.data(), {n}, opts);
    sum_lastdim(data.data(), 1, n, mine.data());
    if (!same_bits(at::sum(x, {0}), mine.data(), 1)) return false;
    mine[0] = norm_all(data.data(), n);
    if (!same_bits(at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat), mine.data(), 1)) return false;
  }
  return true;
}

// Whether the reproduced reductions are in use in this process (decided once, at first use).
inline bool ready() {
  static const bool ok = self_check();
  return ok;
}

}  // namespace aten_order
}  // namespace lowrank_kernels
