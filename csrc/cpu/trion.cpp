// C++ CPU kernel of the trion family (lowrank_kernels/ops/trion.py has the schema and the
// validation, lowrank_kernels/reference/trion.py the specification): Trion's step over a list
// of weights of one shape in one call.
//
// Bit-identical to Trion's per-parameter step (foreach=False) on CPU: every stage is the very
// kernel the per-parameter step's op calls reach, called directly (M.add_(G) as ATen's add_,
// dct_foreach_score_topk_cpu, whose rows are bitwise dct_score_topk_cpu's,
// projection_project_cpu and projection_backproject_apply_cpu with the DCT projector's
// indices, orth_foreach_newton_schulz_cpu, whose entries are bitwise orth_newton_schulz_cpu's),
// with the same scalar arguments (-(1 - mu) computed in double as the Python step does). The
// entries are independent, so adding and scoring every momentum first changes no result.
#include <ATen/ATen.h>

#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {

void trion_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                              const Tensor& basis, c10::string_view side, int64_t rank, int64_t norm,
                              at::ArrayRef<double> coefficients, double eps, at::ArrayRef<double> mu,
                              at::ArrayRef<double> alpha, at::ArrayRef<double> decay) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && momentum.size() == k && mu.size() == k && alpha.size() == k && decay.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(norm == 1 || norm == 2);
  TORCH_CHECK(basis.device().is_cpu() && basis.dim() == 2 && basis.size(0) == basis.size(1));
  const int64_t s = basis.size(0);
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.dim() == 2);
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].sizes() == p.sizes());
    TORCH_CHECK(momentum[i].device().is_cpu() && momentum[i].sizes() == p.sizes());
    TORCH_CHECK((right ? p.size(1) : p.size(0)) == s);
    TORCH_CHECK(rank >= 1 && rank <= std::min(p.size(0), p.size(1)));
  }
  if (k == 0) return;
  const c10::string_view sd = right ? "right" : "left";
  for (size_t i = 0; i < k; ++i) {
    Tensor M = momentum[i];
    M.add_(grads[i]);
  }
  const Tensor idx = dct_foreach_score_topk_cpu(momentum, basis, rank, sd, norm);
  std::vector<Tensor> rows, lows;
  rows.reserve(k);
  lows.reserve(k);
  for (size_t i = 0; i < k; ++i) {
    Tensor M = momentum[i];
    rows.push_back(idx.select(0, static_cast<int64_t>(i)));
    Tensor low = projection_project_cpu(M, basis, sd, rows[i], std::nullopt, std::nullopt, 0, 0);
    projection_backproject_apply_cpu(M, low, basis, sd, -(1.0 - mu[i]), 1.0, rows[i], std::nullopt, std::nullopt, 0,
                                     0, std::nullopt, std::nullopt);
    lows.push_back(std::move(low));
  }
  const std::vector<Tensor> orths = orth_foreach_newton_schulz_cpu(lows, coefficients, eps);
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    projection_backproject_apply_cpu(p, orths[i], basis, sd, alpha[i], decay[i], rows[i], std::nullopt, std::nullopt, 0,
                                     0, std::nullopt, std::nullopt);
  }
}

}  // namespace lowrank_kernels
