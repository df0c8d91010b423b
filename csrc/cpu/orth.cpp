// C++ CPU kernels of the orth family (lowrank_kernels/ops/orth.py has the schemas and the
// validation, lowrank_kernels/reference/orth.py the specification).
//
// Newton-Schulz on the wide orientation X (s x l, s = min(m, n)): the normalization by the
// Frobenius norm, then per (a, b, c) triple three BLAS GEMMs with the polynomial's scalars
// folded in:  A = X X^T (s x s),  B = b A + c A A (one addmm),  X' = a X + B X (one addmm
// into a second buffer, then the buffers swap). The only temporaries are A, B and the second
// X buffer; the GEMMs are s-sized on one side (r for Trion's low-rank updates).
//
// Small float32 case (s <= kSmallS, the low-rank updates of Trion at ranks up to 32): the same
// iteration on raw pointers, no ATen call per stage (the host cost of ~25 ATen calls per matrix
// dominated there). The dot products accumulate in kLanes independent float32 lanes, summed in a
// fixed order; the axpy updates run in index order. Deterministic, within float32 rounding of the
// BLAS path (not bitwise equal to it); the single and the list op share it, so they stay bitwise
// equal.
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

constexpr int64_t kSmallS = 32;
constexpr int kLanes = 8;

at::ScalarType compute_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int t = 0; t < kLanes; ++t) acc[t] += a[k + t] * b[k + t];
  }
  for (int t = 0; k < n; ++k, ++t) acc[t] += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// X (s x l, contiguous float32, normalized in place here) through the iteration; returns the
// buffer holding the result (X or Y).
float* newton_schulz_small(float* X, float* Y, int64_t s, int64_t l, at::ArrayRef<double> coefficients, double eps) {
  double sq = 0.0;
  for (int64_t k = 0; k < s * l; ++k) sq += static_cast<double>(X[k]) * static_cast<double>(X[k]);
  const float denom = static_cast<float>(std::sqrt(sq) + eps);
  for (int64_t k = 0; k < s * l; ++k) X[k] = X[k] / denom;
  float A[kSmallS * kSmallS], B[kSmallS * kSmallS];
  for (size_t it = 0; it < coefficients.size(); it += 3) {
    const float a = static_cast<float>(coefficients[it]), b = static_cast<float>(coefficients[it + 1]),
                c = static_cast<float>(coefficients[it + 2]);
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t j = 0; j <= i; ++j) A[i * s + j] = A[j * s + i] = dot(X + i * l, X + j * l, l);
    }
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t j = 0; j < s; ++j) {
        float acc = 0.f;
        for (int64_t t = 0; t < s; ++t) acc += A[i * s + t] * A[t * s + j];
        B[i * s + j] = b * A[i * s + j] + c * acc;
      }
    }
    for (int64_t i = 0; i < s; ++i) {
      float* y = Y + i * l;
      const float* x = X + i * l;
      for (int64_t k = 0; k < l; ++k) y[k] = a * x[k];
      for (int64_t j = 0; j < s; ++j) {
        const float bij = B[i * s + j];
        const float* xj = X + j * l;
        for (int64_t k = 0; k < l; ++k) y[k] += bij * xj[k];
      }
    }
    std::swap(X, Y);
  }
  return X;
}

Tensor newton_schulz_one(const Tensor& x, at::ArrayRef<double> coefficients, double eps) {
  TORCH_CHECK(x.dim() == 2);
  TORCH_CHECK(coefficients.size() % 3 == 0);
  const bool tall = x.size(0) > x.size(1);
  // X: the wide orientation, contiguous, in the compute dtype (a fresh buffer: x is never written).
  Tensor X = (tall ? x.t() : x).to(compute_type(x), /*non_blocking=*/false, /*copy=*/true)
                 .contiguous(at::MemoryFormat::Contiguous);
  if (X.numel() == 0) {
    return tall ? X.t().contiguous() : X;
  }
  if (X.scalar_type() == at::kFloat && X.size(0) <= kSmallS) {
    const int64_t s = X.size(0), l = X.size(1);
    Tensor Y = at::empty_like(X);
    float* out = newton_schulz_small(X.data_ptr<float>(), Y.data_ptr<float>(), s, l, coefficients, eps);
    Tensor R = out == X.data_ptr<float>() ? X : Y;
    return tall ? R.t().contiguous() : R;
  }
  // X / (||X||_F + eps), the norm accumulated in double.
  const double norm = X.to(at::kDouble).square().sum().sqrt().item<double>();
  X.div_(norm + eps);
  const int64_t s = X.size(0);
  Tensor A = at::empty({s, s}, X.options());
  Tensor B = at::empty({s, s}, X.options());
  Tensor Y = at::empty_like(X);
  for (size_t i = 0; i < coefficients.size(); i += 3) {
    const double a = coefficients[i], b = coefficients[i + 1], c = coefficients[i + 2];
    at::mm_out(A, X, X.t());
    at::addmm_out(B, A, A, A, /*beta=*/b, /*alpha=*/c);
    at::addmm_out(Y, X, B, X, /*beta=*/a, /*alpha=*/1.0);
    std::swap(X, Y);
  }
  return tall ? X.t().contiguous() : X;
}

}  // namespace

Tensor orth_newton_schulz_cpu(const Tensor& x, at::ArrayRef<double> coefficients, double eps) {
  TORCH_CHECK(x.device().is_cpu());
  return newton_schulz_one(x, coefficients, eps);
}

std::vector<Tensor> orth_foreach_newton_schulz_cpu(at::TensorList xs, at::ArrayRef<double> coefficients, double eps) {
  std::vector<Tensor> out;
  out.reserve(xs.size());
  for (const Tensor& x : xs) {
    TORCH_CHECK(x.device().is_cpu());
    out.push_back(newton_schulz_one(x, coefficients, eps));
  }
  return out;
}

}  // namespace lowrank_kernels
