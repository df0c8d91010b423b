// The packed-INT4 projector's lean route through the fused step (int4_path.cpp describes it):
// the general engine's arithmetic, bit for bit, without its dispatcher calls and allocations.
#pragma once

#include "cpu/projection/projector.h"

namespace lowrank_kernels {
namespace projection {

// Whether the fused step on these operands can take the lean INT4 route (and the fast
// path is on: fast_path_mode() 0 sends every case through the general engine).
bool int4_lean_eligible(const Tensor& param, const Tensor& grad, const Tensor& ea, const Tensor& eas,
                        const ProjectorSource& src, bool eight, int64_t seed);

// The fused step W <- decay W + alpha back(N) with a packed INT4 projector (after
// int4_lean_eligible): the same results as the general engine (engine.cpp, run()).
void int4_lean_step(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, const ProjectorSource& src,
                    bool left, double beta1, double beta2, double eps, double alpha, double decay,
                    const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size);

}  // namespace projection
}  // namespace lowrank_kernels
