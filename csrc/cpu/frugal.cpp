// C++ CPU kernel of the frugal family (lowrank_kernels/ops/frugal.py has the schema and the
// validation, lowrank_kernels/reference/frugal.py the specification): FRUGAL's non-refresh
// step over a list of float32 weights in one call.
//
// Bit-identical to FrugalAdamW's per-parameter step (and to the reference on CPU): the
// projection GEMM is the ATen call the Python step makes, the Adam update and the two
// back-projections are this extension's own kernels (adam_update_cpu,
// projection_backproject_apply_cpu) called directly, and the state-free tail is
// W + (-lr s) * sign(residual), exact whether or not it is fused (the product is +-lr s or
// 0), or ATen's add_ for update="sgd".
//
// The GEMMs are the very BLAS calls ATen's mm / addmm_ make (direct::blas_addmm,
// cpu/direct.h), with no dispatcher call in between: the projection as at::mm, and the two
// back-projections as the engine's one-GEMM apply (engine.cpp, run(): W <- decay W, then
// W.addmm_(N, P, 1, alpha) on the oriented views) where that is the apply it makes
// (float32 update, rank <= 128), else projection_backproject_apply_cpu; a GEMM layout
// blas_addmm does not serve takes ATen's CPU kernel (at::cpu::).
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>

#include <cstring>

#include "cpu/direct.h"
#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

// Ranks up to this: the engine's apply is one GEMM (engine.cpp, kBlasSingleKBlock).
constexpr int64_t kOneGemmMaxRank = 128;

// W <- decay W + alpha back(N) for a float32 contiguous W, float32 N and dense float32
// projector: the engine's one-GEMM apply (run()), W.mul_(decay) (when decay is not 1) then
// W.addmm_(N, P, 1, alpha) on the right-oriented views (side="left": W^T, N^T, proj^T), with
// the GEMM by direct::blas_addmm where it serves, else ATen's addmm_ CPU kernel; any other
// case through projection_backproject_apply_cpu.
void backproject_apply(Tensor& w, const Tensor& n, const Tensor& pr, bool right, c10::string_view sd, double alpha,
                       double decay) {
  const int64_t r = right ? pr.size(0) : pr.size(1);
  if (n.scalar_type() == at::kFloat && r <= kOneGemmMaxRank) {
    const Tensor W = right ? w : direct::t(w);
    const Tensor N = right ? n : direct::t(n);
    const Tensor P = right ? pr : direct::t(pr);
    Tensor Wv = W;  // a handle for the in-place ATen kernels
    if (decay != 1.0) at::cpu::mul_(Wv, at::native::wrapped_scalar_tensor(decay));
    if (!direct::blas_addmm(Wv, N, P, 1.0, alpha)) at::cpu::addmm_(Wv, N, P, 1.0, alpha);
    return;
  }
  projection_backproject_apply_cpu(w, n, pr, sd, alpha, decay, std::nullopt, std::nullopt, std::nullopt, 0, 0,
                                   std::nullopt, std::nullopt);
}

}  // namespace

void frugal_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq, c10::string_view side, bool signsgd,
                               double beta1, double beta2, double eps, at::ArrayRef<double> alpha,
                               at::ArrayRef<double> decay, at::ArrayRef<double> free_alpha, at::TensorList m_absmax,
                               at::TensorList v_absmax, int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && projs.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              alpha.size() == k && decay.size() == k && free_alpha.size() == k);
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
    const Tensor& pr = projs[i];
    TORCH_CHECK(pr.device().is_cpu() && pr.scalar_type() == at::kFloat && pr.dim() == 2);
    TORCH_CHECK(right ? pr.size(1) == p.size(1) : pr.size(0) == p.size(0));
  }
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  const c10::string_view sd = right ? "right" : "left";
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& g = grads[i];
    const Tensor& pr = projs[i];
    const int64_t r = right ? pr.size(0) : pr.size(1);
    const int64_t full = right ? p.size(1) : p.size(0);
    // at::mm(g, pr.t()) / at::mm(pr.t(), g) without the dispatcher (cpu/direct.h): the BLAS
    // call itself, else ATen's CPU kernel.
    const Tensor prt = direct::t(pr);
    const Tensor& lhs = right ? g : prt;
    const Tensor& rhs = right ? prt : g;
    Tensor low = direct::empty_f32({lhs.size(0), rhs.size(1)});
    if (!direct::blas_addmm(low, lhs, rhs, 0.0, 1.0)) at::cpu::mm_out(low, lhs, rhs);
    Tensor m1 = exp_avg[i], v1 = exp_avg_sq[i];
    const auto upd = m1.scalar_type() == at::kByte ? at::kFloat : m1.scalar_type();
    Tensor nlr = adam_update_cpu(upd == at::kFloat ? low : low.to(upd), m1, v1, beta1, beta2, eps, opt(m_absmax, i),
                                 opt(v_absmax, i), block_size, moment_seed.empty() ? -1 : moment_seed[i]);
    Tensor residual;
    if (r < full) {
      // A copy of G (as g.clone(): a fresh contiguous float32 tensor), by memcpy.
      residual = direct::empty_f32(p.sizes());
      std::memcpy(residual.data_ptr<float>(), g.const_data_ptr<float>(), sizeof(float) * g.numel());
      backproject_apply(residual, low, pr, right, sd, -1.0, 1.0);
    }
    backproject_apply(p, nlr, pr, right, sd, alpha[i], decay[i]);
    if (!residual.defined()) continue;
    if (!signsgd) {
      at::cpu::add_(p, residual, free_alpha[i]);  // p.add_(residual, free_alpha) without the dispatcher
      continue;
    }
    float* w = p.data_ptr<float>();
    const float* res = residual.data_ptr<float>();
    const float a = static_cast<float>(free_alpha[i]);
    at::parallel_for(0, p.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const float x = res[j];
        const float sg = static_cast<float>((0.0f < x) - (x < 0.0f));
        w[j] = w[j] + a * sg;
      }
    });
  }
}

}  // namespace lowrank_kernels
