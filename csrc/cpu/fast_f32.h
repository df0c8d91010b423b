// Raw-pointer float32 building blocks of the projection step's fast path
// (csrc/cpu/projection.cpp, "The float32 fast path"): no ATen op, no dispatcher call.
//
//   MatF        a strided 2-D float32 view (pointer, sizes, strides in elements);
//   gemm()      C = alpha A B + beta C on MatF views, each row- or column-major (one unit
//               stride): the BLAS sgemm_ that torch itself calls for at::mm on CPU (MKL or
//               OpenBLAS inside libtorch_cpu, found through a weak symbol: no new link
//               dependency; where the loaded torch exports none, blas_available() is false
//               and the fast path stays off). (at::native::cpublas::gemm is not exported,
//               and its dispatch stub's ABI depends on torch's own build macros.)
//   adam_runs() the Adam epilogue on contiguous runs of the moments, with the
//               reference's operations in its order (reference/projection.py, as ATen
//               evaluates them on CPU): m = fma(R, 1-b1, m*b1)   (add_ with alpha),
//               v = v*b2 + ((1-b2)*R)*R                        (addcmul_),
//               N = m / (sqrt(v) + eps), written over R. AVX2 (8 lanes, FMA for the m
//               update only) where the CPU has it, chosen at run time; the tail of a
//               run goes through the same vector code on a padded copy, so every element
//               gets the same operations wherever it lies.
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

// The Fortran BLAS GEMM with 32-bit integers, as torch's CPUBlas.cpp declares it. Weak:
// null where the loaded torch does not export it (the fast path then uses torch's kernel).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace lowrank_kernels {
namespace fast {

// Element (i, j) at p[i * rs + j * cs].
struct MatF {
  float* p = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  MatF t() const { return MatF{p, cols, rows, cs, rs}; }
};

// As a column-major BLAS operand (element (i, j) at p[i + j * ld]): ld, or -1 when the
// view is not one. Size-1 dimensions take any stride.
inline int64_t colmajor_ld(const MatF& a) {
  if (a.rows > 1 && a.rs != 1) return -1;
  const int64_t ld = a.cols > 1 ? a.cs : std::max<int64_t>(1, a.rows);
  return ld >= std::max<int64_t>(1, a.rows) ? ld : -1;
}

// Whether a GEMM operand is usable as it stands (column-major, or row-major = the
// transpose of a column-major one), with every size and ld within BLAS's 32-bit ints.
inline bool blas_operand(const MatF& a) {
  if (a.rows > INT_MAX || a.cols > INT_MAX) return false;
  const int64_t ld = colmajor_ld(a) >= 0 ? colmajor_ld(a) : colmajor_ld(a.t());
  return ld >= 0 && ld <= INT_MAX;
}

// Whether the loaded torch exports the BLAS sgemm_ (the fast path is off otherwise).
inline bool blas_available() { return &sgemm_ != nullptr; }

// C (M x N) = alpha * op(A) * op(B) + beta * C, column-major as BLAS; ta / tb: the
// operand is stored as its transpose (column-major with leading dimension lda / ldb).
inline void sgemm_colmajor(bool ta, bool tb, int64_t M, int64_t N, int64_t Kd, float alpha, const float* a,
                           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(blas_available());
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(Kd);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&ca, &cb, &m, &n, &k, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// C = alpha A B + beta C for views that pass blas_operand (beta = 0: C is not read).
inline void gemm(const MatF& C, const MatF& A, const MatF& B, float alpha, float beta) {
  TORCH_INTERNAL_ASSERT(A.rows == C.rows && B.cols == C.cols && A.cols == B.rows);
  if (colmajor_ld(C) < 0) {  // row-major C: compute C^T = B^T A^T, column-major
    gemm(C.t(), B.t(), A.t(), alpha, beta);
    return;
  }
  const int64_t lda = colmajor_ld(A), ldb = colmajor_ld(B);
  const bool ta = lda < 0, tb = ldb < 0;  // stored row-major: the transpose of a column-major matrix
  sgemm_colmajor(ta, tb, C.rows, C.cols, A.cols, alpha, A.p, ta ? colmajor_ld(A.t()) : lda, B.p,
                 tb ? colmajor_ld(B.t()) : ldb, beta, C.p, colmajor_ld(C));
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

inline bool have_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// One run of `len` contiguous elements of m, v and R (N written over R).
inline void adam_run(float* m, float* v, float* r, int64_t len, const AdamConsts& c) {
#if LOWRANK_FAST_X86
  if (have_avx2_fma()) {
    adam_run_avx2(m, v, r, len, c);
    return;
  }
#endif
  adam_run_scalar(m, v, r, len, c);
}

}  // namespace fast
}  // namespace lowrank_kernels
