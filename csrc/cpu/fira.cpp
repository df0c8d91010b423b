// C++ CPU kernel of the fira family (lowrank_kernels/ops/fira.py has the schema and the
// validation, lowrank_kernels/reference/fira.py the specification): Fira's non-refresh step
// over a list of float32 weights in one call.
//
// Bit-identical to FiraAdamW's per-parameter step on CPU (the reference matches to rounding): the
// projection, the Adam update and the two residual passes are this extension's own kernels
// (projection_project_cpu, adam_update_cpu, residual_sumsq_cpu, residual_apply_cpu) called
// directly; the norms over the rank dimension and the residual norm's square root are the
// ATen calls the Python step makes (ATen's float32 sqrt need not round as std::sqrt does);
// the rest of the glue (scaling factors, limiter, the low-rank operands of the residual
// passes) is plain float32 arithmetic in the reference's order, one IEEE operation per ATen
// operation (this file is compiled for the baseline ISA, which has no FMA instruction to
// contract two of them into). A DCT projector's rows are gathered once per weight and handed
// to both residual passes as the dense projector (the same values the passes gather
// themselves from the indices).
#include <ATen/ATen.h>

#include <cmath>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

constexpr float kTiny = 1e-8f;

}  // namespace

void fira_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList indices,
                             at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                             c10::string_view side, double beta1, double beta2, double eps, at::ArrayRef<double> scale,
                             at::ArrayRef<double> mix, at::ArrayRef<double> gamma, at::ArrayRef<double> alpha,
                             at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && projs.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              scale.size() == k && mix.size() == k && alpha.size() == k && decay.size() == k);
  TORCH_CHECK(indices.empty() || indices.size() == k);
  TORCH_CHECK(prev_norm.empty() || prev_norm.size() == k);
  TORCH_CHECK(gamma.size() == prev_norm.size());
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(v_absmax.empty() || v_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].scalar_type() == at::kFloat && grads[i].sizes() == p.sizes() &&
                grads[i].is_contiguous());
    TORCH_CHECK(projs[i].device().is_cpu() && projs[i].scalar_type() == at::kFloat && projs[i].dim() == 2);
    if (!prev_norm.empty()) {
      TORCH_CHECK(prev_norm[i].device().is_cpu() && prev_norm[i].scalar_type() == at::kFloat &&
                  prev_norm[i].numel() == 1);
    }
  }
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  const c10::string_view sd = right ? "right" : "left";
  const int64_t rank_dim = right ? 1 : 0;
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& g = grads[i];
    OptTensor idx = opt(indices, i);
    Tensor low = projection_project_cpu(g, projs[i], sd, idx, std::nullopt, std::nullopt, 0, 0);
    // The dense projector of both residual passes: the DCT rows picked by the indices.
    Tensor pr = projs[i];
    if (idx.has_value()) {
      Tensor rows = pr.index_select(0, idx->to(at::kLong));
      pr = right ? rows : rows.t();
    }
    Tensor m1 = exp_avg[i], v1 = exp_avg_sq[i];
    const auto upd = m1.scalar_type() == at::kByte ? at::kFloat : m1.scalar_type();
    Tensor nlr = adam_update_cpu(upd == at::kFloat ? low : low.to(upd), m1, v1, beta1, beta2, eps, opt(m_absmax, i),
                                 opt(v_absmax, i), block_size, moment_seed.empty() ? -1 : moment_seed[i]);
    Tensor n32 = nlr.to(at::kFloat).contiguous();
    low = low.contiguous();
    // s = ||N||_k / (||R||_k + 1e-8), one factor per index k of the kept dimension.
    Tensor nn = at::linalg_vector_norm(n32, 2, at::IntArrayRef{rank_dim}, false, std::nullopt).contiguous();
    Tensor rn = at::linalg_vector_norm(low, 2, at::IntArrayRef{rank_dim}, false, std::nullopt).contiguous();
    const int64_t len = nn.numel();
    Tensor s = at::empty({len}, nn.options());
    float* sp = s.data_ptr<float>();
    {
      const float* a = nn.const_data_ptr<float>();
      const float* b = rn.const_data_ptr<float>();
      for (int64_t j = 0; j < len; ++j) sp[j] = a[j] / (b[j] + kTiny);
    }
    const int64_t lm = low.size(0), ln = low.size(1);
    const float* lp = low.const_data_ptr<float>();
    // low * s (s per row of low on the right side, per column on the left) * c, into out.
    auto scaled_low = [&](float* out, float c) {
      for (int64_t a = 0; a < lm; ++a) {
        for (int64_t b = 0; b < ln; ++b) {
          const float f = right ? sp[a] : sp[b];
          out[a * ln + b] = (lp[a * ln + b] * f) * c;
        }
      }
    };
    if (!prev_norm.empty()) {
      Tensor lowb = at::empty({lm, ln}, low.options());
      scaled_low(lowb.data_ptr<float>(), -static_cast<float>(mix[i]));
      // ATen's sqrt, as the Python step's Tensor.sqrt().
      const float q = at::sqrt(residual_sumsq_cpu(g, lowb, pr, s, sd, std::nullopt)).item<float>();
      float* prev = prev_norm[i].data_ptr<float>();
      const float gm = static_cast<float>(gamma[i]);
      float ratio = q / (*prev + kTiny);
      if (!std::isnan(ratio) && ratio < gm) ratio = gm;
      const float lim = ratio / gm;
      for (int64_t j = 0; j < len; ++j) sp[j] = sp[j] / lim;
      *prev = q / lim;
    }
    // update = scale N - (R s) mix
    Tensor update = at::empty({lm, ln}, low.options());
    {
      float* up = update.data_ptr<float>();
      scaled_low(up, static_cast<float>(mix[i]));
      const float* np = n32.const_data_ptr<float>();
      const float sc = static_cast<float>(scale[i]);
      for (int64_t j = 0; j < lm * ln; ++j) up[j] = np[j] * sc - up[j];
    }
    residual_apply_cpu(p, g, update, pr, s, sd, alpha[i], decay[i], std::nullopt);
  }
}

}  // namespace lowrank_kernels
