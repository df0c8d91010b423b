// The general engine of the projection family's C++ kernels (the specification is
// lowrank_kernels/reference/projection.py): run() serves the four single-tensor ops, the
// three projector kinds (projector.h) and the three moment formats. The fused step's small
// float32 dense/DCT case skips it for a path with no ATen op at all (fast_path.cpp); its
// float32 INT4 case with a one-GEMM apply computes the same as run() with the same ATen
// kernels called without the dispatcher (int4_path.cpp: keep the two in step).
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
// Nothing of full (m x n) size is ever allocated: the big matrices are processed in
// bounded panels (about kPanelElems elements, at most a quarter of the matrix), one after
// the other, each with one multi-threaded BLAS GEMM and multi-threaded element-wise ATen
// ops. (Measured on a 2-core CPU, this beats at::parallel_for over panels with a
// single-threaded at::mm each: the skinny per-panel GEMMs and per-panel epilogue ops
// lost to the reference's one multi-threaded GEMM, worst at low rank.)
//   project  R (rows x r, low-rank sized like the moments, laid out like them) in acc:
//            one GEMM G P^T when G already is in acc; else panels of G along its inner
//            memory dimension converted to acc: row panels, R_panel = G_panel P^T, or,
//            for a column-major oriented G (side="left" on a row-major grad), panels of
//            K accumulated into R in acc by the GEMM (R += G[:, k0:k1] P[:, k0:k1]^T, as
//            BLAS itself blocks K). Then the Adam epilogue, on finished sums, once over
//            the whole low-rank tensors (vectorized ATen ops).
//   apply    panels of W along its inner memory dimension (so each GEMM keeps all of W's
//            outer dimension, which BLAS splits well across threads): panels of K,
//            C = N P[:, k0:k1], for a row-major oriented W; row panels, C = N_panel P,
//            for a column-major one (side="left" on a row-major W: column panels of the
//            original). C goes to acc scratch laid out like W, then
//            W <- decay W + alpha C with ATen ops (through acc scratch for a W not in
//            acc, stored once in W's dtype).
// The fused step runs the two phases one after the other, with N kept in acc (low-rank
// sized) in between; G is read once, W read and written once.
//
// Accumulation is float32, or float64 when any input is float64, as in the reference;
// the Adam epilogue and the weight update use the reference's very ATen operations (so
// N matches it bit for bit given the same R, and W given the same C), and W is rounded
// once to its dtype.
//
//
// --------------
// The Adam epilogue serves the three moment formats of the ops (ops/projection.py):
//   - plain floating moments: the reference's ATen operations on the whole low-rank
//     tensors, as described above;
//   - bf16 moments with moment_seed >= 0: the same operations, then each updated moment
//     is stored with the hashed stochastic rounding of reference/moments.py
//     (moments8::store_bf16_sr; counters are the flat index in the moments' own
//     orientation, + numel for exp_avg_sq), bit-identical to the reference given R;
//   - 8-bit moments (uint8 codes + float32 absmax per block of <= block_size elements in
//     a row of the moment, in its own orientation): moments8::adam8_step, one row-block at
//     a time on the stack (dequantize, update in float32, N, requantize); no float32
//     moment of the low-rank shape is allocated. N is float32-valued, written over R.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/fast_f32.h"
#include "cpu/moments8.h"

#include <atomic>
#include <memory>
#include <string>
#include <vector>
#include "cpu/projection/engine.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cpu/moments8.h"

namespace lowrank_kernels {
namespace projection {
namespace {

// Panel size: about kPanelElems elements of the big matrix (projector.h), and at least
// kPanelRankMult * r along the panel dimension, so that re-reading the (r-sized) other
// GEMM operand per panel is amortized and the GEMMs are not skinny; at most 1/kMinPanels
// of the matrix, so no scratch approaches full size.
constexpr int64_t kPanelRankMult = 4;
constexpr int64_t kMinPanel = 8;
// Ranks up to this fit in one K block of the BLAS GEMMs (OpenBLAS and MKL block K by
// 256 or more for float32), so a BLAS update C += A B reads and rounds C once.
constexpr int64_t kBlasSingleKBlock = 128;
constexpr int64_t kMinPanels = 4;

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
// each: bounded, at least kPanelRankMult * r, and at most ceil(len / kMinPanels).
int64_t panel_len(int64_t len, int64_t other, int64_t r) {
  int64_t b = std::max<int64_t>({kMinPanel, kPanelElems / std::max<int64_t>(other, 1), kPanelRankMult * r});
  b = std::min(b, (len + kMinPanels - 1) / kMinPanels);
  return std::max<int64_t>(1, std::min(b, len));
}

// The part [start, start + len) of `t` along `dim`, unless `t` is undefined or broadcasts
// along `dim` (size 1).
Tensor bnarrow(const Tensor& t, int64_t dim, int64_t start, int64_t len) {
  if (!t.defined() || t.size(dim) == 1) return t;
  return t.narrow(dim, start, len);
}

// --------------------------------------------------------------------------- epilogues
// Adam on matching (rows x r) views: R in acc, the moments and N in the moments' dtype
// (N may be undefined). The reference's operations, in acc, as vectorized ATen ops, on
// the whole low-rank tensors (ATen parallelizes them). `m_buf`, `v_buf`: scratch for moments not in acc. On return R
// holds N in acc; with `round_r`, N rounded to the moments' dtype (the step
// back-projects the rounded N, as the reference does).
// `left`: the moments' own orientation is the transpose of these views (for the
// stochastic-rounding counters); `seed` >= 0: bf16 moments stored with stochastic rounding.
void adam_epilogue(const Tensor& R, const Tensor& ea, const Tensor& eas, const Tensor& N, double beta1, double beta2,
                   double eps, bool round_r, const Tensor& m_buf, const Tensor& v_buf, bool left = false,
                   int64_t seed = -1) {
  const at::ScalarType acc = R.scalar_type();
  const bool in_place = ea.scalar_type() == acc;
  Tensor m = in_place ? ea : as_acc(ea, acc, m_buf);
  Tensor v = in_place ? eas : as_acc(eas, acc, v_buf);
  m.mul_(beta1).add_(R, 1.0 - beta1);
  v.mul_(beta2).addcmul_(R, R, 1.0 - beta2);
  if (!in_place && seed >= 0) {
    TORCH_INTERNAL_ASSERT(ea.scalar_type() == at::kBFloat16);
    moments8::store_bf16_sr(left ? m.t() : m, left ? ea.t() : ea, seed, 0);
    moments8::store_bf16_sr(left ? v.t() : v, left ? eas.t() : eas, seed, ea.numel());
  } else if (!in_place) {
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

// The reference's weight update, param.to(acc).mul_(decay).add_(back, alpha=alpha), then
// stored: on a panel W (any float dtype) with C (acc, laid out like W), as vectorized,
// multi-threaded ATen ops. A W not in acc goes through `w_buf` (scratch laid out like it)
// and is rounded once. mul_ by a decay of exactly 1 is skipped (it changes nothing).
// Per-row factors (rd, ra: undefined, or acc tensors broadcasting against the panel)
// come first, in the reference's order: w = w * rd; C = C * ra; w = decay w + alpha C.
void run_apply_epilogue(const Tensor& W, const Tensor& C, double decay, double alpha, const Tensor& w_buf,
                        const Tensor& rd = Tensor(), const Tensor& ra = Tensor()) {
  const bool in_place = W.scalar_type() == C.scalar_type();
  Tensor w = in_place ? W : as_acc(W, C.scalar_type(), w_buf);
  if (rd.defined()) w.mul_(rd);
  if (ra.defined()) {
    Tensor c = C;  // a handle (C is scratch of this panel)
    c.mul_(ra);
  }
  if (decay != 1.0) w.mul_(decay);
  w.add_(C, alpha);
  if (!in_place) W.copy_(w);
}

// The 8-bit Adam epilogue: R (Nf, acc, right orientation) -> N written over R (float32
// values), the codes and absmax updated in place; N also into pb.n when that is another
// tensor (project_adam with acc float64).
void adam8_epilogue(const Problem& pb, const Tensor& Nf, at::ScalarType acc) {
  const Tensor Ro = pb.left ? Nf.t() : Nf;  // the moments' own orientation
  const Tensor cm = pb.left ? pb.ea.t() : pb.ea, cv = pb.left ? pb.eas.t() : pb.eas;
  TORCH_INTERNAL_ASSERT(cm.is_contiguous() && cv.is_contiguous() && pb.ma.is_contiguous() && pb.va.is_contiguous());
  const int64_t rows = Ro.size(0), cols = Ro.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "projection_adam8_epilogue", [&] {
    scalar_t* rp = Ro.data_ptr<scalar_t>();
    moments8::adam8_step<scalar_t, scalar_t>(rp, Ro.stride(0), Ro.stride(1), cm.data_ptr<uint8_t>(),
                                             cv.data_ptr<uint8_t>(), pb.ma.data_ptr<float>(),
                                             pb.va.data_ptr<float>(), rp, Ro.stride(0), Ro.stride(1), rows, cols,
                                             pb.block_size, pb.beta1, pb.beta2, pb.eps);
  });
  if (pb.n.defined() && !same_view(pb.n, Nf)) pb.n.copy_(Nf);
}

}  // namespace

void run(const Problem& pb, const ProjectorSource& given_src, at::ScalarType acc) {
  const ProjectorSource src = given_src.oriented();
  const bool project = pb.g.defined();
  const bool apply = pb.w.defined();
  const Tensor& big = project ? pb.g : pb.w;
  const int64_t rows = big.size(0), K = big.size(1), r = src.rank();
  TORCH_INTERNAL_ASSERT(r >= 1 && rows >= 1 && K >= 1);
  const auto opts = big.options().dtype(acc);
  // P (r x K) in acc, when a loop needs all of it (a view for a dense projector in acc).
  Tensor P;
  const auto whole_p = [&]() -> const Tensor& {
    if (!P.defined()) P = src.materialize(acc);
    return P;
  };

  // Nf: R, then N, in acc for all rows (low-rank sized, laid out like the moments); or
  // the update in acc.
  Tensor Nf;
  if (project) {
    if (!apply && pb.n.defined() && pb.n.scalar_type() == acc) {
      Nf = pb.n;  // project_adam on acc moments: R is computed into N's storage
    } else {
      Nf = col_major(pb.ea) ? at::empty({r, rows}, opts).t() : at::empty({rows, r}, opts);
    }
    const Tensor PT = whole_p().t();
    if (pb.g.scalar_type() == acc) {
      at::mm_out(Nf, pb.g, PT);  // one multi-threaded GEMM
    } else if (col_major(pb.g)) {
      // Panels of K (G's inner memory dimension: contiguous conversion) converted to acc,
      // one after the other, accumulated into R in acc by the GEMM (as BLAS itself
      // blocks K); the Adam epilogue runs after the last panel, on finished sums.
      const int64_t bk = panel_len(K, rows, r);
      const Tensor g_buf = at::empty({rows * bk}, opts);
      for (int64_t k0 = 0; k0 < K; k0 += bk) {
        const int64_t len = std::min(bk, K - k0);
        const Tensor Gk = as_acc(pb.g.narrow(1, k0, len), acc, g_buf);
        if (k0 == 0) {
          at::mm_out(Nf, Gk, PT.narrow(0, k0, len));
        } else {
          Nf.addmm_(Gk, PT.narrow(0, k0, len));
        }
      }
    } else {
      // Row panels of G converted to acc, one after the other (the conversion and the
      // GEMM are each multi-threaded); R's rows depend on G's rows only (no split of K).
      const int64_t bm = panel_len(rows, K, r);
      const Tensor g_buf = at::empty({bm * K}, opts);
      for (int64_t i0 = 0; i0 < rows; i0 += bm) {
        const int64_t len = std::min(bm, rows - i0);
        Tensor Rp = Nf.narrow(0, i0, len);
        at::mm_out(Rp, as_acc(pb.g.narrow(0, i0, len), acc, g_buf), PT);
      }
    }
    if (pb.ma.defined()) {  // 8-bit moments: the fused block loop, N over R
      adam8_epilogue(pb, Nf, acc);
    } else if (pb.ea.defined()) {  // else projection_project: R is the result
      const bool conv = pb.ea.scalar_type() != acc;
      const Tensor mb = empty_flat(conv, rows * r, opts), vb = empty_flat(conv, rows * r, opts);
      adam_epilogue(Nf, pb.ea, pb.eas, pb.n, pb.beta1, pb.beta2, pb.eps, /*round_r=*/apply, mb, vb, pb.left,
                    pb.seed);
    }
  } else if (apply) {
    Nf = pb.upd.scalar_type() == acc ? pb.upd : pb.upd.to(acc);
  }
  if (!apply) return;

  // W already in acc, stored so that BLAS can write it in place (rows or columns
  // contiguous), and a rank that fits one K block of the GEMM (so W is read and rounded
  // once, as in the reference): W <- decay W + alpha N P as ONE multi-threaded GEMM whose
  // epilogue is BLAS's own C = beta C + alpha A B, with beta = 1 after the decay. No
  // scratch at all, and one parallel region instead of two per panel.
  const bool row_factors = pb.rd.defined() || pb.ra.defined();
  if (!row_factors && pb.w.scalar_type() == acc && r <= kBlasSingleKBlock &&
      (pb.w.is_contiguous() || pb.w.t().is_contiguous())) {
    if (pb.decay != 1.0) pb.w.mul_(pb.decay);
    Tensor w = pb.w;  // a handle, so addmm_ can take it
    w.addmm_(Nf, whole_p(), /*beta=*/1.0, /*alpha=*/pb.alpha);
    return;
  }

  // W <- decay W + alpha back(N), over panels of W along its inner memory dimension (so
  // each GEMM keeps all of W's outer dimension, which BLAS splits well across threads),
  // one after the other: C = back(N) of the panel by a multi-threaded GEMM into acc
  // scratch laid out like W, then the element-wise pass, parallel over W's outer rows.
  if (!col_major(pb.w)) {
    // Row-major W: panels of K; C = N P[:, k0:k1] with P's panels from the source.
    const int64_t bk = panel_len(K, rows, r);
    const Tensor c_buf = at::empty({rows * bk}, opts);
    const Tensor w_buf = empty_flat(pb.w.scalar_type() != acc, rows * bk, opts);
    const Tensor p_buf = at::empty({r * bk}, opts);
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      const int64_t len = std::min(bk, K - k0);
      const Tensor Pp = P.defined() ? P.narrow(1, k0, len) : src.panel(k0, len, acc, p_buf);
      Tensor C = scratch_view(c_buf, rows, len, false);
      at::mm_out(C, Nf, Pp);
      run_apply_epilogue(pb.w.narrow(1, k0, len), C, pb.decay, pb.alpha, w_buf, bnarrow(pb.rd, 1, k0, len),
                         bnarrow(pb.ra, 1, k0, len));
    }
  } else {
    // Column-major W (side="left" on a row-major W): row panels, i.e. column panels of the
    // original W; C = N[i0:i1] P, column-major.
    const Tensor& Pw = whole_p();
    const int64_t bm = panel_len(rows, K, r);
    const Tensor c_buf = at::empty({bm * K}, opts);
    const Tensor w_buf = empty_flat(pb.w.scalar_type() != acc, bm * K, opts);
    for (int64_t i0 = 0; i0 < rows; i0 += bm) {
      const int64_t len = std::min(bm, rows - i0);
      Tensor C = scratch_view(c_buf, len, K, true);
      at::mm_out(C, Nf.narrow(0, i0, len), Pw);
      run_apply_epilogue(pb.w.narrow(0, i0, len), C, pb.decay, pb.alpha, w_buf, bnarrow(pb.rd, 0, i0, len),
                         bnarrow(pb.ra, 0, i0, len));
    }
  }
}

}  // namespace projection
}  // namespace lowrank_kernels
