// direct::blas_addmm (cpu/direct.h): ATen's float32 CPU GEMM call without ATen around it.
//
// at::addmm_ / at::mm_out on float32 CPU tensors end in addmm_impl_cpu_
// (aten/src/ATen/native/LinearAlgebra.cpp), which picks from the strides of C, A and B:
//   - C's layout: column-major C is BLAS's C as is; row-major C is computed as
//     C^T = B^T A^T (operands swapped, transpose_c); any other C is copied (not served here);
//   - each operand's transpose flag (its unit-stride dimension) and leading dimension, or a
//     contiguous copy when neither dimension fits (not served here);
// then at::native::cpublas::gemm, which normalizes the leading dimensions of size-1
// dimensions (normalize_last_dims), takes oneDNN's reduced-precision GEMM when float32
// matmul precision allows bf16/tf32 (not served here), and calls the BLAS sgemm_ when the
// sizes fit its int arguments (use_blas_gemm; else ATen's own loop: not served here).
// blas_addmm makes that same sgemm_ call on the same pointers, so the same results bit for
// bit. As that reasoning rests on one torch build's source, each call layout (operand
// order, transposes, sizes, leading dimensions, whether beta is 0 and alpha 1) is checked
// once per process against ATen's own call on deterministic data in that layout before it
// is used; a mismatch sends that layout to ATen for good.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu/direct.h"

#if AT_BUILD_WITH_BLAS()
extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a, int* lda,
                       const float* b, int* ldb, float* beta, float* c, int* ldc);
#endif

namespace lowrank_kernels {
namespace direct {
namespace {

// One BLAS call as addmm_impl_cpu_ and cpublas::gemm would make it.
struct Call {
  bool ta = false, tb = false;  // transpose flags of BLAS's a and b
  bool swap = false;            // row-major C: a is B, b is A (C^T = B^T A^T)
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
};

// addmm_impl_cpu_'s choices for C (M x N) = A (M x K) B (K x N); false where ATen would copy an
// operand or not call BLAS.
bool plan(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, Call& c) {
  const int64_t M = C.size(0), N = C.size(1), K = A.size(1);
  if (M == 0 || N == 0 || K == 0) return false;
  const int64_t cs0 = C.stride(0), cs1 = C.stride(1);
  const at::Tensor* m1 = &A;
  const at::Tensor* m2 = &B;
  if (cs0 == 1 && (N == 1 || cs1 >= std::max<int64_t>(1, M))) {
    c.swap = false;
  } else if (cs1 == 1 && (M == 1 || cs0 >= std::max<int64_t>(1, N))) {
    c.swap = true;
    std::swap(m1, m2);
  } else {
    return false;  // ATen makes a Fortran-contiguous copy of C
  }
  const bool tc = c.swap;
  const int64_t m = tc ? N : M, n = tc ? M : N, k = K;
  const int i0 = tc ? 1 : 0, i1 = tc ? 0 : 1;
  if (m1->stride(i0) == 1 && m1->stride(i1) >= std::max<int64_t>(1, m)) {
    c.ta = false;
  } else if (m1->stride(i1) == 1 && m1->stride(i0) >= std::max<int64_t>(1, k)) {
    c.ta = true;
  } else {
    return false;  // ATen clones m1
  }
  if (m2->stride(i0) == 1 && m2->stride(i1) >= std::max<int64_t>(1, k)) {
    c.tb = false;
  } else if (m2->stride(i1) == 1 && m2->stride(i0) >= std::max<int64_t>(1, n)) {
    c.tb = true;
  } else {
    return false;  // ATen clones m2
  }
  int64_t lda = m1->stride((c.ta == tc) ? 1 : 0);
  int64_t ldb = m2->stride((c.tb == tc) ? 1 : 0);
  int64_t ldc = C.stride(tc ? 0 : 1);
  // cpublas::gemm: normalize_last_dims, then use_blas_gemm.
  if (n == 1) ldc = m;
  if (c.ta) {
    if (m == 1) lda = k;
  } else if (k == 1) {
    lda = m;
  }
  if (c.tb) {
    if (k == 1) ldb = n;
  } else if (n == 1) {
    ldb = k;
  }
  const bool fits = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                    ldc <= INT_MAX && lda >= std::max<int64_t>(1, c.ta ? k : m) &&
                    ldb >= std::max<int64_t>(1, c.tb ? n : k) && ldc >= std::max<int64_t>(1, m);
  if (!fits) return false;
  c.m = m;
  c.n = n;
  c.k = k;
  c.lda = lda;
  c.ldb = ldb;
  c.ldc = ldc;
  return true;
}

void call_blas(const Call& c, const float* A, const float* B, float* C, float beta, float alpha) {
#if AT_BUILD_WITH_BLAS()
  char ta = c.ta ? 't' : 'n', tb = c.tb ? 't' : 'n';
  int m = static_cast<int>(c.m), n = static_cast<int>(c.n), k = static_cast<int>(c.k);
  int lda = static_cast<int>(c.lda), ldb = static_cast<int>(c.ldb), ldc = static_cast<int>(c.ldc);
  const float* a = c.swap ? B : A;
  const float* b = c.swap ? A : B;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, C, &ldc);
#else
  TORCH_INTERNAL_ASSERT(false);
#endif
}

// Deterministic data of the one-time check: a 64-bit LCG's high bits as floats in (-4, 4).
void fill(const at::Tensor& t, uint64_t seed) {
  float* p = t.data_ptr<float>();
  const int64_t n = t.storage().nbytes() / sizeof(float) - t.storage_offset();
  uint64_t st = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < n; ++i) {
    st = st * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = static_cast<float>(static_cast<int64_t>(st >> 40) - (int64_t{1} << 23)) / static_cast<float>(1 << 21);
  }
}

at::Tensor like(const at::Tensor& t) {
  return at::empty_strided(t.sizes(), t.strides(), at::TensorOptions().dtype(at::kFloat));
}

// Whether blas_addmm's call equals ATen's on data laid out as C, A, B (the one-time check).
bool matches_aten(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, const Call& c, double beta,
                  double alpha) {
  at::Tensor c_aten = like(C), c_mine = like(C), a = like(A), b = like(B);
  fill(a, 1);
  fill(b, 2);
  fill(c_aten, 3);
  fill(c_mine, 3);
  if (beta == 0.0 && alpha == 1.0) {
    at::mm_out(c_aten, a, b);
  } else {
    c_aten.addmm_(a, b, beta, alpha);
  }
  call_blas(c, a.const_data_ptr<float>(), b.const_data_ptr<float>(), c_mine.data_ptr<float>(),
            static_cast<float>(beta), static_cast<float>(alpha));
  const int64_t bytes = c_aten.storage().nbytes();
  return std::memcmp(c_aten.storage().data(), c_mine.storage().data(), bytes) == 0;
}

using Key = std::array<int64_t, 11>;
std::mutex g_mutex;
std::map<Key, bool> g_checked;

}  // namespace

bool ieee_matmul() {
  auto& ctx = at::globalContext();
  if (ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) return false;
  for (auto op : {at::Float32Op::MATMUL, at::Float32Op::ALL}) {
    const auto p = ctx.float32Precision(at::Float32Backend::MKLDNN, op);
    if (p != at::Float32Precision::NONE && p != at::Float32Precision::IEEE && p != at::Float32Precision::DEFAULT) {
      return false;
    }
  }
  return true;
}

bool blas_addmm(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double beta, double alpha) {
#if !AT_BUILD_WITH_BLAS()
  return false;
#else
  for (const at::Tensor* t : {&C, &A, &B}) {
    if (!t->defined() || !t->device().is_cpu() || t->scalar_type() != at::kFloat || t->dim() != 2 ||
        t->layout() != at::kStrided || t->is_conj() || t->is_neg()) {
      return false;
    }
  }
  if (A.size(0) != C.size(0) || B.size(1) != C.size(1) || A.size(1) != B.size(0)) return false;
  Call c;
  if (!plan(C, A, B, c) || !ieee_matmul()) return false;
  const bool plain = beta == 0.0 && alpha == 1.0;
  const Key key{c.swap, c.ta, c.tb, c.m, c.n, c.k, c.lda, c.ldb, c.ldc, plain, beta == 1.0};
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_checked.find(key);
    if (it == g_checked.end()) it = g_checked.emplace(key, matches_aten(C, A, B, c, beta, alpha)).first;
    if (!it->second) return false;
  }
  call_blas(c, A.const_data_ptr<float>(), B.const_data_ptr<float>(), C.data_ptr<float>(), static_cast<float>(beta),
            static_cast<float>(alpha));
  return true;
#endif
}

}  // namespace direct
}  // namespace lowrank_kernels
