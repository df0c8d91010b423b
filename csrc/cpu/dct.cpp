// C++ CPU kernels of the DCT family (lowrank_kernels/ops/dct.py has the schemas and
// lowrank_kernels/reference/dct.py the specification).
//
// Scoring: the score matrix S (G C^T on the right, C G on the left) is produced one
// bounded panel at a time by BLAS (at::mm), and each panel's |S| or S^2 is folded
// into a double score accumulator right away, so S never exists in full. The panel
// order and each element's summation order are fixed: the result is deterministic.
// Top-k: a partial sort with a total order (score descending, NaN first, ties to the
// lower index), the reference's stable descending sort.
//
// Projection with basis indices: the r selected basis rows are gathered into a
// transient r x s buffer (the projector's size, freed when the call returns, never
// stored), then the projection family's math runs on panels: R = G P^T / P^T G with the
// Adam epilogue, and W <- decay W + alpha back(N) with addmm on panels of W, so a
// 16-bit W or G is never converted as a whole.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

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

at::ScalarType acc_type(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble || c.scalar_type() == at::kDouble)
             ? at::kDouble
             : at::kFloat;
}

bool is_right(c10::string_view side) {
  TORCH_CHECK(side == "right" || side == "left", "side must be 'left' or 'right', got ", side);
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

at::Tensor dct_scores_2d(const at::Tensor& grad, const at::Tensor& basis, c10::string_view side, int64_t norm) {
  TORCH_CHECK(norm == 1 || norm == 2, "dct_scores: norm must be 1 or 2, got ", norm);
  TORCH_CHECK(grad.dim() == 2 && basis.dim() == 2, "dct_scores: grad and basis must be 2-D");
  const bool right = is_right(side);
  const int64_t m = grad.size(0), n = grad.size(1);
  const int64_t s = right ? n : m;
  TORCH_CHECK(basis.size(0) == s && basis.size(1) == s, "dct_scores: basis must be ", s, " x ", s);
  const auto acc = acc_type(grad, basis);
  const at::Tensor c = basis.to(acc).contiguous();  // s x s, the basis' size only
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

template <typename scalar_t>
at::Tensor topk_indices(const at::Tensor& scores, int64_t k) {
  const int64_t s = scores.size(0);
  const scalar_t* v = scores.data_ptr<scalar_t>();
  std::vector<int64_t> order(s);
  std::iota(order.begin(), order.end(), 0);
  // Total order: NaN first, then descending score, ties to the lower index.
  auto before = [v](int64_t a, int64_t b) {
    const bool na = std::isnan(v[a]), nb = std::isnan(v[b]);
    if (na || nb) {
      if (na && nb) return a < b;
      return na;
    }
    if (v[a] != v[b]) return v[a] > v[b];
    return a < b;
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
  at::Tensor out = at::empty({k}, scores.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < k; ++i) o[i] = static_cast<int32_t>(order[i]);
  return out;
}

at::Tensor dct_score_topk_cpu(const at::Tensor& grad, const at::Tensor& basis, int64_t k, c10::string_view side,
                              int64_t norm) {
  const at::Tensor scores = dct_scores_cpu(grad, basis, side, norm);
  const int64_t s = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= s, "dct_score_topk: k must be between 1 and ", s, ", got ", k);
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

// ----------------------------------------------------------------------------- projection
// The selected basis rows C[idx] (r x s) in the compute dtype; P = rows (right) or rows^T (left).
at::Tensor gathered_rows(const at::Tensor& basis, const at::Tensor& indices, at::ScalarType acc) {
  return basis.index_select(0, indices.to(at::kLong)).to(acc).contiguous();
}

// R = G P^T (right, m x r) or P^T G (left, r x n) in the compute dtype, on panels of G.
at::Tensor project_rows(const at::Tensor& grad, const at::Tensor& rows, bool right, at::ScalarType acc) {
  const int64_t m = grad.size(0), n = grad.size(1), r = rows.size(0);
  if (grad.scalar_type() == acc) {
    return right ? at::mm(grad, rows.t()) : at::mm(rows, grad);
  }
  at::Tensor out = at::empty(right ? std::vector<int64_t>{m, r} : std::vector<int64_t>{r, n}, grad.options().dtype(acc));
  if (right) {
    const int64_t pr = panel_len(n);
    for (int64_t r0 = 0; r0 < m; r0 += pr) {
      const int64_t len = std::min(pr, m - r0);
      at::Tensor o = out.narrow(0, r0, len);
      at::mm_out(o, grad.narrow(0, r0, len).to(acc), rows.t());
    }
  } else {
    const int64_t pc = panel_len(m);
    for (int64_t c0 = 0; c0 < n; c0 += pc) {
      const int64_t len = std::min(pc, n - c0);
      at::Tensor o = at::mm(rows, grad.narrow(1, c0, len).to(acc));
      out.narrow(1, c0, len).copy_(o);
    }
  }
  return out;
}

// Adam moments in place from R (compute dtype, contiguous); returns N in the moments' dtype.
at::Tensor adam_epilogue(const at::Tensor& r, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double beta1, double beta2,
                         double eps) {
  at::Tensor ea = exp_avg.contiguous();
  at::Tensor eas = exp_avg_sq.contiguous();
  at::Tensor out = at::empty_like(ea, at::MemoryFormat::Contiguous);
  const int64_t total = r.numel();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "dct_adam_epilogue", [&] {
    using acc_t = scalar_t;
    const acc_t* rv = r.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ea.scalar_type(), "dct_adam_epilogue_m", [&] {
      scalar_t* mv = ea.data_ptr<scalar_t>();
      scalar_t* vv = eas.data_ptr<scalar_t>();
      scalar_t* ov = out.data_ptr<scalar_t>();
      const acc_t b1 = static_cast<acc_t>(beta1), b2 = static_cast<acc_t>(beta2), e = static_cast<acc_t>(eps);
      const acc_t ob1 = static_cast<acc_t>(1.0 - beta1), ob2 = static_cast<acc_t>(1.0 - beta2);
      at::parallel_for(0, total, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t g = rv[i];
          const acc_t mm = b1 * static_cast<acc_t>(mv[i]) + ob1 * g;
          const acc_t vv2 = b2 * static_cast<acc_t>(vv[i]) + ob2 * g * g;
          mv[i] = static_cast<scalar_t>(mm);
          vv[i] = static_cast<scalar_t>(vv2);
          ov[i] = static_cast<scalar_t>(mm / (std::sqrt(vv2) + e));
        }
      });
    });
  });
  if (!ea.is_same(exp_avg)) exp_avg.copy_(ea);
  if (!eas.is_same(exp_avg_sq)) exp_avg_sq.copy_(eas);
  return out;
}

// W <- decay W + alpha back(N): right back(N) = N rows (panels of W's rows), left
// back(N) = rows^T N (panels of W's columns).
void backproject_rows(at::Tensor& param, const at::Tensor& update, const at::Tensor& rows, bool right, double alpha,
                      double decay, at::ScalarType acc) {
  const int64_t m = param.size(0), n = param.size(1);
  const at::Tensor u = update.to(acc);
  if (param.scalar_type() == acc && param.is_contiguous()) {
    if (right) {
      param.addmm_(u, rows, decay, alpha);
    } else {
      param.addmm_(rows.t(), u, decay, alpha);
    }
    return;
  }
  if (right) {
    const int64_t pr = panel_len(n);
    for (int64_t r0 = 0; r0 < m; r0 += pr) {
      const int64_t len = std::min(pr, m - r0);
      at::Tensor wp = param.narrow(0, r0, len);
      at::Tensor tmp = wp.to(acc).contiguous();
      tmp.addmm_(u.narrow(0, r0, len), rows, decay, alpha);
      wp.copy_(tmp);
    }
  } else {
    const int64_t pc = panel_len(m);
    for (int64_t c0 = 0; c0 < n; c0 += pc) {
      const int64_t len = std::min(pc, n - c0);
      at::Tensor wp = param.narrow(1, c0, len);
      at::Tensor tmp = wp.to(acc).contiguous();
      tmp.addmm_(rows.t(), u.narrow(1, c0, len), decay, alpha);
      wp.copy_(tmp);
    }
  }
}

at::Tensor dct_project_cpu(const at::Tensor& grad, const at::Tensor& basis, const at::Tensor& indices,
                           c10::string_view side) {
  const bool right = is_right(side);
  const auto acc = acc_type(grad, basis);
  return project_rows(grad, gathered_rows(basis, indices, acc), right, acc);
}

at::Tensor dct_project_adam_cpu(const at::Tensor& grad, const at::Tensor& basis, const at::Tensor& indices,
                                at::Tensor& exp_avg, at::Tensor& exp_avg_sq, c10::string_view side, double beta1,
                                double beta2, double eps) {
  const bool right = is_right(side);
  const auto acc = acc_type(grad, basis, exp_avg);
  const at::Tensor r = project_rows(grad, gathered_rows(basis, indices, acc), right, acc).contiguous();
  return adam_epilogue(r, exp_avg, exp_avg_sq, beta1, beta2, eps);
}

void dct_backproject_apply_cpu(at::Tensor& param, const at::Tensor& update, const at::Tensor& basis,
                               const at::Tensor& indices, c10::string_view side, double alpha, double decay) {
  const bool right = is_right(side);
  const auto acc = acc_type(param, update, basis);
  backproject_rows(param, update, gathered_rows(basis, indices, acc), right, alpha, decay, acc);
}

void dct_project_update_backproject_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& basis,
                                        const at::Tensor& indices, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                        c10::string_view side, double lr, double beta1, double beta2, double eps,
                                        int64_t step, double weight_decay, double scale) {
  const bool right = is_right(side);
  const bool f64 = param.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble ||
                   basis.scalar_type() == at::kDouble || exp_avg.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const at::Tensor rows = gathered_rows(basis, indices, acc);
  const at::Tensor r = project_rows(grad, rows, right, acc).contiguous();
  const at::Tensor nrm = adam_epilogue(r, exp_avg, exp_avg_sq, beta1, beta2, eps);  // rounded to the moments' dtype
  const double step_size =
      lr * std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))) / (1.0 - std::pow(beta1, static_cast<double>(step)));
  backproject_rows(param, nrm, rows, right, -step_size * scale, 1.0 - lr * weight_decay, acc);
}

}  // namespace
}  // namespace lowrank_kernels

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {
  m.def("dct_scores_cpu(Tensor grad, Tensor basis, str side, int norm) -> Tensor");
  m.def("dct_score_topk_cpu(Tensor grad, Tensor basis, int k, str side, int norm) -> Tensor");
  m.def("dct_project_cpu(Tensor grad, Tensor basis, Tensor indices, str side) -> Tensor");
  m.def(
      "dct_project_adam_cpu(Tensor grad, Tensor basis, Tensor indices, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, "
      "str side, float beta1, float beta2, float eps) -> Tensor");
  m.def(
      "dct_backproject_apply_cpu(Tensor(a!) param, Tensor update, Tensor basis, Tensor indices, str side, "
      "float alpha, float decay) -> ()");
  m.def(
      "dct_project_update_backproject_cpu(Tensor(a!) param, Tensor grad, Tensor basis, Tensor indices, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, str side, float lr, float beta1, float beta2, float eps, int step, "
      "float weight_decay, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("dct_scores_cpu", &lowrank_kernels::dct_scores_cpu);
  m.impl("dct_score_topk_cpu", &lowrank_kernels::dct_score_topk_cpu);
  m.impl("dct_project_cpu", &lowrank_kernels::dct_project_cpu);
  m.impl("dct_project_adam_cpu", &lowrank_kernels::dct_project_adam_cpu);
  m.impl("dct_backproject_apply_cpu", &lowrank_kernels::dct_backproject_apply_cpu);
  m.impl("dct_project_update_backproject_cpu", &lowrank_kernels::dct_project_update_backproject_cpu);
}
