// The general engine of the projection family's C++ kernels: one driver, run(), for every
// op, projector kind and moment format (engine.cpp describes how it works).
#pragma once

#include "cpu/projection/projector.h"

namespace lowrank_kernels {
namespace projection {

// What one call computes. Everything in right orientation. Undefined tensors switch stages off:
//   project: g defined; with ea, eas the Adam epilogue, n where N is written (undefined:
//   not wanted); without them (projection_project) n, in acc, receives R;
//   apply: w defined, and either project or upd.
struct Problem {
  Tensor g;           // rows x K   grad
  Tensor upd;         // rows x r   update (backproject_apply)
  Tensor ea, eas, n;  // rows x r   moments, N
  Tensor w;           // rows x K   param
  // 8-bit moments: ea / eas are uint8 codes, ma / va the float32 absmax (in the moments'
  // own orientation: the transpose of ea's view when `left`), blocks of block_size.
  Tensor ma, va;
  int64_t block_size = 0;
  int64_t seed = -1;  // >= 0: bf16 moments stored with stochastic rounding
  bool left = false;  // the views are transposes of the tensors (side="left")
  // Per-row factors of the original weight (backproject_apply's row_decay / row_alpha),
  // in acc, shaped to broadcast in right orientation: (rows x 1) for side="right",
  // (1 x K) for side="left" (the original rows are the oriented columns). Undefined: none.
  Tensor rd, ra;
  double beta1 = 0, beta2 = 0, eps = 0, decay = 1, alpha = 0;
};


// Runs the stages `pb` asks for with the projector `src`, accumulating in `acc` (float32,
// or float64 when an input is float64).
void run(const Problem& pb, const ProjectorSource& src, at::ScalarType acc);

}  // namespace projection
}  // namespace lowrank_kernels
