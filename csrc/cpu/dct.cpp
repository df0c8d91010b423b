// C++ CPU kernels of the DCT family (lowrank_kernels/ops/dct.py has the schemas and the
// validation, lowrank_kernels/reference/dct.py the specification).
//
// Scoring: the score matrix S (G C^T on the right, C G on the left) is produced one
// bounded panel at a time by BLAS (at::mm), and each panel's |S| or S^2 is folded
// into a double score accumulator right away, so S never exists in full. The panel
// order and each element's summation order are fixed: the result is deterministic.
// Top-k: a partial sort with a total order (score descending, NaN first, ties to the
// lower index), the reference's stable descending sort.
//
// Projection with basis indices is the projection family's DCT projector kind
// (csrc/cpu/projection/projector.h gathers the selected basis rows in its panel loader).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/topk.h"

namespace lowrank_kernels {
namespace {

// Panels of about 4M elements (16 MiB of float) and at least 256 rows / columns: big
// enough that each panel GEMM runs at full BLAS speed (the basis is re-read once per
// panel), bounded so that S never exists in full for large layers.
constexpr int64_t kPanelElems = 1 << 22;
constexpr int64_t kMinPanel = 256;

at::ScalarType acc_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

bool is_right(c10::string_view side) {
  TORCH_CHECK(side == "right" || side == "left");
  return side == "right";
}

int64_t panel_len(int64_t other) { return std::max<int64_t>(kMinPanel, kPanelElems / std::max<int64_t>(1, other)); }

// ----------------------------------------------------------------------------- scores
template <typename acc_t>
void accumulate_columns(const at::Tensor& sp, std::vector<double>& score, int64_t col0, int norm) {
  // score[col0 + j] += sum_i f(sp[i, j]); sp is contiguous (rows x cols).
  const int64_t rows = sp.size(0), cols = sp.size(1);
  const acc_t* data = sp.data_ptr<acc_t>();
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* row = data + i * cols;
      for (int64_t j = c0; j < c1; ++j) {
        const double x = static_cast<double>(row[j]);
        score[col0 + j] += norm == 1 ? std::abs(x) : x * x;
      }
    }
  });
}

template <typename acc_t>
void accumulate_rows(const at::Tensor& sp, std::vector<double>& score, int norm) {
  // score[i] += sum_j f(sp[i, j]); sp is contiguous (rows x cols).
  const int64_t rows = sp.size(0), cols = sp.size(1);
  const acc_t* data = sp.data_ptr<acc_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const acc_t* row = data + i * cols;
      double s = 0.0;
      for (int64_t j = 0; j < cols; ++j) {
        const double x = static_cast<double>(row[j]);
        s += norm == 1 ? std::abs(x) : x * x;
      }
      score[i] += s;
    }
  });
}

// Scores of one m x n gradient; `c` is the basis already in the accumulation type `acc`
// (contiguous), so a list of gradients converts it once.
at::Tensor dct_scores_2d_prepared(const at::Tensor& grad, const at::Tensor& c, at::ScalarType acc, bool right,
                                  int64_t norm) {
  const int64_t m = grad.size(0), n = grad.size(1);
  const int64_t s = right ? n : m;
  std::vector<double> score(s, 0.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "dct_scores_cpu", [&] {
    if (right) {
      // S[rows] = G[rows] C^T, one panel of gradient rows at a time; column sums.
      const at::Tensor ct = c.t();
      const int64_t pr = panel_len(n);
      for (int64_t r0 = 0; r0 < m; r0 += pr) {
        const int64_t len = std::min(pr, m - r0);
        const at::Tensor sp = at::mm(grad.narrow(0, r0, len).to(acc), ct).contiguous();
        accumulate_columns<scalar_t>(sp, score, 0, static_cast<int>(norm));
      }
    } else {
      // S[:, cols] = C G[:, cols], one panel of gradient columns at a time; row sums.
      const int64_t pc = panel_len(m);
      for (int64_t c0 = 0; c0 < n; c0 += pc) {
        const int64_t len = std::min(pc, n - c0);
        const at::Tensor sp = at::mm(c, grad.narrow(1, c0, len).to(acc)).contiguous();
        accumulate_rows<scalar_t>(sp, score, static_cast<int>(norm));
      }
    }
  });
  at::Tensor out = at::empty({s}, grad.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "dct_scores_cpu_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < s; ++j) {
      o[j] = static_cast<scalar_t>(norm == 1 ? score[j] : std::sqrt(score[j]));
    }
  });
  return out;
}

at::Tensor dct_scores_2d(const at::Tensor& grad, const at::Tensor& basis, c10::string_view side, int64_t norm) {
  TORCH_CHECK(norm == 1 || norm == 2);
  TORCH_CHECK(grad.dim() == 2 && basis.dim() == 2);
  const bool right = is_right(side);
  const int64_t s = right ? grad.size(1) : grad.size(0);
  TORCH_CHECK(basis.size(0) == s && basis.size(1) == s);
  const auto acc = acc_type(grad, basis);
  return dct_scores_2d_prepared(grad, basis.to(acc).contiguous(), acc, right, norm);  // s x s, the basis' size only
}

template <typename scalar_t>
at::Tensor topk_indices(const at::Tensor& scores, int64_t k) {
  const int64_t s = scores.size(0);
  const scalar_t* v = scores.data_ptr<scalar_t>();
  std::vector<int64_t> order(s);
  topk_order(v, order.data(), s, k);
  at::Tensor out = at::empty({k}, scores.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < k; ++i) o[i] = static_cast<int32_t>(order[i]);
  return out;
}

}  // namespace

// A 3-D grad (batch x m x n) is scored matrix by matrix: batch x s scores.
at::Tensor dct_scores_cpu(const at::Tensor& grad, const at::Tensor& basis, c10::string_view side, int64_t norm) {
  if (grad.dim() != 3) return dct_scores_2d(grad, basis, side, norm);
  std::vector<at::Tensor> rows;
  rows.reserve(grad.size(0));
  for (int64_t b = 0; b < grad.size(0); ++b) rows.push_back(dct_scores_2d(grad.select(0, b), basis, side, norm));
  if (rows.empty()) {
    const int64_t s = is_right(side) ? grad.size(2) : grad.size(1);
    return at::empty({0, s}, grad.options().dtype(acc_type(grad, basis)));
  }
  return at::stack(rows);
}

at::Tensor dct_score_topk_cpu(const at::Tensor& grad, const at::Tensor& basis, int64_t k, c10::string_view side,
                              int64_t norm) {
  const at::Tensor scores = dct_scores_cpu(grad, basis, side, norm);
  const int64_t s = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= s);
  if (scores.dim() == 1) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dct_score_topk_cpu", [&] { out = topk_indices<scalar_t>(scores, k); });
    return out;
  }
  at::Tensor out = at::empty({scores.size(0), k}, scores.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dct_score_topk_cpu", [&] {
    for (int64_t b = 0; b < scores.size(0); ++b) out.select(0, b).copy_(topk_indices<scalar_t>(scores.select(0, b), k));
  });
  return out;
}

// The list form: len(grads) x k indices, row i those of grads[i] scored alone (the same
// panels, the same order), one dispatcher call for a whole bucket of same-shape gradients.
at::Tensor dct_foreach_score_topk_cpu(at::TensorList grads, const at::Tensor& basis, int64_t k, c10::string_view side,
                                      int64_t norm) {
  TORCH_CHECK(norm == 1 || norm == 2);
  const bool right = is_right(side);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == basis.size(1));
  const int64_t s = basis.size(0);
  TORCH_CHECK(k >= 1 && k <= s);
  const int64_t nb = static_cast<int64_t>(grads.size());
  // Every entry is checked before anything is computed.
  for (int64_t i = 0; i < nb; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.dim() == 2 && (right ? g.size(1) : g.size(0)) == s);
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type() && g.device() == basis.device());
  }
  at::Tensor out = at::empty({nb, k}, basis.options().dtype(at::kInt));
  if (nb == 0) return out;
  const auto acc = acc_type(grads[0], basis);
  const at::Tensor c = basis.to(acc).contiguous();
  for (int64_t i = 0; i < nb; ++i) {
    const at::Tensor scores = dct_scores_2d_prepared(grads[i], c, acc, right, norm);
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dct_foreach_score_topk_cpu",
                               [&] { out.select(0, i).copy_(topk_indices<scalar_t>(scores, k)); });
  }
  return out;
}

}  // namespace lowrank_kernels
