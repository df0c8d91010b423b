// C++ CPU kernels of the projection family (the specification is
// lowrank_kernels/reference/projection.py; the ops are defined in
// lowrank_kernels/ops/projection.py and reach these through the router):
//
//   projection_project_adam_cpu                 R = G P^T | P^T G, Adam moments in place, returns N
//   projection_backproject_apply_cpu            W <- decay W + alpha back(N) in place
//   projection_project_update_backproject_cpu   both, one GaLore-Adam step
//
// Orientation
// -----------
// side="left" is side="right" on transposed views (R^T = G^T P, back(N)^T = N^T P^T), so
// the driver works in the "right" orientation only: G, W are (rows x K), P is (r x K),
// the moments and N are (rows x r). K is the dimension shared with the projector (n for
// right, m for left). A transposed view costs nothing: at::mm takes either memory order,
// the element-wise loops run in the memory order of their main operand, and the scratch
// buffers are laid out like the tensors they stand in for.
//
// Panels
// ------
// Nothing of full (m x n) size is ever allocated: the work runs over bounded panels with
// thread-local scratch, under at::parallel_for (at::mm is single-threaded inside it):
//   project  row panels of G (rows i0..i1, all of K): G_panel in acc (a view when it
//            already is), R_panel = G_panel P^T with at::mm, then the Adam epilogue on
//            those rows of the moments. R depends on those rows of G only, so nothing is
//            split along K and the nonlinear epilogue sees finished sums.
//   apply    panels of W along its outer memory dimension, so that the element-wise pass
//            streams contiguous memory: row panels (C = N_panel P) or, for a weight whose
//            oriented view is column-major (side="left" on a row-major W), panels of K
//            (C = N P[:, k0:k1], which are row panels of the original W). C goes to acc
//            scratch by at::mm, then one pass W <- decay W + alpha C in W's dtype.
// When the moments' rows and W's rows are both contiguous (side="right", row-major
// tensors), the fused step does both per row panel in one pass over G and W. Otherwise
// (side="left") it runs the two phases one after the other, with N kept in acc (low-rank
// sized, like the moments) in between; G and W are still each read (W written) once.
// The Adam epilogue on column-major moments runs once over the whole low-rank tensors in
// memory order (vectorized ATen ops), after the panel GEMMs.
//
// Accumulation is float32, or float64 when any input is float64, as in the reference;
// the Adam epilogue uses the reference's very operations (so N matches it bit for bit
// given the same R), and the weight update rounds as the reference does:
// fl(fl(W * decay) + alpha * C), stored once in W's dtype.
//
// The projector
// -------------
// The kernels read the projector only through ProjectorSource::panel(k0, len, acc,
// scratch): columns [k0, k0 + len) of P (r x K, right orientation) in the accumulation
// dtype. The apply phase over K panels asks for exactly its panel; the row-panel loops
// need all of P and assemble it once per call (materialize(): panels filled in parallel;
// r x K, the size of one moment; a plain view for a dense projector already in acc).
// To serve a structured projector, add its fields and a branch to panel(); the GEMM and
// epilogue code stays as it is:
//   - DCT indices (P = C[idx]: C the shared s x s DCT basis, idx an int vector of r rows):
//     right: the panel is rows idx of C, columns k0..k0+len
//     (C.narrow(1, k0, len).index_select(0, idx), or a gather loop into `scratch`);
//     left: P = C[idx]^T, whose right orientation is again C[idx]: the same gather.
//   - INT4 (two nibbles per byte, even index in the low nibble, (scale, min) per group of
//     consecutive elements of the stored projector): dequantize x = min + scale * q for
//     the groups covering the panel into `scratch` (with side="left" the stored layout is
//     m x r, so a K panel is a run of whole stored rows).
// A new op for such a projector takes its own arguments (basis + idx, or packed + scales
// + mins), builds the ProjectorSource, and calls run() below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace lowrank_kernels {
namespace {

using at::Tensor;

// Panel size: about kPanelElems elements of the big matrix, and at least
// kPanelRankMult * r along the panel dimension, so that re-reading the (r-sized) other
// GEMM operand per panel is amortized and the GEMMs are not skinny.
constexpr int64_t kPanelElems = 1 << 16;
constexpr int64_t kPanelRankMult = 4;
constexpr int64_t kMinPanel = 8;

// --------------------------------------------------------------------------- the projector
struct ProjectorSource {
  // A dense projector in right orientation (r x K), any floating dtype and strides.
  Tensor dense;

  int64_t rank() const { return dense.size(0); }
  int64_t k() const { return dense.size(1); }

  // Columns [k0, k0 + len) of P in dtype `acc`: a view when the dense projector already
  // has that dtype, else converted into `scratch` (at least r * len elements of acc).
  Tensor panel(int64_t k0, int64_t len, at::ScalarType acc, const Tensor& scratch) const {
    Tensor src = dense.narrow(1, k0, len);
    if (src.scalar_type() == acc) return src;
    Tensor out = scratch.narrow(0, 0, rank() * len).view({rank(), len});
    out.copy_(src);
    return out;
  }

  // The whole P (r x K) in dtype `acc`, assembled from panels in parallel.
  Tensor materialize(at::ScalarType acc) const {
    if (dense.scalar_type() == acc) return dense;
    Tensor out = at::empty({rank(), k()}, dense.options().dtype(acc));
    const int64_t chunk = std::max<int64_t>(64, kPanelElems / std::max<int64_t>(rank(), 1));
    const int64_t nchunks = (k() + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      Tensor scratch = at::empty({rank() * chunk}, out.options());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * chunk;
        const int64_t len = std::min(chunk, k() - k0);
        Tensor p = panel(k0, len, acc, scratch);
        out.narrow(1, k0, len).copy_(p);
      }
    });
    return out;
  }
};

// --------------------------------------------------------------------------- helpers
// Whether the memory order of a 2-D view is column-major (dim 0 has the smaller stride).
bool col_major(const Tensor& t) {
  if (t.size(0) <= 1) return false;
  if (t.size(1) <= 1) return true;
  return t.stride(0) < t.stride(1);
}

// A (rows x cols) scratch view of `storage` (flat, at least rows * cols elements), row-
// or column-major.
Tensor scratch_view(const Tensor& storage, int64_t rows, int64_t cols, bool colmaj) {
  Tensor flat = storage.narrow(0, 0, rows * cols);
  return colmaj ? flat.view({cols, rows}).t() : flat.view({rows, cols});
}

// `view` in dtype `acc`: itself when it already has it, else a copy into scratch laid out
// like it.
Tensor as_acc(const Tensor& view, at::ScalarType acc, const Tensor& storage) {
  if (view.scalar_type() == acc) return view;
  Tensor buf = scratch_view(storage, view.size(0), view.size(1), col_major(view));
  buf.copy_(view);
  return buf;
}

bool same_view(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

Tensor empty_flat(bool needed, int64_t numel, const at::TensorOptions& opts) {
  return needed ? at::empty({numel}, opts) : Tensor();
}

// Panel length along a dimension of length `len` whose panels span `other` elements
// each: bounded, at least kPanelRankMult * r, and at least one panel per thread.
int64_t panel_len(int64_t len, int64_t other, int64_t r) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t b = std::max<int64_t>({kMinPanel, kPanelElems / std::max<int64_t>(other, 1), kPanelRankMult * r});
  b = std::min(b, (len + nthreads - 1) / nthreads);
  return std::max<int64_t>(1, std::min(b, len));
}

// --------------------------------------------------------------------------- epilogues
// Adam on matching (rows x r) views: R in acc, the moments and N in the moments' dtype
// (N may be undefined). The reference's operations, in acc, as vectorized ATen ops (on a
// panel inside a parallel region they run single-threaded; on whole tensors ATen
// parallelizes them). `m_buf`, `v_buf`: scratch for moments not in acc. On return R
// holds N in acc; with `round_r`, N rounded to the moments' dtype (the step
// back-projects the rounded N, as the reference does).
void adam_epilogue(const Tensor& R, const Tensor& ea, const Tensor& eas, const Tensor& N, double beta1, double beta2,
                   double eps, bool round_r, const Tensor& m_buf, const Tensor& v_buf) {
  const at::ScalarType acc = R.scalar_type();
  const bool in_place = ea.scalar_type() == acc;
  Tensor m = in_place ? ea : as_acc(ea, acc, m_buf);
  Tensor v = in_place ? eas : as_acc(eas, acc, v_buf);
  m.mul_(beta1).add_(R, 1.0 - beta1);
  v.mul_(beta2).addcmul_(R, R, 1.0 - beta2);
  if (!in_place) {
    ea.copy_(m);
    eas.copy_(v);
  }
  Tensor r = R;  // a handle, so the out= overloads can take it
  at::sqrt_out(r, v);
  r.add_(eps);
  at::div_out(r, m, r);
  if (N.defined() && !same_view(N, R)) {
    N.copy_(R);
    if (round_r && N.scalar_type() != acc) r.copy_(N);
  } else if (round_r && ea.scalar_type() != acc) {
    r.copy_(r.to(ea.scalar_type()));
  }
}

// W <- decay * W + alpha * C on one contiguous-or-strided row, rounded once to W's dtype.
template <bool kContig, typename acc_t, typename w_t>
inline void apply_row(int64_t len, w_t* w, int64_t ws, const acc_t* c, int64_t cs, acc_t decay, acc_t alpha) {
  for (int64_t j = 0; j < len; ++j) {
    const int64_t jw = kContig ? j : j * ws, jc = kContig ? j : j * cs;
    const acc_t wd = static_cast<acc_t>(w[jw]) * decay;
    w[jw] = static_cast<w_t>(wd + alpha * c[jc]);
  }
}

// The reference: param.to(acc).mul_(decay).add_(back, alpha=alpha), then stored. One pass
// in W's memory order; W (any float dtype), C (acc) of the same shape.
template <typename acc_t, typename w_t>
void apply_epilogue(const Tensor& W, const Tensor& C, double decay, double alpha) {
  const bool tr = col_major(W);
  const int64_t outer = tr ? W.size(1) : W.size(0);
  const int64_t inner = tr ? W.size(0) : W.size(1);
  const int64_t ws0 = tr ? W.stride(1) : W.stride(0), ws1 = tr ? W.stride(0) : W.stride(1);
  const int64_t cs0 = tr ? C.stride(1) : C.stride(0), cs1 = tr ? C.stride(0) : C.stride(1);
  w_t* w = W.data_ptr<w_t>();
  const acc_t* c = C.const_data_ptr<acc_t>();
  const acc_t d = static_cast<acc_t>(decay), a = static_cast<acc_t>(alpha);
  for (int64_t i = 0; i < outer; ++i) {
    if (ws1 == 1 && cs1 == 1) {
      apply_row<true>(inner, w + i * ws0, 1, c + i * cs0, 1, d, a);
    } else {
      apply_row<false>(inner, w + i * ws0, ws1, c + i * cs0, cs1, d, a);
    }
  }
}

void run_apply_epilogue(const Tensor& W, const Tensor& C, double decay, double alpha) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "projection_apply_epilogue", [&] {
    if (C.scalar_type() == at::kDouble) {
      apply_epilogue<double, scalar_t>(W, C, decay, alpha);
    } else {
      apply_epilogue<float, scalar_t>(W, C, decay, alpha);
    }
  });
}

// --------------------------------------------------------------------------- the driver
// Everything in right orientation. Undefined tensors switch stages off:
//   project: g, ea, eas defined, n where N is written (undefined: not wanted);
//   apply: w defined, and either project or upd.
struct Problem {
  Tensor g;           // rows x K   grad
  Tensor upd;         // rows x r   update (backproject_apply)
  Tensor ea, eas, n;  // rows x r   moments, N
  Tensor w;           // rows x K   param
  double beta1 = 0, beta2 = 0, eps = 0, decay = 1, alpha = 0;
};

void run(const Problem& pb, const ProjectorSource& src, at::ScalarType acc) {
  const bool project = pb.g.defined();
  const bool apply = pb.w.defined();
  const Tensor& big = project ? pb.g : pb.w;
  const int64_t rows = big.size(0), K = big.size(1), r = src.rank();
  TORCH_INTERNAL_ASSERT(r >= 1 && rows >= 1 && K >= 1);
  const auto opts = big.options().dtype(acc);

  // Which loops run: the Adam epilogue per row panel when the moments' rows are
  // contiguous, the weight update per row panel when W's rows are, else over K panels.
  const bool adam_by_panel = project && !col_major(pb.ea);
  const bool w_by_rows = apply && !col_major(pb.w);
  const bool apply_in_row_loop = w_by_rows && (!project || adam_by_panel);
  const bool row_loop = project || apply_in_row_loop;
  // R (then N) in acc for all rows, when the row loop does not finish the job per panel.
  // With N in acc (project_adam on float32 moments), R is computed into N's storage.
  Tensor r_full;
  if (project && !apply && pb.n.defined() && pb.n.scalar_type() == acc) {
    r_full = pb.n;
  } else if (project && !(adam_by_panel && (!apply || apply_in_row_loop))) {
    r_full = col_major(pb.ea) ? at::empty({r, rows}, opts).t() : at::empty({rows, r}, opts);
  }

  if (row_loop) {
    const Tensor P = src.materialize(acc);  // r x K
    const Tensor PT = P.t();
    const int64_t bm = panel_len(rows, K, r);
    const int64_t npanels = (rows + bm - 1) / bm;
    const bool lr_cm = project ? col_major(pb.ea) : col_major(pb.upd);
    const bool mom_conv = adam_by_panel && pb.ea.scalar_type() != acc;
    const bool need_big = (project && pb.g.scalar_type() != acc) || apply_in_row_loop;
    const bool need_low = (project && !r_full.defined()) || (!project && pb.upd.scalar_type() != acc);
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
      // Thread-local scratch, reused across this thread's panels. `big_buf` holds the
      // gradient panel in acc, then the back-projected panel (never both at once).
      const Tensor big_buf = empty_flat(need_big, bm * K, opts);
      const Tensor low_buf = empty_flat(need_low, bm * r, opts);
      const Tensor m_buf = empty_flat(mom_conv, bm * r, opts);
      const Tensor v_buf = empty_flat(mom_conv, bm * r, opts);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i0 = p * bm, len = std::min(bm, rows - i0);
        Tensor Np;  // this panel's R, then N (or the update), in acc
        if (project) {
          Np = r_full.defined() ? r_full.narrow(0, i0, len) : scratch_view(low_buf, len, r, lr_cm);
          const Tensor Gp = as_acc(pb.g.narrow(0, i0, len), acc, big_buf);
          at::mm_out(Np, Gp, PT);
          if (adam_by_panel) {
            adam_epilogue(Np, pb.ea.narrow(0, i0, len), pb.eas.narrow(0, i0, len),
                          pb.n.defined() ? pb.n.narrow(0, i0, len) : Tensor(), pb.beta1, pb.beta2, pb.eps,
                          /*round_r=*/apply, m_buf, v_buf);
          }
        } else {
          Np = as_acc(pb.upd.narrow(0, i0, len), acc, low_buf);
        }
        if (apply_in_row_loop) {
          const Tensor Wp = pb.w.narrow(0, i0, len);
          Tensor C = scratch_view(big_buf, len, K, col_major(Wp));
          at::mm_out(C, Np, P);
          run_apply_epilogue(Wp, C, pb.decay, pb.alpha);
        }
      }
    });
  }
  if (project && !adam_by_panel) {
    // Column-major moments: one pass over the whole low-rank tensors, in memory order.
    const Tensor none;
    const Tensor mb = pb.ea.scalar_type() != acc ? at::empty({rows * r}, opts) : none;
    const Tensor vb = pb.ea.scalar_type() != acc ? at::empty({rows * r}, opts) : none;
    adam_epilogue(r_full, pb.ea, pb.eas, pb.n, pb.beta1, pb.beta2, pb.eps, /*round_r=*/apply, mb, vb);
  }
  if (apply && !apply_in_row_loop) {
    // W's rows are strided (side="left" on a row-major W): panels of K, i.e. of W's outer
    // memory dimension; C = N P[:, k0:k1] with P's panels from the source.
    const Tensor Nf = project ? r_full : pb.upd.to(acc);
    const int64_t bk = panel_len(K, rows, r);
    const int64_t npanels = (K + bk - 1) / bk;
    const bool w_cm = col_major(pb.w);
    at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
      const Tensor c_buf = at::empty({rows * bk}, opts);
      const Tensor p_buf = at::empty({r * bk}, opts);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k0 = p * bk, len = std::min(bk, K - k0);
        const Tensor Pp = src.panel(k0, len, acc, p_buf);
        Tensor C = scratch_view(c_buf, rows, len, w_cm);
        at::mm_out(C, Nf, Pp);
        run_apply_epilogue(pb.w.narrow(1, k0, len), C, pb.decay, pb.alpha);
      }
    });
  }
}

// --------------------------------------------------------------------------- checks
// The router validates everything with clear messages before these ops run; these cheap
// checks guard direct calls of the _cpu ops.
bool is_left(c10::string_view side, const char* op) {
  TORCH_CHECK(side == "left" || side == "right", op, ": side must be 'left' or 'right', got '", std::string(side),
              "'");
  return side == "left";
}

void check_float_cpu(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must have a floating dtype (float32, bfloat16, float16, float64), got ", s);
}

void check_2d(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

// Checks proj against an (m x n) matrix; returns the low-rank shape.
std::vector<int64_t> check_projector(const char* op, int64_t m, int64_t n, const Tensor& proj, bool left) {
  check_float_cpu(proj, "proj", op);
  check_2d(proj, "proj", op);
  if (left) {
    TORCH_CHECK(proj.size(0) == m, op, ": side='left' needs proj of shape (m, rank) = (", m, ", rank), got ",
                proj.sizes());
  } else {
    TORCH_CHECK(proj.size(1) == n, op, ": side='right' needs proj of shape (rank, n) = (rank, ", n, "), got ",
                proj.sizes());
  }
  const int64_t rank = left ? proj.size(1) : proj.size(0);
  TORCH_CHECK(rank >= 1 && rank <= std::min(m, n), op, ": rank of proj (", rank,
              ") must be between 1 and min(m, n) = ", std::min(m, n));
  return left ? std::vector<int64_t>{rank, n} : std::vector<int64_t>{m, rank};
}

void check_moments(const char* op, const Tensor& ea, const Tensor& eas, at::IntArrayRef shape) {
  check_float_cpu(ea, "exp_avg", op);
  check_float_cpu(eas, "exp_avg_sq", op);
  TORCH_CHECK(ea.sizes() == shape, op, ": exp_avg must have shape ", shape, ", got ", ea.sizes());
  TORCH_CHECK(eas.sizes() == shape, op, ": exp_avg_sq must have shape ", shape, ", got ", eas.sizes());
  TORCH_CHECK(ea.scalar_type() == eas.scalar_type(), op, ": exp_avg (", ea.scalar_type(), ") and exp_avg_sq (",
              eas.scalar_type(), ") must have one dtype");
}

at::ScalarType acc_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (d == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// Right orientation of a side's tensors.
Tensor orient(const Tensor& t, bool left) { return left ? t.t() : t; }

// --------------------------------------------------------------------------- ops
Tensor projection_project_adam_cpu(const Tensor& grad, const Tensor& proj, Tensor& exp_avg, Tensor& exp_avg_sq,
                                   c10::string_view side, double beta1, double beta2, double eps) {
  const char* op = "projection_project_adam_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(grad, "grad", op);
  check_2d(grad, "grad", op);
  const auto shape = check_projector(op, grad.size(0), grad.size(1), proj, left);
  check_moments(op, exp_avg, exp_avg_sq, shape);

  Tensor out = at::empty(shape, exp_avg.options());
  Problem pb;
  pb.g = orient(grad, left);
  pb.ea = orient(exp_avg, left);
  pb.eas = orient(exp_avg_sq, left);
  pb.n = orient(out, left);
  pb.beta1 = beta1;
  pb.beta2 = beta2;
  pb.eps = eps;
  run(pb, ProjectorSource{orient(proj, left)},
      acc_dtype({grad.scalar_type(), proj.scalar_type(), exp_avg.scalar_type()}));
  return out;
}

void projection_backproject_apply_cpu(Tensor& param, const Tensor& update, const Tensor& proj, c10::string_view side,
                                      double alpha, double decay) {
  const char* op = "projection_backproject_apply_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(param, "param", op);
  check_2d(param, "param", op);
  const auto shape = check_projector(op, param.size(0), param.size(1), proj, left);
  check_float_cpu(update, "update", op);
  TORCH_CHECK(update.sizes() == at::IntArrayRef(shape), op, ": update must have shape ", at::IntArrayRef(shape),
              ", got ", update.sizes());

  Problem pb;
  pb.w = orient(param, left);
  pb.upd = orient(update, left);
  pb.decay = decay;
  pb.alpha = alpha;
  run(pb, ProjectorSource{orient(proj, left)},
      acc_dtype({param.scalar_type(), update.scalar_type(), proj.scalar_type()}));
}

void projection_project_update_backproject_cpu(Tensor& param, const Tensor& grad, const Tensor& proj,
                                               Tensor& exp_avg, Tensor& exp_avg_sq, c10::string_view side,
                                               double lr, double beta1, double beta2, double eps, int64_t step,
                                               double weight_decay, double scale) {
  const char* op = "projection_project_update_backproject_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(param, "param", op);
  check_float_cpu(grad, "grad", op);
  check_2d(param, "param", op);
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad must have shape ", param.sizes(),
              " (the parameter's shape), got ", grad.sizes());
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (1-based, after increment), got ", step);
  const auto shape = check_projector(op, param.size(0), param.size(1), proj, left);
  check_moments(op, exp_avg, exp_avg_sq, shape);

  const at::ScalarType acc =
      acc_dtype({param.scalar_type(), grad.scalar_type(), proj.scalar_type(), exp_avg.scalar_type()});
  // torch.optim.AdamW's bias correction folded into the step size, as the reference.
  const double t = static_cast<double>(step);
  const double step_size = lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
  Problem pb;
  pb.g = orient(grad, left);
  pb.ea = orient(exp_avg, left);
  pb.eas = orient(exp_avg_sq, left);
  pb.w = orient(param, left);
  if (exp_avg.scalar_type() != acc) {
    // N is rounded to the moments' dtype before the back-projection (as the reference);
    // this low-rank tensor holds the rounded values.
    pb.n = orient(at::empty(shape, exp_avg.options()), left);
  }
  pb.beta1 = beta1;
  pb.beta2 = beta2;
  pb.eps = eps;
  pb.decay = 1.0 - lr * weight_decay;
  pb.alpha = -step_size * scale;
  run(pb, ProjectorSource{orient(proj, left)}, acc);
}

}  // namespace
}  // namespace lowrank_kernels

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {
  m.def(
      "projection_project_adam_cpu(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, str side, "
      "float beta1, float beta2, float eps) -> Tensor");
  m.def(
      "projection_backproject_apply_cpu(Tensor(a!) param, Tensor update, Tensor proj, str side, float alpha, "
      "float decay) -> ()");
  m.def(
      "projection_project_update_backproject_cpu(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, str side, float lr, float beta1, float beta2, float eps, int step, "
      "float weight_decay, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("projection_project_adam_cpu", &lowrank_kernels::projection_project_adam_cpu);
  m.impl("projection_backproject_apply_cpu", &lowrank_kernels::projection_backproject_apply_cpu);
  m.impl("projection_project_update_backproject_cpu", &lowrank_kernels::projection_project_update_backproject_cpu);
}
