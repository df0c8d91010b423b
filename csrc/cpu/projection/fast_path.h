// The float32 fast path of the projection family's fused step (fast_path.cpp describes
// it): the common small case with no ATen op and no dispatcher call.
#pragma once

#include "cpu/projection/projector.h"

namespace lowrank_kernels {
namespace projection {

// Whether the fused step on these operands can take the fast path (and the fast path is on).
bool fast_eligible(const Tensor& param, const Tensor& grad, const Tensor& ea, const Tensor& eas,
                   const ProjectorSource& src, bool left, const OptTensor& m_absmax, int64_t seed);

// The fused step W <- decay W + alpha back(N) on raw pointers (after fast_eligible).
void fast_step(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, const ProjectorSource& src,
               bool left, double beta1, double beta2, double eps, double alpha, double decay);

// The fast path's mode, for measurements and tests: 0 off (the general engine for every
// case), 1 on (the AVX2 kernels where the CPU has AVX2 and FMA, else the portable ones),
// 2 on with the portable kernels; -1 queries. Returns the mode in effect before the call.
int64_t fast_path_mode(int64_t mode);

}  // namespace projection
}  // namespace lowrank_kernels
