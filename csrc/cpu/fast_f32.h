// Raw-pointer float32 building blocks of the projection step's fast path
// (csrc/cpu/projection/fast_path.cpp): no ATen op, no dispatcher call, no BLAS call
// (on small skinny products a BLAS call costs more than the arithmetic: on the AMD EPYC
// CPU of the measurements, torch.mm (MKL sgemm) took 4.7-8.9 us per 64..172 x 64 x 8
// product timed from Python, where the fast path's whole fused step takes 5-10 us; where
// torch's own sgemm call is wanted, direct.h's blas_addmm makes it without the dispatcher).
//
//   MatF         a strided 2-D float32 view (pointer, sizes, strides in elements);
//   gemm_rows()  C = beta C + alpha A B with C's and B's rows contiguous, A any strides:
//                register tiles of up to 8 rows x 16 columns (AVX2 + FMA), B's block of
//                columns reused from L1 across all rows; each output element is one FMA
//                chain over the inner dimension in order, then fma(acc, alpha, C * beta)
//                (the reference's mul_(decay).add_(back, alpha=alpha) given back = acc);
//   adam_run()   the Adam epilogue on contiguous runs of the moments, with the
//                reference's operations in its order (reference/projection.py):
//                m = fma(R, 1-b1, m*b1)   (add_ with alpha),
//                v = v*b2 + ((1-b2)*R)*R                        (addcmul_),
//                N = m / (sqrt(v) + eps) (correctly rounded sqrt), written over R.
//                Not ATen's CPU rounding in every element: torch 2.13's addcmul_ fuses
//                its multiply-add and its float32 sqrt is MKL's vector square root; the
//                paths that must match ATen bit for bit (projection/int4_path.cpp,
//                aten_order.h) reproduce those instead.
// The AVX2 kernels are chosen at run time where the CPU has AVX2 and FMA; portable loops
// with the same operations (std::fma where the vector code fuses) serve other CPUs and,
// forced, the tests. Partial vectors use masked loads/stores or a padded copy, so every
// element gets the same operations wherever it lies.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LOWRANK_FAST_X86 1
#else
#define LOWRANK_FAST_X86 0
#endif

namespace lowrank_kernels {
namespace fast {

// Element (i, j) at p[i * rs + j * cs].
struct MatF {
  float* p = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  MatF t() const { return MatF{p, cols, rows, cs, rs}; }
};

// Which kernels: the AVX2 ones where the CPU has AVX2 and FMA, else (or when forced, to
// test them) the portable loops.
inline bool have_avx2_fma() {
#if LOWRANK_FAST_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// ------------------------------------------------------------------ the GEMM
// C = beta C + alpha A B for C (M x N) and B (Kk x N) whose rows are contiguous (column
// stride 1, row strides ldc / ldb) and A (M x Kk) with any strides; beta = 0: C is not
// read. Each C element: acc = sum over p in order of A[i, p] B[p, j] (one FMA chain,
// starting from 0), then C = fma(acc, alpha, C * beta) (or acc * alpha): the
// reference's param.mul_(decay).add_(back, alpha=alpha) on back = acc.
// Blocks of MR rows x NV 8-lane vectors of columns in registers, the last block of
// columns masked (every element gets the same operations wherever it lies).
inline void gemm_rows_portable(int64_t M, int64_t N, int64_t Kk, float alpha, const float* A, int64_t as0,
                               int64_t as1, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int64_t p = 0; p < Kk; ++p) acc = std::fma(A[i * as0 + p * as1], B[p * ldb + j], acc);
      float* c = C + i * ldc + j;
      *c = beta == 0.0f ? acc * alpha : std::fma(acc, alpha, *c * beta);
    }
  }
}

#if LOWRANK_FAST_X86
template <int MR, int NV, bool MASK>
__attribute__((target("avx2,fma"))) inline void gemm_tile_avx2(int64_t Kk, float alpha, const float* A, int64_t as0,
                                                                 int64_t as1, const float* B, int64_t ldb, float beta,
                                                                 float* C, int64_t ldc, __m256i mask0, __m256i mask1) {
  __m256 acc[MR][NV];
  for (int ii = 0; ii < MR; ++ii) {
    for (int v = 0; v < NV; ++v) acc[ii][v] = _mm256_setzero_ps();
  }
  const float* bp = B;
  const float* ap = A;
  for (int64_t p = 0; p < Kk; ++p, bp += ldb, ap += as1) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = MASK ? _mm256_maskload_ps(bp + 8 * v, v == 0 ? mask0 : mask1) : _mm256_loadu_ps(bp + 8 * v);
    }
    const float* a = ap;
    for (int ii = 0; ii < MR; ++ii, a += as0) {
      const __m256 s = _mm256_broadcast_ss(a);
      for (int v = 0; v < NV; ++v) acc[ii][v] = _mm256_fmadd_ps(s, bv[v], acc[ii][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  for (int ii = 0; ii < MR; ++ii) {
    for (int v = 0; v < NV; ++v) {
      float* cp = C + ii * ldc + 8 * v;
      const __m256i mk = v == 0 ? mask0 : mask1;
      __m256 res;
      if (beta == 0.0f) {
        res = _mm256_mul_ps(acc[ii][v], va);
      } else {
        const __m256 cv = MASK ? _mm256_maskload_ps(cp, mk) : _mm256_loadu_ps(cp);
        res = _mm256_fmadd_ps(acc[ii][v], va, _mm256_mul_ps(cv, vb));
      }
      if (MASK) {
        _mm256_maskstore_ps(cp, mk, res);
      } else {
        _mm256_storeu_ps(cp, res);
      }
    }
  }
}

// Rows [0, M) of the block of columns at C / B, NV vectors wide.
template <int NV, bool MASK>
__attribute__((target("avx2,fma"))) inline void gemm_cols_avx2(int64_t M, int64_t Kk, float alpha, const float* A,
                                                                 int64_t as0, int64_t as1, const float* B, int64_t ldb,
                                                                 float beta, float* C, int64_t ldc, __m256i m0,
                                                                 __m256i m1) {
  constexpr int kMR = NV == 1 ? 8 : 4;  // 8 accumulators
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) {
    gemm_tile_avx2<kMR, NV, MASK>(Kk, alpha, A + i * as0, as0, as1, B, ldb, beta, C + i * ldc, ldc, m0, m1);
  }
  const float* a = A + i * as0;
  float* c = C + i * ldc;
  switch (M - i) {  // the last rows
    case 0: break;
    case 1: gemm_tile_avx2<1, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    case 2: gemm_tile_avx2<2, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    case 3: gemm_tile_avx2<3, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    case 4: gemm_tile_avx2<4, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    case 5: gemm_tile_avx2<5, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    case 6: gemm_tile_avx2<6, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
    default: gemm_tile_avx2<7, NV, MASK>(Kk, alpha, a, as0, as1, B, ldb, beta, c, ldc, m0, m1); break;
  }
}

__attribute__((target("avx2,fma"))) inline __m256i lane_mask(int64_t n) {  // lanes < n (n may be <= 0 or >= 8)
  const int64_t k = std::max<int64_t>(0, std::min<int64_t>(8, n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) inline void gemm_rows_avx2(int64_t M, int64_t N, int64_t Kk, float alpha,
                                                                 const float* A, int64_t as0, int64_t as1,
                                                                 const float* B, int64_t ldb, float beta, float* C,
                                                                 int64_t ldc) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) {
    gemm_cols_avx2<2, false>(M, Kk, alpha, A, as0, as1, B + j, ldb, beta, C + j, ldc, all, all);
  }
  const int64_t rest = N - j;
  if (rest > 8) {
    gemm_cols_avx2<2, true>(M, Kk, alpha, A, as0, as1, B + j, ldb, beta, C + j, ldc, all, lane_mask(rest - 8));
  } else if (rest == 8) {
    gemm_cols_avx2<1, false>(M, Kk, alpha, A, as0, as1, B + j, ldb, beta, C + j, ldc, all, all);
  } else if (rest > 0) {
    gemm_cols_avx2<1, true>(M, Kk, alpha, A, as0, as1, B + j, ldb, beta, C + j, ldc, lane_mask(rest), all);
  }
}
#endif

// gemm_rows on MatF views: C and B with column stride 1 (or one column).
inline void gemm_rows(const MatF& C, const MatF& A, const MatF& B, float alpha, float beta, bool portable) {
  TORCH_INTERNAL_ASSERT(A.rows == C.rows && B.cols == C.cols && A.cols == B.rows);
  TORCH_INTERNAL_ASSERT((C.cs == 1 || C.cols == 1) && (B.cs == 1 || B.cols == 1));
#if LOWRANK_FAST_X86
  if (!portable && have_avx2_fma()) {
    gemm_rows_avx2(C.rows, C.cols, A.cols, alpha, A.p, A.rs, A.cs, B.p, B.rs, beta, C.p, C.rs);
    return;
  }
#endif
  gemm_rows_portable(C.rows, C.cols, A.cols, alpha, A.p, A.rs, A.cs, B.p, B.rs, beta, C.p, C.rs);
}

// ------------------------------------------------------------------ the Adam epilogue
struct AdamConsts {
  float b1, ob1, b2, ob2, eps;  // beta1, 1 - beta1, beta2, 1 - beta2, eps, each rounded to float32
};

inline AdamConsts adam_consts(double beta1, double beta2, double eps) {
  return AdamConsts{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                    static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
}

// One run of `len` contiguous elements, portable code.
inline void adam_run_scalar(float* m, float* v, float* r, int64_t len, const AdamConsts& c) {
  for (int64_t i = 0; i < len; ++i) {
    const float g = r[i];
    const float mm = std::fma(g, c.ob1, m[i] * c.b1);
    const float vv = v[i] * c.b2 + c.ob2 * g * g;
    m[i] = mm;
    v[i] = vv;
    r[i] = mm / (std::sqrt(vv) + c.eps);
  }
}

#if LOWRANK_FAST_X86
__attribute__((target("avx2,fma"))) inline void adam8_avx2(float* m, float* v, float* r, const AdamConsts& c) {
  const __m256 g = _mm256_loadu_ps(r);
  const __m256 mm = _mm256_fmadd_ps(g, _mm256_set1_ps(c.ob1), _mm256_mul_ps(_mm256_loadu_ps(m), _mm256_set1_ps(c.b1)));
  const __m256 vv = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v), _mm256_set1_ps(c.b2)),
                                  _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(c.ob2), g), g));
  _mm256_storeu_ps(m, mm);
  _mm256_storeu_ps(v, vv);
  _mm256_storeu_ps(r, _mm256_div_ps(mm, _mm256_add_ps(_mm256_sqrt_ps(vv), _mm256_set1_ps(c.eps))));
}

__attribute__((target("avx2,fma"))) inline void adam_run_avx2(float* m, float* v, float* r, int64_t len,
                                                                const AdamConsts& c) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) adam8_avx2(m + i, v + i, r + i, c);
  if (i < len) {  // the tail, through the same vector code on a padded copy
    float bm[8] = {0}, bv[8] = {0}, br[8] = {0};
    const int64_t rest = len - i;
    std::copy(m + i, m + len, bm);
    std::copy(v + i, v + len, bv);
    std::copy(r + i, r + len, br);
    adam8_avx2(bm, bv, br, c);
    std::copy(bm, bm + rest, m + i);
    std::copy(bv, bv + rest, v + i);
    std::copy(br, br + rest, r + i);
  }
}

#endif

// One run of `len` contiguous elements of m, v and R (N written over R).
inline void adam_run(float* m, float* v, float* r, int64_t len, const AdamConsts& c, bool portable) {
#if LOWRANK_FAST_X86
  if (!portable && have_avx2_fma()) {
    adam_run_avx2(m, v, r, len, c);
    return;
  }
#endif
  adam_run_scalar(m, v, r, len, c);
}

}  // namespace fast
}  // namespace lowrank_kernels
