// C++ CPU kernels of the residual family (lowrank_kernels/ops/residual.py has the schemas and
// the validation, lowrank_kernels/reference/residual.py the specification):
//
//   E = back(low) + f * G          (never stored)
//   residual_sumsq:  sum(E^2)
//   residual_apply:  W <- decay * W + alpha * E
//
// back(low) is a GEMM with K = rank, produced one bounded row panel of W at a time
// (side="right": low[rows] P; side="left": P[rows] low) by BLAS (multi-threaded), and the
// epilogue runs on that panel while it is in cache (rows in parallel):
// - sum of squares: the panel of back(low) goes to a scratch buffer, then each row adds
//   f * G and its squares (a double per row, added in row order: the result does not depend
//   on the number of threads);
// - apply: BLAS updates W's panel in place, W <- decay W + alpha back(low) (one read and
//   write of W by the GEMM, as the projection family's back-projection does), then each row
//   adds alpha f G. A 16-bit or strided W is updated in a float32 copy of the panel, rounded
//   back once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

// Panels of about 256K elements of W (1 MiB of float32) and at least 4 r rows (the GEMMs are
// then not skinny), at most a quarter of the matrix: as the projection family's engine.
constexpr int64_t kPanelElems = 1 << 18;
constexpr int64_t kPanelRankMult = 4;
constexpr int64_t kMinPanels = 4;

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
  int64_t rows = std::max<int64_t>({8, kPanelElems / std::max<int64_t>(p.n, 1), kPanelRankMult * r});
  rows = std::min(rows, (p.m + kMinPanels - 1) / kMinPanels);
  p.rows = std::max<int64_t>(1, std::min(rows, p.m));
  p.panels = p.m == 0 ? 0 : (p.m + p.rows - 1) / p.rows;
  return p;
}

// The GEMM operands of rows [i0, i0 + rows): (A, B) with back(low)[rows] = A B.
std::pair<Tensor, Tensor> panel_operands(const Problem& p, int64_t i0, int64_t rows) {
  return p.right ? std::make_pair(p.low.narrow(0, i0, rows), p.proj)
                 : std::make_pair(p.proj.narrow(0, i0, rows), p.low);
}

// out[i, :] (contiguous rows x n, acc) += c * f * G[i0 + i, :], rows in parallel; with
// `sumsq`, also the square sum of each updated row into sums[i].
template <typename scalar_t>
void add_scaled_grad(const Problem& p, const Tensor& g, Tensor& out, int64_t i0, int64_t rows, scalar_t c,
                     double* sums) {
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* fp = p.factor.const_data_ptr<scalar_t>();
  const int64_t n = p.n;
  at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      scalar_t* orow = op + i * n;
      const scalar_t* grow = gp + i * n;
      if (p.right) {
        const scalar_t f = c * fp[i0 + i];
        for (int64_t j = 0; j < n; ++j) orow[j] += f * grow[j];
      } else {
        for (int64_t j = 0; j < n; ++j) orow[j] += c * fp[j] * grow[j];
      }
      if (sums != nullptr) {
        double s = 0.0;
        for (int64_t j = 0; j < n; ++j) s += static_cast<double>(orow[j]) * static_cast<double>(orow[j]);
        sums[i] = s;
      }
    }
  });
}

}  // namespace

Tensor residual_sumsq_cpu(const Tensor& grad, const Tensor& low, const Tensor& proj, const Tensor& factor,
                          c10::string_view side, const OptTensor& indices) {
  Problem p = prepare(grad, low, proj, factor, side, indices, nullptr);
  double total = 0.0;
  if (p.panels > 0 && p.n > 0) {
    Tensor scratch = at::empty({p.rows, p.n}, grad.options().dtype(p.acc));
    std::vector<double> sums(static_cast<size_t>(p.rows));
    for (int64_t b = 0; b < p.panels; ++b) {
      const int64_t i0 = b * p.rows, rows = std::min(p.rows, p.m - i0);
      Tensor e = scratch.narrow(0, 0, rows);
      auto ab = panel_operands(p, i0, rows);
      at::mm_out(e, ab.first, ab.second);
      Tensor g = grad.narrow(0, i0, rows).to(p.acc).contiguous();
      AT_DISPATCH_FLOATING_TYPES(p.acc, "residual_sumsq_cpu", [&] {
        add_scaled_grad<scalar_t>(p, g, e, i0, rows, scalar_t(1), sums.data());
      });
      for (int64_t i = 0; i < rows; ++i) total += sums[static_cast<size_t>(i)];
    }
  }
  return at::scalar_tensor(total, grad.options().dtype(p.acc));
}

void residual_apply_cpu(Tensor& param, const Tensor& grad, const Tensor& low, const Tensor& proj,
                        const Tensor& factor, c10::string_view side, double alpha, double decay,
                        const OptTensor& indices) {
  Problem p = prepare(grad, low, proj, factor, side, indices, &param);
  if (p.n == 0) return;
  const bool direct = param.scalar_type() == p.acc && param.stride(1) == 1 && param.stride(0) == p.n;
  for (int64_t b = 0; b < p.panels; ++b) {
    const int64_t i0 = b * p.rows, rows = std::min(p.rows, p.m - i0);
    Tensor wp = param.narrow(0, i0, rows);
    Tensor w = direct ? wp : wp.to(p.acc).contiguous();
    auto ab = panel_operands(p, i0, rows);
    w.addmm_(ab.first, ab.second, decay, alpha);  // decay * W + alpha * back(low)
    Tensor g = grad.narrow(0, i0, rows).to(p.acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(p.acc, "residual_apply_cpu", [&] {
      add_scaled_grad<scalar_t>(p, g, w, i0, rows, static_cast<scalar_t>(alpha), nullptr);
    });
    if (!direct) wp.copy_(w);
  }
}

}  // namespace lowrank_kernels
