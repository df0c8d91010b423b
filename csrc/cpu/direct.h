// ATen calls without the dispatcher, for per-weight loops over small weights where each
// dispatcher round trip (about a microsecond) costs more than the arithmetic: the same CPU
// kernels, so the same results, bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/EmptyTensor.h>

namespace lowrank_kernels {
namespace direct {

// x.t() of a 2-D CPU tensor as a view without dispatch (x must outlive it).
inline at::Tensor t(const at::Tensor& x) {
  return at::from_blob(x.data_ptr(), {x.size(1), x.size(0)}, {x.stride(1), x.stride(0)}, x.options());
}

// at::mm(a, b) of two 2-D float32 CPU tensors: a fresh contiguous output allocated as at::mm
// allocates it, filled by at::mm's CPU kernel (at::cpu::mm_out: the same GEMM call).
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::detail::empty_cpu({a.size(0), b.size(1)}, at::kFloat, false, std::nullopt);
  at::cpu::mm_out(out, a, b);
  return out;
}

// An uninitialized contiguous float32 CPU tensor (at::empty's CPU allocation).
inline at::Tensor empty_f32(at::IntArrayRef sizes) {
  return at::detail::empty_cpu(sizes, at::kFloat, false, std::nullopt);
}

}  // namespace direct
}  // namespace lowrank_kernels
