// C++ CPU kernels of the orth family (lowrank_kernels/ops/orth.py has the schemas and the
// validation, lowrank_kernels/reference/orth.py the specification).
//
// Newton-Schulz on the wide orientation X (s x l, s = min(m, n)): the normalization by the
// Frobenius norm, then per (a, b, c) triple three BLAS GEMMs with the polynomial's scalars
// folded in:  A = X X^T (s x s),  B = b A + c A A (one addmm),  X' = a X + B X (one addmm
// into a second buffer, then the buffers swap). The only temporaries are A, B and the second
// X buffer; the GEMMs are s-sized on one side (r for Trion's low-rank updates).
#include <ATen/ATen.h>

#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

at::ScalarType compute_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

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
