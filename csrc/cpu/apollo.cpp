// C++ CPU kernel of the apollo family (lowrank_kernels/ops/apollo.py has the schema and the
// validation, lowrank_kernels/reference/apollo.py the specification): APOLLO's non-refresh
// step over a list of float32 weights in one call.
//
// Bit-identical to the per-parameter step of APOLLOAdamW (and to the reference on CPU): the
// operations whose rounding depends on an algorithm (the seeded normal draw, the projection
// GEMM, the norms' reductions) are the very ATen calls the Python step makes, the Adam update
// is the adam family's C++ kernel (adam_update_cpu), and the scalar and elementwise tail
// (scaling factors, limiter, decay) is plain float32 arithmetic in the reference's order, one
// IEEE operation per ATen operation (no two fused: this file is compiled for the baseline ISA,
// setup.py passes no -march, which has no FMA instruction to contract them into). The last
// operation, W.addcmul_(G, coef), rounds once in ATen (a fused multiply-add, measured on
// torch 2.13's CPU kernel): here std::fma.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

Tensor vnorm(const Tensor& x, std::optional<int64_t> dim) {
  if (dim.has_value()) return at::linalg_vector_norm(x, 2, at::IntArrayRef{*dim}, false, at::kFloat);
  return at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat);
}

// W <- W * decay (when decay != 1), then W <- fma(G, c, W) (c per row, per column or one value).
// Rows [r0, r1). Compiled twice: for CPUs with the FMA instruction (apply_rows_fma, vectorized
// fused multiply-adds) and for the baseline ISA, where std::fma is the C library's (exact,
// slower) fused multiply-add; both round each W + G * c once, as ATen's addcmul_.
#define APOLLO_APPLY_ROWS_BODY                                                    \
  for (int64_t i = r0; i < r1; ++i) {                                            \
    float* wr = w + i * n;                                                       \
    const float* gr = g + i * n;                                                 \
    if (decayed) {                                                               \
      for (int64_t j = 0; j < n; ++j) wr[j] = wr[j] * decay;                     \
    }                                                                            \
    if (which == 0) {                                                            \
      const float ci = c[i];                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], ci, wr[j]);  \
    } else if (which == 1) {                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], c[j], wr[j]); \
    } else {                                                                     \
      const float c0 = c[0];                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], c0, wr[j]);  \
    }                                                                            \
  }

__attribute__((target("avx2,fma"))) void apply_rows_fma(float* w, const float* g, int64_t n, const float* c,
                                                        int which, float decay, bool decayed, int64_t r0, int64_t r1) {
  APOLLO_APPLY_ROWS_BODY
}

void apply_rows_portable(float* w, const float* g, int64_t n, const float* c, int which, float decay, bool decayed,
                         int64_t r0, int64_t r1) {
  APOLLO_APPLY_ROWS_BODY
}

void apply(float* w, const float* g, int64_t m, int64_t n, const float* c, int which, float decay, bool decayed) {
  static const bool has_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    if (has_fma) {
      apply_rows_fma(w, g, n, c, which, decay, decayed, r0, r1);
    } else {
      apply_rows_portable(w, g, n, c, which, decay, decayed, r0, r1);
    }
  });
}

}  // namespace

void apollo_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList seeds,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                               c10::string_view side, int64_t rank, bool channel, double beta1, double beta2,
                               double eps, at::ArrayRef<double> front, at::ArrayRef<double> alpha,
                               at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                               int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && seeds.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              front.size() == k && alpha.size() == k && decay.size() == k);
  TORCH_CHECK(prev_norm.empty() || prev_norm.size() == k);
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(v_absmax.empty() || v_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(rank >= 1);
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    const Tensor& g = grads[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.sizes() == p.sizes() && g.is_contiguous());
    TORCH_CHECK(rank <= (right ? p.size(1) : p.size(0)));
    TORCH_CHECK(seeds[i].device().is_cpu() && seeds[i].scalar_type() == at::kLong && seeds[i].numel() == 1);
    if (!prev_norm.empty()) {
      TORCH_CHECK(prev_norm[i].device().is_cpu() && prev_norm[i].scalar_type() == at::kFloat &&
                  prev_norm[i].numel() == 1);
    }
  }
  const float inv_root = static_cast<float>(std::sqrt(static_cast<double>(rank)));
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& g = grads[i];
    const int64_t m = p.size(0), n = p.size(1);
    // P = randn(shape) / sqrt(r): torch.randn from a CPU generator seeded with the seed.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(*seeds[i].data_ptr<int64_t>()));
    Tensor proj = at::randn(right ? at::IntArrayRef{rank, n} : at::IntArrayRef{m, rank}, gen,
                            at::TensorOptions().dtype(at::kFloat));
    {
      float* pp = proj.data_ptr<float>();
      const int64_t cnt = proj.numel();
      for (int64_t j = 0; j < cnt; ++j) pp[j] = pp[j] / inv_root;
    }
    // R = G P^T or P^T G, in the moments' update dtype.
    Tensor r = right ? at::mm(g, proj.t()) : at::mm(proj.t(), g);
    const Tensor& ea = exp_avg[i];
    Tensor m1 = exp_avg[i], v1 = exp_avg_sq[i];
    const auto upd = ea.scalar_type() == at::kByte ? at::kFloat : ea.scalar_type();
    if (upd != at::kFloat) r = r.to(upd);
    Tensor nlr = adam_update_cpu(r, m1, v1, beta1, beta2, eps, opt(m_absmax, i), opt(v_absmax, i), block_size,
                                 moment_seed.empty() ? -1 : moment_seed[i]);
    // Scaling factors s (float32): per channel of the full dimension, or one value.
    std::vector<float> s;
    float scaled_norm;
    if (channel) {
      const int64_t dim = right ? 1 : 0;
      Tensor nn = vnorm(nlr, dim), rn = vnorm(r, dim), gn = vnorm(g, dim);
      const int64_t len = nn.numel();
      const float* a = nn.data_ptr<float>();
      const float* b = rn.data_ptr<float>();
      const float* c = gn.data_ptr<float>();
      s.resize(len);
      Tensor sg = at::empty({len}, at::TensorOptions().dtype(at::kFloat));
      float* sgp = sg.data_ptr<float>();
      for (int64_t j = 0; j < len; ++j) {
        s[j] = a[j] / (b[j] + 1e-8f);
        sgp[j] = s[j] * c[j];
      }
      scaled_norm = vnorm(sg, std::nullopt).item<float>();
    } else {
      const float a = vnorm(nlr, std::nullopt).item<float>();
      const float b = vnorm(r, std::nullopt).item<float>();
      const float c = vnorm(g, std::nullopt).item<float>();
      s.assign(1, a / (b + 1e-8f));
      scaled_norm = s[0] * c;
    }
    if (front[i] != 1.0) {
      const float f = static_cast<float>(front[i]);
      for (auto& x : s) x = x * f;
      scaled_norm = scaled_norm * f;
    }
    if (!prev_norm.empty()) {
      float* prev = prev_norm[i].data_ptr<float>();
      float q = scaled_norm / (*prev + 1e-8f);
      if (!std::isnan(q) && q < 1.01f) q = 1.01f;
      const float lim = q / 1.01f;
      for (auto& x : s) x = x / lim;
      scaled_norm = scaled_norm / lim;
      *prev = scaled_norm;
    }
    const float a = static_cast<float>(alpha[i]);
    for (auto& x : s) x = x * a;
    const float d = static_cast<float>(decay[i]);
    apply(p.data_ptr<float>(), g.data_ptr<float>(), m, n, s.data(), channel ? (right ? 0 : 1) : 2, d, decay[i] != 1.0);
  }
}

}  // namespace lowrank_kernels
