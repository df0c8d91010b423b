// C++ CPU kernels of the residual family (lowrank_kernels/ops/residual.py has the schemas and
// the validation, lowrank_kernels/reference/residual.py the specification):
//
//   E = back(low) + f * G          (never stored)
//   residual_sumsq:  sum(E^2)
//   residual_apply:  W <- decay * W + alpha * E
//
// back(low) is a GEMM with K = rank; it is produced one bounded row panel of W at a time
// (side="right": low[rows] P; side="left": P[rows] low), and the epilogue (the factor times
// G, then the square sum or the update of W) runs on that panel while it is in cache. Panels
// run in parallel (at::parallel_for, each GEMM single-threaded inside); the square sums are
// kept per panel in double and added in panel order, so the result does not depend on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

// About 32K elements per panel (128 KiB of float32): the panel of back(low), its G rows and
// W rows stay in L2 between the GEMM and the epilogue.
constexpr int64_t kPanelElems = 1 << 15;

struct Problem {
  bool right;
  int64_t m, n;
  at::ScalarType acc;
  Tensor proj;    // dense P in acc, contiguous: r x n (right) or m x r (left)
  Tensor low;     // acc, contiguous: m x r (right) or r x n (left)
  Tensor factor;  // acc, contiguous: m (right) or n (left)
  int64_t rows;   // rows per panel
  int64_t panels;
};

Problem prepare(const Tensor& grad, const Tensor& low, const Tensor& proj, const Tensor& factor,
                c10::string_view side, const OptTensor& indices, const Tensor* param) {
  TORCH_CHECK(side == "right" || side == "left");
  TORCH_CHECK(grad.dim() == 2 && low.dim() == 2 && proj.dim() == 2 && factor.dim() == 1);
  Problem p;
  p.right = side == "right";
  p.m = grad.size(0);
  p.n = grad.size(1);
  bool f64 = grad.scalar_type() == at::kDouble || low.scalar_type() == at::kDouble ||
             proj.scalar_type() == at::kDouble || (param != nullptr && param->scalar_type() == at::kDouble);
  p.acc = f64 ? at::kDouble : at::kFloat;
  Tensor dense = proj;
  if (indices.has_value()) {
    const Tensor& idx = *indices;
    TORCH_CHECK(idx.dim() == 1);
    const int64_t s = p.right ? p.n : p.m;
    TORCH_CHECK(proj.size(0) == s && proj.size(1) == s);
    Tensor li = idx.to(at::kLong);
    if (li.numel() > 0) {
      TORCH_CHECK(li.min().item<int64_t>() >= 0 && li.max().item<int64_t>() < s);
    }
    Tensor rows = proj.index_select(0, li);  // r x s
    dense = p.right ? rows : rows.t();
  }
  p.proj = dense.to(p.acc).contiguous();
  p.low = low.to(p.acc).contiguous();
  p.factor = factor.to(p.acc).contiguous();
  const int64_t r = p.right ? p.proj.size(0) : p.proj.size(1);
  TORCH_CHECK(p.right ? (p.proj.size(1) == p.n && p.low.size(0) == p.m && p.low.size(1) == r)
                      : (p.proj.size(0) == p.m && p.low.size(0) == r && p.low.size(1) == p.n));
  TORCH_CHECK(p.factor.size(0) == (p.right ? p.m : p.n));
  if (param != nullptr) {
    TORCH_CHECK(param->dim() == 2 && param->size(0) == p.m && param->size(1) == p.n);
  }
  p.rows = std::max<int64_t>(1, std::min<int64_t>(p.m, kPanelElems / std::max<int64_t>(p.n, 1)));
  p.panels = p.m == 0 ? 0 : (p.m + p.rows - 1) / p.rows;
  return p;
}

// E for rows [i0, i0 + rows) in acc, contiguous rows x n.
Tensor panel_residual(const Problem& p, const Tensor& grad, int64_t i0, int64_t rows) {
  Tensor e = p.right ? at::mm(p.low.narrow(0, i0, rows), p.proj) : at::mm(p.proj.narrow(0, i0, rows), p.low);
  Tensor g = grad.narrow(0, i0, rows).to(p.acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.acc, "residual_cpu", [&] {
    scalar_t* ep = e.data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* fp = p.factor.const_data_ptr<scalar_t>();
    const int64_t n = p.n;
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* er = ep + i * n;
      const scalar_t* gr = gp + i * n;
      if (p.right) {
        const scalar_t f = fp[i0 + i];
        for (int64_t j = 0; j < n; ++j) er[j] += f * gr[j];
      } else {
        for (int64_t j = 0; j < n; ++j) er[j] += fp[j] * gr[j];
      }
    }
  });
  return e;
}

}  // namespace

Tensor residual_sumsq_cpu(const Tensor& grad, const Tensor& low, const Tensor& proj, const Tensor& factor,
                          c10::string_view side, const OptTensor& indices) {
  Problem p = prepare(grad, low, proj, factor, side, indices, nullptr);
  std::vector<double> partial(static_cast<size_t>(p.panels), 0.0);
  at::parallel_for(0, p.panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * p.rows, rows = std::min(p.rows, p.m - i0);
      Tensor e = panel_residual(p, grad, i0, rows);
      AT_DISPATCH_FLOATING_TYPES(p.acc, "residual_sumsq_cpu", [&] {
        const scalar_t* ep = e.const_data_ptr<scalar_t>();
        double s = 0.0;
        const int64_t count = rows * p.n;
        for (int64_t k = 0; k < count; ++k) s += static_cast<double>(ep[k]) * static_cast<double>(ep[k]);
        partial[static_cast<size_t>(b)] = s;
      });
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return at::scalar_tensor(total, grad.options().dtype(p.acc));
}

void residual_apply_cpu(Tensor& param, const Tensor& grad, const Tensor& low, const Tensor& proj,
                        const Tensor& factor, c10::string_view side, double alpha, double decay,
                        const OptTensor& indices) {
  Problem p = prepare(grad, low, proj, factor, side, indices, &param);
  at::parallel_for(0, p.panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * p.rows, rows = std::min(p.rows, p.m - i0);
      Tensor e = panel_residual(p, grad, i0, rows);
      Tensor wp = param.narrow(0, i0, rows);
      Tensor w = wp.to(p.acc).contiguous();  // param's own memory when it is contiguous acc
      AT_DISPATCH_FLOATING_TYPES(p.acc, "residual_apply_cpu", [&] {
        scalar_t* w_ = w.data_ptr<scalar_t>();
        const scalar_t* ep = e.const_data_ptr<scalar_t>();
        const scalar_t a = static_cast<scalar_t>(alpha), d = static_cast<scalar_t>(decay);
        const int64_t count = rows * p.n;
        for (int64_t k = 0; k < count; ++k) w_[k] = d * w_[k] + a * ep[k];
      });
      if (w.data_ptr() != wp.data_ptr() || w.strides() != wp.strides()) wp.copy_(w);
    }
  });
}

}  // namespace lowrank_kernels
