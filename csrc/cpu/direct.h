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

// C = beta C + alpha A B on float32 CPU tensors (C, A, B 2-D, C not overlapping A or B),
// as at::addmm_(C, A, B, beta, alpha) computes it, or at::mm_out(C, A, B) for beta 0 and
// alpha 1: the very BLAS call ATen's CPU kernel makes (direct_gemm.cpp: sgemm_ with the
// operand order, transposes and leading dimensions addmm_impl_cpu_ picks for these
// strides), without ATen's meta checks, dispatcher round trips and conj views (five
// dispatcher calls per GEMM). Returns false, having done nothing, where it cannot promise
// ATen's bits: strides ATen would copy into a temporary, sizes BLAS is not called for,
// float32 matmul precision below "highest" (oneDNN's bf16/tf32 GEMM), a torch built
// without BLAS, or a call layout whose one-time check against ATen's call (on
// deterministic data, once per process for each operand layout) did not match bit for
// bit; the caller then calls ATen.
bool blas_addmm(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double beta, double alpha);

// Whether ATen's float32 CPU GEMM is the BLAS sgemm now: float32 matmul precision "highest"
// everywhere ATen looks (else oneDNN's bf16/tf32 GEMM may serve it). Read at every call: the
// precision can change between calls.
bool ieee_matmul();

}  // namespace direct
}  // namespace lowrank_kernels
