// The orth family's small float32 Newton-Schulz on raw pointers (csrc/cpu/orth.cpp describes
// it), shared with Trion's float32 fast path (csrc/cpu/trion.cpp), so both run the very same
// arithmetic.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace lowrank_kernels {

// The largest short side s of the raw-pointer path.
constexpr int64_t kSmallS = 32;

// X (s x l, s <= kSmallS, contiguous float32; normalized in place here) through the iteration
// (coefficients: (a, b, c) triples); Y: a second s x l buffer. Returns the buffer holding the
// result (X or Y).
float* newton_schulz_small(float* X, float* Y, int64_t s, int64_t l, at::ArrayRef<double> coefficients, double eps);

}  // namespace lowrank_kernels
