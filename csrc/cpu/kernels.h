// The C++ CPU kernels, one function per op: `<family>_<op>_cpu` implements the op
// `lowrank_kernels::<family>_<op>` (lowrank_kernels/ops/<family>.py) on CPU tensors.
// csrc/registration.cpp registers each under the private dispatcher namespace
// `_lowrank_kernels`, where the op layer defined its schema (the public op's schema,
// lowrank_kernels/ops/_registry.py); the public op's router calls it under backend "cpp".
//
// The op layer validates the arguments (with messages) before any of these runs; the
// kernels keep bare checks of what they rely on for direct calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lowrank_kernels {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// --------------------------------------------------------------------------- projection
// csrc/cpu/projection/ops.cpp
Tensor projection_project_cpu(const Tensor& grad, const Tensor& proj, c10::string_view side, const OptTensor& indices,
                              const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size);

Tensor projection_project_adam_cpu(const Tensor& grad, const Tensor& proj, Tensor& exp_avg, Tensor& exp_avg_sq,
                                   c10::string_view side, double beta1, double beta2, double eps,
                                   const OptTensor& indices, const OptTensor& q_scale, const OptTensor& q_min,
                                   int64_t rank, int64_t group_size, const OptTensor& m_absmax,
                                   const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed);

void projection_backproject_apply_cpu(Tensor& param, const Tensor& update, const Tensor& proj, c10::string_view side,
                                      double alpha, double decay, const OptTensor& indices, const OptTensor& q_scale,
                                      const OptTensor& q_min, int64_t rank, int64_t group_size,
                                      const OptTensor& row_decay, const OptTensor& row_alpha);

void projection_project_update_backproject_cpu(Tensor& param, const Tensor& grad, const Tensor& proj,
                                               Tensor& exp_avg, Tensor& exp_avg_sq, c10::string_view side,
                                               double lr, double beta1, double beta2, double eps, int64_t step,
                                               double weight_decay, double scale, const OptTensor& indices,
                                               const OptTensor& q_scale, const OptTensor& q_min, int64_t rank,
                                               int64_t group_size, const OptTensor& m_absmax,
                                               const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed);

void projection_foreach_project_update_backproject_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, c10::string_view side, at::ArrayRef<double> lr, double beta1, double beta2,
    double eps, at::IntArrayRef step, at::ArrayRef<double> weight_decay, at::ArrayRef<double> scale,
    at::TensorList indices, at::TensorList q_scale, at::TensorList q_min, at::IntArrayRef rank, int64_t group_size,
    at::TensorList m_absmax, at::TensorList v_absmax, int64_t block_size, at::IntArrayRef moment_seed,
    const OptTensor& skip, const OptTensor& coeffs);

// Not an op: the float32 fast path of the fused step for measurements and tests (exposed as
// the private Python function lowrank_kernels._C.projection_fast_path). mode -1 queries,
// 0 turns it off, 1 on, 2 on with the portable kernels; returns the mode before the call.
int64_t projection_fast_path(int64_t mode);

// --------------------------------------------------------------------------- adam
// csrc/cpu/adam.cpp
Tensor adam_update_cpu(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, double beta1, double beta2, double eps,
                       const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed);

void adam_foreach_update_cpu(at::TensorList r, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList n,
                             double beta1, double beta2, double eps, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed);

// --------------------------------------------------------------------------- apollo
// csrc/cpu/apollo.cpp
void apollo_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList seeds,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                               c10::string_view side, int64_t rank, bool channel, double beta1, double beta2,
                               double eps, at::ArrayRef<double> front, at::ArrayRef<double> alpha,
                               at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                               int64_t block_size, at::IntArrayRef moment_seed);

// --------------------------------------------------------------------------- frugal
// csrc/cpu/frugal.cpp
void frugal_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq, c10::string_view side, bool signsgd,
                               double beta1, double beta2, double eps, at::ArrayRef<double> alpha,
                               at::ArrayRef<double> decay, at::ArrayRef<double> free_alpha, at::TensorList m_absmax,
                               at::TensorList v_absmax, int64_t block_size, at::IntArrayRef moment_seed);

// --------------------------------------------------------------------------- adafactor
// csrc/cpu/adafactor.cpp
void adafactor_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                                  at::TensorList exp_avg_sq_row, at::TensorList exp_avg_sq_col,
                                  at::TensorList exp_avg, at::TensorList m_absmax, c10::string_view side,
                                  double eps1, double eps2, double clip_threshold, double beta1,
                                  bool scale_parameter, at::ArrayRef<double> beta2t, at::ArrayRef<double> lr,
                                  at::ArrayRef<double> weight_decay, at::ArrayRef<double> alpha,
                                  int64_t block_size, at::IntArrayRef moment_seed);
// --------------------------------------------------------------------------- fira
// csrc/cpu/fira.cpp
void fira_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList indices,
                             at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                             c10::string_view side, double beta1, double beta2, double eps, at::ArrayRef<double> scale,
                             at::ArrayRef<double> mix, at::ArrayRef<double> gamma, at::ArrayRef<double> alpha,
                             at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed);

// Not an op: the raw-pointer path of the fira step for small weights, for measurements and
// tests (the private Python function lowrank_kernels._C.fira_small_path). mode -1 queries,
// 0 turns it off, 1 on, 2 on with the portable kernels; returns the mode before the call.
int64_t fira_small_path(int64_t mode);
// --------------------------------------------------------------------------- gradnormlorp
// csrc/cpu/gradnormlorp.cpp
void gradnormlorp_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                                     at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList wn_g,
                                     at::TensorList wn_vnorm, at::TensorList exp_avg_g, at::TensorList exp_avg_sq_g,
                                     c10::string_view side, double beta1, double beta2, double eps,
                                     at::ArrayRef<double> step_size, at::ArrayRef<double> scale,
                                     at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                                     int64_t block_size, at::IntArrayRef moment_seed);

// --------------------------------------------------------------------------- dct
// csrc/cpu/dct.cpp
Tensor dct_scores_cpu(const Tensor& grad, const Tensor& basis, c10::string_view side, int64_t norm);

Tensor dct_score_topk_cpu(const Tensor& grad, const Tensor& basis, int64_t k, c10::string_view side, int64_t norm);

Tensor dct_foreach_score_topk_cpu(at::TensorList grads, const Tensor& basis, int64_t k, c10::string_view side,
                                  int64_t norm);

// --------------------------------------------------------------------------- quant
// csrc/cpu/quant.cpp
std::tuple<Tensor, Tensor, Tensor> quant_int4_pack_cpu(const Tensor& x, int64_t group_size);

Tensor quant_int4_unpack_cpu(const Tensor& packed, const Tensor& scale, const Tensor& minimum, at::IntArrayRef shape,
                             at::ScalarType dtype, int64_t group_size);

std::tuple<Tensor, Tensor, Tensor> quant_int8_quantize_cpu(const Tensor& w, int64_t group_size);

Tensor quant_int8_dequantize_cpu(const Tensor& q, const Tensor& scale, const Tensor& minimum, int64_t group_size,
                                 at::ScalarType dtype);

void quant_int8_update_sr_cpu(Tensor& q, Tensor& scale, Tensor& minimum, const Tensor& update, double decay,
                              double alpha, int64_t seed, int64_t group_size);

// --------------------------------------------------------------------------- residual
// csrc/cpu/residual.cpp
Tensor residual_sumsq_cpu(const Tensor& grad, const Tensor& low, const Tensor& proj, const Tensor& factor,
                          c10::string_view side, const OptTensor& indices);

void residual_apply_cpu(Tensor& param, const Tensor& grad, const Tensor& low, const Tensor& proj,
                        const Tensor& factor, c10::string_view side, double alpha, double decay,
                        const OptTensor& indices);
// --------------------------------------------------------------------------- orth
// csrc/cpu/orth.cpp
Tensor orth_newton_schulz_cpu(const Tensor& x, at::ArrayRef<double> coefficients, double eps);

std::vector<Tensor> orth_foreach_newton_schulz_cpu(at::TensorList xs, at::ArrayRef<double> coefficients, double eps);

// --------------------------------------------------------------------------- trion
// csrc/cpu/trion.cpp
void trion_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                              const Tensor& basis, c10::string_view side, int64_t rank, int64_t norm,
                              at::ArrayRef<double> coefficients, double eps, at::ArrayRef<double> mu,
                              at::ArrayRef<double> alpha, at::ArrayRef<double> decay);

// Steps 1-5 (M += G up to the orthogonalized update O) per entry, into `orths` (the low-rank
// shapes) and `indices` (len x rank int32). With trion_foreach_apply_cpu, the sharded step's
// halves: together bitwise trion_foreach_update_cpu.
void trion_foreach_orth_cpu(at::TensorList grads, at::TensorList momentum, const Tensor& basis, c10::string_view side,
                            int64_t rank, int64_t norm, at::ArrayRef<double> coefficients, double eps,
                            at::ArrayRef<double> mu, at::TensorList orths, const Tensor& indices);

// Step 6 per entry: W <- decay W + alpha back(O) with the basis rows `indices` (len x rank).
void trion_foreach_apply_cpu(at::TensorList params, at::TensorList orths, const Tensor& indices, const Tensor& basis,
                             c10::string_view side, at::ArrayRef<double> alpha, at::ArrayRef<double> decay);

}  // namespace lowrank_kernels
