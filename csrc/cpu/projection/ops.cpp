// The C++ CPU kernels of the projection family: the op entry points (the specification is
// lowrank_kernels/reference/projection.py; the ops are defined in
// lowrank_kernels/ops/projection.py, whose router calls these through their private
// dispatcher ops, registered in csrc/registration.cpp):
//
//   projection_project_cpu                      R = G P^T | P^T G (no epilogue)
//   projection_project_adam_cpu                 R, Adam moments in place, returns N
//   projection_backproject_apply_cpu            W <- decay W + alpha back(N) in place (optionally with
//                                               per-row factors: diag(row_decay), diag(row_alpha))
//   projection_project_update_backproject_cpu   both, one GaLore-Adam step
//   projection_foreach_project_update_backproject_cpu   the step over a list of parameters
//
// Each takes the projector as (proj, indices?, q_scale?, q_min?, rank, group_size): a
// dense P, DCT basis rows picked by index, or a packed INT4 P (projector.h). One engine
// (engine.cpp, run()) serves all three kinds and all four ops; the fused step's small
// float32 dense/DCT case skips it for a path with no ATen op at all (fast_path.cpp), and its
// float32 INT4 case for the engine's own arithmetic without the dispatcher (int4_path.cpp).
//
// Validation with messages is the op layer's (lowrank_kernels/ops/projection.py), which
// runs before every call through the router; the bare checks here guard what the kernels
// rely on when the C++ ops are called directly.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/moments8.h"
#include "cpu/projection/engine.h"
#include "cpu/projection/fast_path.h"
#include "cpu/projection/int4_path.h"
#include "cpu/projection/projector.h"

namespace lowrank_kernels {
namespace projection {
namespace {

bool is_left(c10::string_view side) {
  TORCH_CHECK(side == "left" || side == "right");
  return side == "left";
}

bool is_float_cpu(const Tensor& t) {
  const auto s = t.scalar_type();
  return t.device().is_cpu() && (s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf);
}

bool is_float_cpu_2d(const Tensor& t) { return is_float_cpu(t) && t.dim() == 2; }

at::ScalarType acc_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (d == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The moment state in any format (ops/_checks.py check_moment_state has the messages).
// Returns whether the moments are 8-bit.
bool check_moment_state(const Tensor& ea, const Tensor& eas, at::IntArrayRef shape, const OptTensor& m_absmax,
                        const OptTensor& v_absmax, int64_t block_size, int64_t seed) {
  const bool eight = given(m_absmax) || given(v_absmax);
  if (!eight) {
    TORCH_CHECK(is_float_cpu(ea) && is_float_cpu(eas) && ea.sizes() == shape && eas.sizes() == shape &&
                ea.scalar_type() == eas.scalar_type());
    TORCH_CHECK(block_size == 0);
    TORCH_CHECK(seed < 0 || ea.scalar_type() == at::kBFloat16);
    return false;
  }
  TORCH_CHECK(given(m_absmax) && given(v_absmax));
  TORCH_CHECK(block_size >= 1 && block_size <= moments8::kMaxBlock);
  TORCH_CHECK(seed < 0);
  TORCH_CHECK(!shape.empty());
  std::vector<int64_t> ashape(shape.begin(), shape.end());
  ashape.back() = (ashape.back() + block_size - 1) / block_size;
  for (const Tensor* t : {&ea, &eas}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kByte && t->is_contiguous() && t->sizes() == shape);
  }
  for (const Tensor* t : {&*m_absmax, &*v_absmax}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                t->sizes() == at::IntArrayRef(ashape));
  }
  return true;
}

// Right orientation of a side's tensors.
Tensor orient(const Tensor& t, bool left) { return left ? t.t() : t; }

// A per-row factor vector (float32, length m) in acc, shaped to broadcast against the
// right-oriented weight; undefined when not given.
Tensor row_factor(const OptTensor& v, int64_t m, bool left, at::ScalarType acc) {
  if (!v.has_value() || !v->defined()) return Tensor();
  TORCH_CHECK(v->device().is_cpu() && v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == m);
  Tensor t = v->to(acc);
  return left ? t.view({1, m}) : t.view({m, 1});
}

// torch.optim.AdamW's bias correction folded into the step size (the reference's
// adam_step_size): lr * sqrt(1 - beta2^t) / (1 - beta1^t).
double adam_step_size(double lr, double beta1, double beta2, int64_t step) {
  const double t = static_cast<double>(step);
  return lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
}

// The checks of one fused step (nothing written); returns the projector's source, the
// low-rank shape in `shape` and whether the moments are 8-bit in `eight`.
ProjectorSource check_step(const Tensor& param, const Tensor& grad, const Tensor& proj, const Tensor& exp_avg,
                           const Tensor& exp_avg_sq, bool left, int64_t step, const OptTensor& indices,
                           const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size,
                           const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size,
                           int64_t moment_seed, std::vector<int64_t>& shape, bool& eight) {
  TORCH_CHECK(is_float_cpu_2d(param) && is_float_cpu(grad) && grad.sizes() == param.sizes());
  TORCH_CHECK(step >= 1);
  const ProjectorSource src =
      make_source(param.size(0), param.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  eight = check_moment_state(exp_avg, exp_avg_sq, shape, m_absmax, v_absmax, block_size, moment_seed);
  return src;
}

// The fused step with its weight update given as W <- decay * W + alpha * back(N) (the
// single-tensor op computes alpha and decay from lr / step / weight decay / scale; the
// multi-tensor op may take them per parameter from a device tensor).
// The Adam-moment fields of a Problem (both projecting steps): the moments in right
// orientation, the stochastic-rounding seed, the 8-bit absmax blocks and the betas / eps.
void set_moments(Problem& pb, const Tensor& exp_avg, const Tensor& exp_avg_sq, bool left, int64_t moment_seed,
                 bool eight, const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size, double beta1,
                 double beta2, double eps) {
  pb.ea = orient(exp_avg, left);
  pb.eas = orient(exp_avg_sq, left);
  pb.left = left;
  pb.seed = moment_seed;
  if (eight) {
    pb.ma = *m_absmax;
    pb.va = *v_absmax;
    pb.block_size = block_size;
  }
  pb.beta1 = beta1;
  pb.beta2 = beta2;
  pb.eps = eps;
}

void fused_step(Tensor& param, const Tensor& grad, const Tensor& proj, Tensor& exp_avg, Tensor& exp_avg_sq,
                bool left, double beta1, double beta2, double eps, int64_t step, double alpha, double decay,
                const OptTensor& indices, const OptTensor& q_scale, const OptTensor& q_min, int64_t rank,
                int64_t group_size, const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size,
                int64_t moment_seed) {
  std::vector<int64_t> shape;
  bool eight = false;
  const ProjectorSource src = check_step(param, grad, proj, exp_avg, exp_avg_sq, left, step, indices, q_scale, q_min,
                                         rank, group_size, m_absmax, v_absmax, block_size, moment_seed, shape, eight);
  if (fast_eligible(param, grad, exp_avg, exp_avg_sq, src, left, m_absmax, moment_seed)) {
    fast_step(param, grad, exp_avg, exp_avg_sq, src, left, beta1, beta2, eps, alpha, decay);
    return;
  }
  if (int4_lean_eligible(param, grad, exp_avg, exp_avg_sq, src, eight, moment_seed)) {
    int4_lean_step(param, grad, exp_avg, exp_avg_sq, src, left, beta1, beta2, eps, alpha, decay, m_absmax, v_absmax,
                   block_size);
    return;
  }

  const at::ScalarType acc =
      acc_dtype({param.scalar_type(), grad.scalar_type(), proj_dtype(src), exp_avg.scalar_type()});
  Problem pb;
  pb.g = orient(grad, left);
  pb.w = orient(param, left);
  set_moments(pb, exp_avg, exp_avg_sq, left, moment_seed, eight, m_absmax, v_absmax, block_size, beta1, beta2, eps);
  // 8-bit: N (float32 values, as the reference rounds it) is written over R in acc.
  if (!eight && exp_avg.scalar_type() != acc) {
    // N is rounded to the moments' dtype before the back-projection (as the reference);
    // this low-rank tensor holds the rounded values.
    pb.n = orient(at::empty(shape, exp_avg.options()), left);
  }
  pb.decay = decay;
  pb.alpha = alpha;
  run(pb, src, acc);
}

}  // namespace
}  // namespace projection

Tensor projection_project_cpu(const Tensor& grad, const Tensor& proj, c10::string_view side, const OptTensor& indices,
                              const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size) {
  using namespace projection;
  const bool left = is_left(side);
  TORCH_CHECK(is_float_cpu_2d(grad));
  std::vector<int64_t> shape;
  const ProjectorSource src = make_source(grad.size(0), grad.size(1), left, proj, indices, q_scale, q_min, rank,
                                          group_size, shape, /*any_rank=*/true);
  const at::ScalarType acc = acc_dtype({grad.scalar_type(), proj_dtype(src)});
  Tensor out = at::empty(shape, grad.options().dtype(acc));
  Problem pb;
  pb.g = orient(grad, left);
  pb.n = orient(out, left);
  run(pb, src, acc);
  return out;
}

Tensor projection_project_adam_cpu(const Tensor& grad, const Tensor& proj, Tensor& exp_avg, Tensor& exp_avg_sq,
                                   c10::string_view side, double beta1, double beta2, double eps,
                                   const OptTensor& indices, const OptTensor& q_scale, const OptTensor& q_min,
                                   int64_t rank, int64_t group_size, const OptTensor& m_absmax,
                                   const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed) {
  using namespace projection;
  const bool left = is_left(side);
  TORCH_CHECK(is_float_cpu_2d(grad));
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(grad.size(0), grad.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  const bool eight = check_moment_state(exp_avg, exp_avg_sq, shape, m_absmax, v_absmax, block_size, moment_seed);

  Tensor out = at::empty(shape, exp_avg.options().dtype(eight ? at::kFloat : exp_avg.scalar_type()));
  Problem pb;
  pb.g = orient(grad, left);
  pb.n = orient(out, left);
  set_moments(pb, exp_avg, exp_avg_sq, left, moment_seed, eight, m_absmax, v_absmax, block_size, beta1, beta2, eps);
  run(pb, src, acc_dtype({grad.scalar_type(), proj_dtype(src), exp_avg.scalar_type()}));
  return out;
}

void projection_backproject_apply_cpu(Tensor& param, const Tensor& update, const Tensor& proj, c10::string_view side,
                                      double alpha, double decay, const OptTensor& indices, const OptTensor& q_scale,
                                      const OptTensor& q_min, int64_t rank, int64_t group_size,
                                      const OptTensor& row_decay, const OptTensor& row_alpha) {
  using namespace projection;
  const bool left = is_left(side);
  TORCH_CHECK(is_float_cpu_2d(param));
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(param.size(0), param.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  TORCH_CHECK(is_float_cpu(update) && update.sizes() == at::IntArrayRef(shape));

  const at::ScalarType acc = acc_dtype({param.scalar_type(), update.scalar_type(), proj_dtype(src)});
  Problem pb;
  pb.rd = row_factor(row_decay, param.size(0), left, acc);
  pb.ra = row_factor(row_alpha, param.size(0), left, acc);
  pb.w = orient(param, left);
  pb.upd = orient(update, left);
  pb.decay = decay;
  pb.alpha = alpha;
  run(pb, src, acc);
}

void projection_project_update_backproject_cpu(Tensor& param, const Tensor& grad, const Tensor& proj,
                                               Tensor& exp_avg, Tensor& exp_avg_sq, c10::string_view side,
                                               double lr, double beta1, double beta2, double eps, int64_t step,
                                               double weight_decay, double scale, const OptTensor& indices,
                                               const OptTensor& q_scale, const OptTensor& q_min, int64_t rank,
                                               int64_t group_size, const OptTensor& m_absmax,
                                               const OptTensor& v_absmax, int64_t block_size,
                                               int64_t moment_seed) {
  using namespace projection;
  fused_step(param, grad, proj, exp_avg, exp_avg_sq, is_left(side), beta1, beta2, eps, step,
             -adam_step_size(lr, beta1, beta2, step) * scale, 1.0 - lr * weight_decay, indices, q_scale, q_min, rank,
             group_size, m_absmax, v_absmax, block_size, moment_seed);
}

// The multi-tensor step: one dispatcher call for a list of parameters (one side, one
// projector kind), the single-tensor step on each in turn. Empty projector lists mean
// "not given" (the dense kind; rank from the projectors). Every entry is checked before
// the first one is written.
void projection_foreach_project_update_backproject_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, c10::string_view side, at::ArrayRef<double> lr, double beta1, double beta2,
    double eps, at::IntArrayRef step, at::ArrayRef<double> weight_decay, at::ArrayRef<double> scale,
    at::TensorList indices, at::TensorList q_scale, at::TensorList q_min, at::IntArrayRef rank, int64_t group_size,
    at::TensorList m_absmax, at::TensorList v_absmax, int64_t block_size, at::IntArrayRef moment_seed,
    const OptTensor& skip, const OptTensor& coeffs) {
  using namespace projection;
  const bool left = is_left(side);
  const size_t n = params.size();
  for (const auto& len : {grads.size(), projs.size(), exp_avgs.size(), exp_avg_sqs.size(), lr.size(), step.size(),
                          weight_decay.size(), scale.size()}) {
    TORCH_CHECK(len == n);
  }
  for (const auto& len : {indices.size(), q_scale.size(), q_min.size(), rank.size(), m_absmax.size(),
                          v_absmax.size(), moment_seed.size()}) {
    TORCH_CHECK(len == 0 || len == n);
  }
  // Device-side control, read through data pointers (no aten op, no host sync elsewhere):
  // skip[i] != 0 leaves parameter i untouched; coeffs[i] = (a, d): W <- d W - a back(N).
  const bool has_skip = skip.has_value() && skip->defined();
  const bool has_coeffs = coeffs.has_value() && coeffs->defined();
  if (has_skip) {
    TORCH_CHECK(skip->device().is_cpu() && (skip->scalar_type() == at::kByte || skip->scalar_type() == at::kBool) &&
                skip->dim() == 1 && skip->size(0) == static_cast<int64_t>(n) && skip->is_contiguous());
  }
  if (has_coeffs) {
    TORCH_CHECK(coeffs->device().is_cpu() &&
                (coeffs->scalar_type() == at::kFloat || coeffs->scalar_type() == at::kDouble) &&
                coeffs->dim() == 2 && coeffs->size(0) == static_cast<int64_t>(n) && coeffs->size(1) == 2 &&
                coeffs->is_contiguous());
  }
  auto skipped = [&](size_t i) -> bool {
    return has_skip && static_cast<const uint8_t*>(skip->const_data_ptr())[i] != 0;
  };
  auto coeff = [&](size_t i, int j) -> double {
    if (coeffs->scalar_type() == at::kDouble) return coeffs->const_data_ptr<double>()[2 * i + j];
    return static_cast<double>(coeffs->const_data_ptr<float>()[2 * i + j]);
  };
  auto seed_of = [&](size_t i) -> int64_t { return moment_seed.empty() ? -1 : moment_seed[i]; };
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor {
    return xs.empty() ? OptTensor() : OptTensor(xs[i]);
  };
  for (size_t i = 0; i < n; ++i) {  // checks only: nothing is written until all pass
    std::vector<int64_t> shape;
    bool eight = false;
    check_step(params[i], grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], left, step[i], opt(indices, i),
               opt(q_scale, i), opt(q_min, i), rank.empty() ? 0 : rank[i], group_size, opt(m_absmax, i),
               opt(v_absmax, i), block_size, seed_of(i), shape, eight);
  }
  for (size_t i = 0; i < n; ++i) {
    if (skipped(i)) continue;
    Tensor p = params[i], ea = exp_avgs[i], eas = exp_avg_sqs[i];
    const double alpha =
        has_coeffs ? -coeff(i, 0) : -adam_step_size(lr[i], beta1, beta2, step[i]) * scale[i];
    const double decay = has_coeffs ? coeff(i, 1) : 1.0 - lr[i] * weight_decay[i];
    fused_step(p, grads[i], projs[i], ea, eas, left, beta1, beta2, eps, step[i], alpha, decay, opt(indices, i),
               opt(q_scale, i), opt(q_min, i), rank.empty() ? 0 : rank[i], group_size, opt(m_absmax, i),
               opt(v_absmax, i), block_size, seed_of(i));
  }
}

int64_t projection_fast_path(int64_t mode) { return projection::fast_path_mode(mode); }

}  // namespace lowrank_kernels
