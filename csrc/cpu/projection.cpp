// C++ CPU kernels of the projection family (the specification is
// lowrank_kernels/reference/projection.py; the ops are defined in
// lowrank_kernels/ops/projection.py and reach these through the router):
//
//   projection_project_cpu                      R = G P^T | P^T G (no epilogue)
//   projection_project_adam_cpu                 R, Adam moments in place, returns N
//   projection_backproject_apply_cpu            W <- decay W + alpha back(N) in place (optionally with
//                                               per-row factors: diag(row_decay), diag(row_alpha))
//   projection_project_update_backproject_cpu   both, one GaLore-Adam step
//
// Each takes the projector as (proj, indices?, q_scale?, q_min?, rank, group_size): a
// dense P, DCT basis rows picked by index, or a packed INT4 P (see "The projector"
// below). One engine (run()) serves all three kinds and all four ops; the fused step's
// small float32 dense/DCT case skips it for a path with no ATen op at all (see "The
// float32 fast path" below).
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
// The projector
// -------------
// The engine reads the projector only through ProjectorSource::panel(k0, len, acc,
// scratch): columns [k0, k0 + len) of P (r x K, right orientation) in the accumulation
// dtype, and materialize(acc), the whole r x K P (the size of one moment). The apply
// phase over K panels asks for exactly its panel; the row-panel loops need all of P and
// assemble it once per call. The three kinds:
//   - dense: a view (right orientation of proj) when already in acc, else converted;
//   - DCT (P = C[idx]: C the shared s x s DCT basis, idx an int vector of r rows; with
//     side="left" P = C[idx]^T, whose right orientation is again C[idx]): the panel is
//     rows idx of C, columns k0..k0+len, gathered and converted to acc;
//   - packed INT4 (two nibbles per byte, even index in the low nibble, float32 (scale,
//     min) per group of consecutive elements of the stored row-major P: r x n for
//     side="right", m x r for side="left"): x = min + scale * q, in float32 as the
//     reference, then converted to acc.
// The GEMM and epilogue code is the same for all three.
//
// Moment formats
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

namespace lowrank_kernels {
namespace {

using at::Tensor;

// Panel size: about kPanelElems elements of the big matrix, and at least
// kPanelRankMult * r along the panel dimension, so that re-reading the (r-sized) other
// GEMM operand per panel is amortized and the GEMMs are not skinny; at most 1/kMinPanels
// of the matrix, so no scratch approaches full size.
constexpr int64_t kPanelElems = 1 << 18;
constexpr int64_t kPanelRankMult = 4;
constexpr int64_t kMinPanel = 8;
// Ranks up to this fit in one K block of the BLAS GEMMs (OpenBLAS and MKL block K by
// 256 or more for float32), so a BLAS update C += A B reads and rounds C once.
constexpr int64_t kBlasSingleKBlock = 128;
constexpr int64_t kMinPanels = 4;

// --------------------------------------------------------------------------- the projector
enum class ProjKind { Dense, DCT, Int4 };

// Value f of a packed INT4 tensor in float32 (the reference's dequantization).
inline float int4_value(const uint8_t* pk, const float* s, const float* mn, int64_t f, int64_t gs) {
  const int q = (pk[f >> 1] >> ((f & 1) * 4)) & 15;
  const int64_t g = f / gs;
  return mn[g] + s[g] * static_cast<float>(q);
}

struct ProjectorSource {
  ProjKind kind = ProjKind::Dense;
  int64_t r = 0, K = 0;
  // Dense: P in right orientation (r x K), any floating dtype and strides; as make_source
  // leaves it (no ATen call there), the projector as given, whose transpose P is when
  // dense_left (side="left"); run() takes oriented().
  Tensor dense;
  bool dense_left = false;
  Tensor basis;  // DCT: the s x s basis (s = K)
  Tensor idx;    // DCT: the r row indices as given (int32 or int64, 1-D, any stride)
  // Int4: the packed codes, per-group stats, group size, and whether the stored P is
  // m x r (side="left": element (a, k) of the right orientation is stored at k * r + a)
  // or r x n (side="right": at a * K + k).
  Tensor packed, qscale, qmin;
  int64_t gs = 0;
  bool stored_left = false;

  int64_t rank() const { return r; }
  int64_t k() const { return K; }

  // This source with a dense P in right orientation (the one ATen call make_source saves).
  ProjectorSource oriented() const {
    ProjectorSource s = *this;
    if (s.kind == ProjKind::Dense && s.dense_left) {
      s.dense = s.dense.t();
      s.dense_left = false;
    }
    return s;
  }

  // Columns [k0, k0 + len) of P in dtype `acc`: a view when a dense projector already
  // has that dtype, else filled into `scratch` (at least r * len elements of acc).
  Tensor panel(int64_t k0, int64_t len, at::ScalarType acc, const Tensor& scratch) const {
    if (kind == ProjKind::Dense) {
      Tensor src = dense.narrow(1, k0, len);
      if (src.scalar_type() == acc) return src;
      Tensor out = scratch.narrow(0, 0, r * len).view({r, len});
      out.copy_(src);
      return out;
    }
    Tensor out = scratch.narrow(0, 0, r * len).view({r, len});
    if (kind == ProjKind::DCT) {
      out.copy_(basis.narrow(1, k0, len).index_select(0, idx));  // r x len gathered rows
      return out;
    }
    const uint8_t* pk = packed.data_ptr<uint8_t>();
    const float* s = qscale.data_ptr<float>();
    const float* mn = qmin.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES(acc, "projection_int4_panel", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, r, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          for (int64_t j = 0; j < len; ++j) {
            const int64_t kk = k0 + j;
            const int64_t f = stored_left ? kk * r + a : a * K + kk;
            o[a * len + j] = static_cast<scalar_t>(int4_value(pk, s, mn, f, gs));
          }
        }
      });
    });
    return out;
  }

  // The whole P (r x K) in dtype `acc` (a view for a dense projector already in acc).
  Tensor materialize(at::ScalarType acc) const {
    if (kind == ProjKind::Dense && dense.scalar_type() == acc) return dense;
    if (kind == ProjKind::DCT) return basis.index_select(0, idx).to(acc);
    const auto opts = (kind == ProjKind::Dense ? dense : packed).options().dtype(acc);
    Tensor out = at::empty({r * K}, opts);
    if (kind == ProjKind::Int4) return panel(0, K, acc, out);  // one parallel pass over the rows
    // Dense in another dtype: converted in parallel chunks of columns.
    Tensor full = out.view({r, K});
    const int64_t chunk = std::min(K, std::max<int64_t>(64, kPanelElems / std::max<int64_t>(r, 1)));
    const int64_t nchunks = (K + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * chunk;
        const int64_t len = std::min(chunk, K - k0);
        full.narrow(1, k0, len).copy_(dense.narrow(1, k0, len));
      }
    });
    return full;
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

// --------------------------------------------------------------------------- the driver
// Everything in right orientation. Undefined tensors switch stages off:
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

using OptTensor = std::optional<Tensor>;

// Element a of a 1-D int32 / int64 CPU index vector, read in place (any stride).
inline int64_t index_at(const Tensor& idx, int64_t a) {
  const int64_t off = a * idx.stride(0);
  if (idx.scalar_type() == at::kInt) return static_cast<const int32_t*>(idx.const_data_ptr())[off];
  return static_cast<const int64_t*>(idx.const_data_ptr())[off];
}

// Checks the projector (of any kind) against an (m x n) matrix and builds its source in
// right orientation; `shape` receives the low-rank shape. The rank must lie in
// [1, min(m, n)], or with `any_rank` (the plain projection, no Adam) in [1, K].
ProjectorSource make_source(const char* op, int64_t m, int64_t n, bool left, const Tensor& proj,
                            const OptTensor& indices, const OptTensor& q_scale, const OptTensor& q_min, int64_t rank,
                            int64_t group_size, std::vector<int64_t>& shape, bool any_rank = false) {
  const int64_t max_rank = any_rank ? (left ? m : n) : std::min(m, n);
  const bool has_idx = indices.has_value() && indices->defined();
  const bool has_s = q_scale.has_value() && q_scale->defined();
  const bool has_mn = q_min.has_value() && q_min->defined();
  ProjectorSource src;
  src.K = left ? m : n;
  if (!has_idx && !has_s && !has_mn) {
    check_float_cpu(proj, "proj", op);
    check_2d(proj, "proj", op);
    if (left) {
      TORCH_CHECK(proj.size(0) == m, op, ": side='left' needs proj of shape (m, rank) = (", m, ", rank), got ",
                  proj.sizes());
    } else {
      TORCH_CHECK(proj.size(1) == n, op, ": side='right' needs proj of shape (rank, n) = (rank, ", n, "), got ",
                  proj.sizes());
    }
    src.kind = ProjKind::Dense;
    src.dense = proj;  // P = proj^T for side="left": run() orients it (no view made here)
    src.dense_left = left;
    src.r = left ? proj.size(1) : proj.size(0);
    TORCH_CHECK(rank == 0 || rank == src.r, op, ": rank must be 0 or the projector's rank ", src.r, ", got ", rank);
  } else if (has_idx && !has_s && !has_mn) {
    const Tensor& idx = *indices;
    check_float_cpu(proj, "basis", op);
    TORCH_CHECK(proj.dim() == 2 && proj.size(0) == src.K && proj.size(1) == src.K, op, ": basis must have shape (",
                src.K, ", ", src.K, "), got ", proj.sizes());
    TORCH_CHECK(idx.device().is_cpu(), op, ": indices must be a CPU tensor, got ", idx.device());
    TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
                ": indices must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1, op, ": indices must be 1-D, got shape ", idx.sizes());
    src.kind = ProjKind::DCT;
    src.basis = proj;
    src.idx = idx;  // read in place, int32 or int64 (no conversion, no copy)
    src.r = idx.size(0);
    for (int64_t a = 0; a < src.r; ++a) {
      const int64_t i = index_at(idx, a);
      TORCH_CHECK(i >= 0 && i < src.K, op, ": indices must lie in [0, ", src.K, "), got ", i);
    }
    TORCH_CHECK(rank == 0 || rank == src.r, op, ": rank must be 0 or the projector's rank ", src.r, ", got ", rank);
  } else {
    TORCH_CHECK(!has_idx && has_s && has_mn, op,
                ": a projector is dense (no indices, q_scale, q_min), DCT (indices) or packed INT4 (q_scale and "
                "q_min)");
    TORCH_CHECK(group_size >= 2 && group_size % 2 == 0, op, ": group_size must be a positive even int, got ",
                group_size);
    TORCH_CHECK(rank >= 1 && rank <= max_rank, op, ": rank of proj (", rank, ") must be between 1 and ",
                max_rank);
    const int64_t numel = rank * src.K;
    const int64_t groups = (numel + group_size - 1) / group_size;
    TORCH_CHECK(proj.device().is_cpu() && proj.scalar_type() == at::kByte && proj.is_contiguous() &&
                    proj.numel() == (numel + 1) / 2,
                op, ": packed must be a contiguous uint8 CPU tensor of ", (numel + 1) / 2, " bytes");
    for (const Tensor* t : {&*q_scale, &*q_min}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->numel() == groups,
                  op, ": scale and minimum must be contiguous float32 CPU tensors of ", groups, " values");
    }
    src.kind = ProjKind::Int4;
    src.packed = proj;
    src.qscale = *q_scale;
    src.qmin = *q_min;
    src.gs = group_size;
    src.stored_left = left;
    src.r = rank;
  }
  if (src.kind != ProjKind::Int4) {
    TORCH_CHECK(group_size == 0, op, ": group_size is for packed INT4 projectors only and must be 0, got ",
                group_size);
  }
  TORCH_CHECK(src.r >= 1 && src.r <= max_rank, op, ": rank of proj (", src.r, ") must be between 1 and ",
              max_rank);
  shape = left ? std::vector<int64_t>{src.r, n} : std::vector<int64_t>{m, src.r};
  return src;
}

// The projector's dtype for the accumulation rule (a dequantized INT4 P is float32).
at::ScalarType proj_dtype(const ProjectorSource& src) {
  switch (src.kind) {
    case ProjKind::Dense:
      return src.dense.scalar_type();
    case ProjKind::DCT:
      return src.basis.scalar_type();
    default:
      return at::kFloat;
  }
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

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The moment state in any format (checks for direct calls of the _cpu ops; the router's
// validator gives the detailed messages). Returns whether the moments are 8-bit.
bool check_moment_state(const char* op, const Tensor& ea, const Tensor& eas, at::IntArrayRef shape,
                        const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size, int64_t seed) {
  const bool eight = given(m_absmax) || given(v_absmax);
  if (!eight) {
    check_moments(op, ea, eas, shape);
    TORCH_CHECK(block_size == 0, op, ": block_size is for 8-bit moments only and must be 0, got ", block_size);
    TORCH_CHECK(seed < 0 || ea.scalar_type() == at::kBFloat16, op,
                ": moment_seed >= 0 (stochastic rounding) needs bfloat16 moments, got ", ea.scalar_type());
    return false;
  }
  TORCH_CHECK(given(m_absmax) && given(v_absmax), op, ": 8-bit moments need both m_absmax and v_absmax");
  TORCH_CHECK(block_size >= 1 && block_size <= moments8::kMaxBlock, op, ": block_size must be in [1, ",
              moments8::kMaxBlock, "] for 8-bit moments, got ", block_size);
  TORCH_CHECK(seed < 0, op, ": moment_seed >= 0 is for bfloat16 moments; 8-bit moments round to nearest");
  TORCH_CHECK(!shape.empty(), op, ": 8-bit moments need at least one dimension");
  std::vector<int64_t> ashape(shape.begin(), shape.end());
  ashape.back() = (ashape.back() + block_size - 1) / block_size;
  for (const Tensor* t : {&ea, &eas}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kByte && t->is_contiguous() && t->sizes() == shape,
                op, ": 8-bit moments must be contiguous uint8 CPU tensors of shape ", shape, ", got ",
                t->scalar_type(), " ", t->sizes());
  }
  for (const Tensor* t : {&*m_absmax, &*v_absmax}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef(ashape),
                op, ": m_absmax / v_absmax must be contiguous float32 CPU tensors of shape ", at::IntArrayRef(ashape),
                ", got ", t->scalar_type(), " ", t->sizes());
  }
  return true;
}

// Right orientation of a side's tensors.
Tensor orient(const Tensor& t, bool left) { return left ? t.t() : t; }

// --------------------------------------------------------------------------- ops
Tensor projection_project_cpu(const Tensor& grad, const Tensor& proj, c10::string_view side, const OptTensor& indices,
                              const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size) {
  const char* op = "projection_project_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(grad, "grad", op);
  check_2d(grad, "grad", op);
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(op, grad.size(0), grad.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape,
                  /*any_rank=*/true);
  const at::ScalarType acc = acc_dtype({grad.scalar_type(), proj_dtype(src)});
  Tensor out = at::empty(shape, grad.options().dtype(acc));
  Problem pb;
  pb.g = orient(grad, left);
  pb.n = orient(out, left);
  run(pb, src, acc);
  return out;
}

Tensor projection_project_adam_cpu(const Tensor& grad, const Tensor& proj, Tensor& exp_avg, Tensor& exp_avg_sq,
                                   c10::string_view side, double beta1, double beta2, double eps,
                                   const OptTensor& indices, const OptTensor& q_scale, const OptTensor& q_min,
                                   int64_t rank, int64_t group_size, const OptTensor& m_absmax,
                                   const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed) {
  const char* op = "projection_project_adam_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(grad, "grad", op);
  check_2d(grad, "grad", op);
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(op, grad.size(0), grad.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  const bool eight =
      check_moment_state(op, exp_avg, exp_avg_sq, shape, m_absmax, v_absmax, block_size, moment_seed);

  Tensor out = at::empty(shape, exp_avg.options().dtype(eight ? at::kFloat : exp_avg.scalar_type()));
  Problem pb;
  pb.g = orient(grad, left);
  pb.ea = orient(exp_avg, left);
  pb.eas = orient(exp_avg_sq, left);
  pb.n = orient(out, left);
  pb.left = left;
  pb.seed = moment_seed;
  if (eight) {
    pb.ma = *m_absmax;
    pb.va = *v_absmax;
    pb.block_size = block_size;
  }
  pb.beta1 = beta1;
  pb.beta2 = beta2;
  pb.eps = eps;
  run(pb, src, acc_dtype({grad.scalar_type(), proj_dtype(src), exp_avg.scalar_type()}));
  return out;
}

// A per-row factor vector (float32, length m) in acc, shaped to broadcast against the
// right-oriented weight; undefined when not given.
Tensor row_factor(const OptTensor& v, const char* name, const char* op, int64_t m, bool left, at::ScalarType acc) {
  if (!v.has_value() || !v->defined()) return Tensor();
  TORCH_CHECK(v->device().is_cpu() && v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == m, op, ": ",
              name, " must be a float32 CPU vector of length m = ", m, ", got ", v->scalar_type(), " ", v->sizes());
  Tensor t = v->to(acc);
  return left ? t.view({1, m}) : t.view({m, 1});
}

void projection_backproject_apply_cpu(Tensor& param, const Tensor& update, const Tensor& proj, c10::string_view side,
                                      double alpha, double decay, const OptTensor& indices, const OptTensor& q_scale,
                                      const OptTensor& q_min, int64_t rank, int64_t group_size,
                                      const OptTensor& row_decay, const OptTensor& row_alpha) {
  const char* op = "projection_backproject_apply_cpu";
  const bool left = is_left(side, op);
  check_float_cpu(param, "param", op);
  check_2d(param, "param", op);
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(op, param.size(0), param.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  check_float_cpu(update, "update", op);
  TORCH_CHECK(update.sizes() == at::IntArrayRef(shape), op, ": update must have shape ", at::IntArrayRef(shape),
              ", got ", update.sizes());

  const at::ScalarType acc = acc_dtype({param.scalar_type(), update.scalar_type(), proj_dtype(src)});
  Problem pb;
  pb.rd = row_factor(row_decay, "row_decay", op, param.size(0), left, acc);
  pb.ra = row_factor(row_alpha, "row_alpha", op, param.size(0), left, acc);
  pb.w = orient(param, left);
  pb.upd = orient(update, left);
  pb.decay = decay;
  pb.alpha = alpha;
  run(pb, src, acc);
}

// torch.optim.AdamW's bias correction folded into the step size (the reference's
// adam_step_size): lr * sqrt(1 - beta2^t) / (1 - beta1^t).
double adam_step_size(double lr, double beta1, double beta2, int64_t step) {
  const double t = static_cast<double>(step);
  return lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
}

// --------------------------------------------------------------------------- the float32 fast path
// The common small case of the fused step, with NO ATen op and no dispatcher call (each
// costs ~0.5-1 us, some 45 of them per parameter in the general engine above, against a
// few microseconds of arithmetic for a small weight): float32 param, grad and plain
// moments (no 8-bit codes, no stochastic rounding), a float32 dense or DCT projector
// (int32 or int64 indices read in place), g and w each with one unit stride (row- or
// column-major in the oriented view, any leading dimension), the two moments with a
// common unit-stride dimension, and rows * K * r within the size bound below. Then, on
// raw pointers, with the kernels of fast_f32.h (AVX2, or portable loops):
//   P      the dense projector itself (a strided view), or rows idx of the DCT basis
//          gathered into the workspace (r x K); small copies of P, P^T, N^T where a
//          kernel wants its rows contiguous;
//   R      = G P^T into a thread_local workspace laid out like the moments (R^T = P G^T
//          when they are column-major);
//   Adam   fast::adam_run over the moments' contiguous runs, N over R;
//   W      = decay W + alpha N P (W^T = decay W^T + alpha P^T N^T for a column-major
//          oriented W): W read and written once, rounded once.
// The reference's operations in its order (fast_f32.h), so the results match it within
// the float32 tolerances of the tests; only the GEMMs' summation order differs (one FMA
// chain per element). Both the single-tensor step and the multi-tensor op reach it
// through fused_step(), so bucketed and per-parameter steps stay bitwise equal.
//
// Size bound: the fast path runs on one thread (at::parallel_for is serial in this
// extension: it is built without -fopenmp, so ATen's OpenMP parallel_for compiles to a
// plain call here), while the general engine's BLAS GEMMs use torch's threads. Measured
// (AMD EPYC, 2 cores; fast vs general in us, side right / left):
//   1 thread:  64x64 r8 6.3 / 5.4 vs 19 / 22; 256x256 r8 39 / 27 vs 62 / 52;
//              512x512 r8 147 / 105 vs 196 / 160; 1024x512 r8 300 / 229 vs 373 / 292;
//              512x512 r32 394 / 389 vs 387 / 399 (even at 8.4M multiply-adds);
//              1024x1024 r16 1045 / 1283 vs 1005 / 1005;
//   2 threads: 256x256 r8 40 / 27 vs 45 / 46; 256x256 r32 93 / 90 vs 77 / 87;
//              512x512 r8 147 / 105 vs 117 / 122; 1024x512 r8 288 / 230 vs 207 / 203.
// So the fast path is taken up to kFastMaxMacs = 4M multiply-adds per GEMM (rows * K * r)
// on one thread and kFastMaxMacs / T on T threads (2M on two), T capped at 4 (not
// measured beyond two: BLAS hardly splits small products, and the host-cost stack's
// largest weight, 172 x 64 x r8 = 88K, stays far below).
constexpr int64_t kFastMaxMacs = int64_t(1) << 22;
constexpr int64_t kFastMaxThreadDiv = 4;
// Low-rank workspace up to this many floats is kept per thread between calls (4 MB);
// larger ones are allocated for the call and freed.
constexpr int64_t kFastKeepWorkspace = 1 << 20;

// Mode of the fast path (projection_fast_path_cpu): 0 off (the general engine for every
// case), 1 on (AVX2 kernels where the CPU has them), 2 on with the portable kernels.
std::atomic<int> g_fast_mode{1};

fast::MatF mat_of(const Tensor& t, bool left) {
  float* p = static_cast<float*>(t.data_ptr());
  const fast::MatF m{p, t.size(0), t.size(1), t.stride(0), t.stride(1)};
  return left ? m.t() : m;
}

bool unit_cols(const fast::MatF& a) { return a.cs == 1 || a.cols == 1; }
bool unit_rows(const fast::MatF& a) { return a.rs == 1 || a.rows == 1; }

// In which directions the moments (oriented, rows x r) can be walked as contiguous runs:
// bit 0 along the rank (each row contiguous), bit 1 along the rows (each column).
int run_dirs(const fast::MatF& a) { return (unit_cols(a) ? 1 : 0) | (unit_rows(a) ? 2 : 0); }

// The runs' direction both moments allow: along the rank (by rows) unless only the other
// works or the runs are longer that way.
bool runs_by_row(const fast::MatF& m, const fast::MatF& v) {
  const int both = run_dirs(m) & run_dirs(v);
  return both == 1 || (both == 3 && m.cols >= m.rows);
}

bool fast_eligible(const Tensor& param, const Tensor& grad, const Tensor& ea, const Tensor& eas,
                   const ProjectorSource& src, bool left, const OptTensor& m_absmax, int64_t seed) {
  if (g_fast_mode.load(std::memory_order_relaxed) == 0) return false;
  if (param.scalar_type() != at::kFloat || grad.scalar_type() != at::kFloat || ea.scalar_type() != at::kFloat ||
      eas.scalar_type() != at::kFloat || seed >= 0 || (m_absmax.has_value() && m_absmax->defined())) {
    return false;
  }
  if (src.kind == ProjKind::Dense) {
    if (src.dense.scalar_type() != at::kFloat) return false;
  } else if (src.kind == ProjKind::DCT) {
    if (src.basis.scalar_type() != at::kFloat) return false;
  } else {
    return false;
  }
  const int64_t threads = std::min<int64_t>(kFastMaxThreadDiv, std::max(1, at::get_num_threads()));
  if (param.numel() * src.r > kFastMaxMacs / threads) return false;
  const fast::MatF g = mat_of(grad, false), w = mat_of(param, false);
  if (!(unit_cols(g) || unit_rows(g)) || !(unit_cols(w) || unit_rows(w))) return false;
  return (run_dirs(mat_of(ea, left)) & run_dirs(mat_of(eas, left))) != 0;
}

// A float32 workspace of at least n floats: this thread's kept buffer, or one for the
// call; take(k) hands out consecutive pieces.
struct Workspace {
  std::unique_ptr<float[]> own;
  float* p = nullptr;
  int64_t used = 0, size = 0;
  explicit Workspace(int64_t n) : size(n) {
    thread_local std::vector<float> kept;
    if (n <= kFastKeepWorkspace) {
      if (static_cast<int64_t>(kept.size()) < n) kept.resize(n);
      p = kept.data();
    } else {
      own.reset(new float[n]);
      p = own.get();
    }
  }
  float* take(int64_t k) {
    TORCH_INTERNAL_ASSERT(used + k <= size);
    float* q = p + used;
    used += k;
    return q;
  }
  // A row-major copy of x.
  fast::MatF rowmajor(const fast::MatF& x) {
    fast::MatF y{take(x.rows * x.cols), x.rows, x.cols, x.cols, 1};
    for (int64_t i = 0; i < x.rows; ++i) {
      for (int64_t j = 0; j < x.cols; ++j) y.p[i * x.cols + j] = x.p[i * x.rs + j * x.cs];
    }
    return y;
  }
};

void fast_step(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, const ProjectorSource& src,
               bool left, double beta1, double beta2, double eps, double alpha, double decay) {
  const bool portable = g_fast_mode.load(std::memory_order_relaxed) == 2;
  const fast::MatF G = mat_of(grad, left), W = mat_of(param, left);
  const fast::MatF M = mat_of(exp_avg, left), V = mat_of(exp_avg_sq, left);
  const int64_t rows = G.rows, K = G.cols, r = src.r;
  const bool by_row = runs_by_row(M, V);
  // R, a row-major R when R is column-major and G row-major, N^T; P, P^T, a row-major P.
  Workspace ws(3 * rows * r + 3 * r * K);
  const fast::MatF R = by_row ? fast::MatF{ws.take(rows * r), rows, r, r, 1}
                              : fast::MatF{ws.take(rows * r), rows, r, 1, rows};
  // P (r x K): the dense projector in place, or rows idx of the basis (row-major).
  fast::MatF P;
  if (src.kind == ProjKind::Dense) {
    P = mat_of(src.dense, src.dense_left);
  } else {
    P = fast::MatF{ws.take(r * K), r, K, K, 1};
    const float* b = static_cast<const float*>(src.basis.const_data_ptr());
    const int64_t s0 = src.basis.stride(0), s1 = src.basis.stride(1);
    for (int64_t a = 0; a < r; ++a) {
      const float* row = b + index_at(src.idx, a) * s0;
      if (s1 == 1) {
        std::copy(row, row + K, P.p + a * K);
      } else {
        for (int64_t k = 0; k < K; ++k) P.p[a * K + k] = row[k * s1];
      }
    }
  }

  // R = G P^T (as R^T = P G^T for a column-major R over a column-major G).
  if (unit_cols(R) || !unit_rows(G)) {
    const fast::MatF PT = unit_cols(P.t()) ? P.t() : ws.rowmajor(P.t());
    if (unit_cols(R)) {
      fast::gemm_rows(R, G, PT, 1.0f, 0.0f, portable);
    } else {  // column-major R, row-major G: through a row-major R
      const fast::MatF Rr{ws.take(rows * r), rows, r, r, 1};
      fast::gemm_rows(Rr, G, PT, 1.0f, 0.0f, portable);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t a = 0; a < r; ++a) R.p[i * R.rs + a * R.cs] = Rr.p[i * r + a];
      }
    }
  } else {
    fast::gemm_rows(R.t(), P, G.t(), 1.0f, 0.0f, portable);
  }

  const fast::AdamConsts c = fast::adam_consts(beta1, beta2, eps);
  const int64_t outer = by_row ? rows : r, len = by_row ? r : rows;
  // Stride between runs (unused when there is one run: its dimension has size 1).
  const int64_t m_ld = by_row ? M.rs : M.cs, v_ld = by_row ? V.rs : V.cs, r_ld = by_row ? R.rs : R.cs;
  for (int64_t o = 0; o < outer; ++o) {
    fast::adam_run(M.p + o * m_ld, V.p + o * v_ld, R.p + o * r_ld, len, c, portable);
  }

  // W = decay W + alpha N P (N over R), or W^T = decay W^T + alpha P^T N^T.
  const float fa = static_cast<float>(alpha), fd = static_cast<float>(decay);
  if (unit_cols(W)) {
    fast::gemm_rows(W, R, unit_cols(P) ? P : ws.rowmajor(P), fa, fd, portable);
  } else {
    fast::gemm_rows(W.t(), P.t(), unit_cols(R.t()) ? R.t() : ws.rowmajor(R.t()), fa, fd, portable);
  }
}

// The fused step with its weight update given as W <- decay * W + alpha * back(N) (the
// single-tensor op computes alpha and decay from lr / step / weight decay / scale; the
// multi-tensor op may take them per parameter from a device tensor).
void fused_step(const char* op, Tensor& param, const Tensor& grad, const Tensor& proj, Tensor& exp_avg,
                Tensor& exp_avg_sq, c10::string_view side, double beta1, double beta2, double eps, int64_t step,
                double alpha, double decay, const OptTensor& indices, const OptTensor& q_scale,
                const OptTensor& q_min, int64_t rank, int64_t group_size, const OptTensor& m_absmax,
                const OptTensor& v_absmax, int64_t block_size, int64_t moment_seed) {
  const bool left = is_left(side, op);
  check_float_cpu(param, "param", op);
  check_float_cpu(grad, "grad", op);
  check_2d(param, "param", op);
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad must have shape ", param.sizes(),
              " (the parameter's shape), got ", grad.sizes());
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (1-based, after increment), got ", step);
  std::vector<int64_t> shape;
  const ProjectorSource src =
      make_source(op, param.size(0), param.size(1), left, proj, indices, q_scale, q_min, rank, group_size, shape);
  const bool eight =
      check_moment_state(op, exp_avg, exp_avg_sq, shape, m_absmax, v_absmax, block_size, moment_seed);
  if (fast_eligible(param, grad, exp_avg, exp_avg_sq, src, left, m_absmax, moment_seed)) {
    fast_step(param, grad, exp_avg, exp_avg_sq, src, left, beta1, beta2, eps, alpha, decay);
    return;
  }

  const at::ScalarType acc =
      acc_dtype({param.scalar_type(), grad.scalar_type(), proj_dtype(src), exp_avg.scalar_type()});
  Problem pb;
  pb.g = orient(grad, left);
  pb.ea = orient(exp_avg, left);
  pb.eas = orient(exp_avg_sq, left);
  pb.w = orient(param, left);
  pb.left = left;
  pb.seed = moment_seed;
  if (eight) {
    // N (float32 values, as the reference rounds it) is written over R in acc.
    pb.ma = *m_absmax;
    pb.va = *v_absmax;
    pb.block_size = block_size;
  } else if (exp_avg.scalar_type() != acc) {
    // N is rounded to the moments' dtype before the back-projection (as the reference);
    // this low-rank tensor holds the rounded values.
    pb.n = orient(at::empty(shape, exp_avg.options()), left);
  }
  pb.beta1 = beta1;
  pb.beta2 = beta2;
  pb.eps = eps;
  pb.decay = decay;
  pb.alpha = alpha;
  run(pb, src, acc);
}

// Control of the float32 fast path for measurements and tests (not a kernel; no tensors):
// mode -1 queries, 0 turns it off (the general engine for every case), 1 on (the AVX2
// kernels where the CPU has AVX2 and FMA, else the portable ones), 2 on with the portable
// kernels. Returns the mode in effect before the call.
int64_t projection_fast_path_cpu(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2, "projection_fast_path_cpu: mode must be -1 (query), 0 (off), 1 (on) or 2 "
              "(on, portable kernels), got ", mode);
  return mode >= 0 ? g_fast_mode.exchange(static_cast<int>(mode)) : g_fast_mode.load();
}

void projection_project_update_backproject_cpu(Tensor& param, const Tensor& grad, const Tensor& proj,
                                               Tensor& exp_avg, Tensor& exp_avg_sq, c10::string_view side,
                                               double lr, double beta1, double beta2, double eps, int64_t step,
                                               double weight_decay, double scale, const OptTensor& indices,
                                               const OptTensor& q_scale, const OptTensor& q_min, int64_t rank,
                                               int64_t group_size, const OptTensor& m_absmax,
                                               const OptTensor& v_absmax, int64_t block_size,
                                               int64_t moment_seed) {
  fused_step("projection_project_update_backproject_cpu", param, grad, proj, exp_avg, exp_avg_sq, side, beta1,
             beta2, eps, step, -adam_step_size(lr, beta1, beta2, step) * scale, 1.0 - lr * weight_decay, indices,
             q_scale, q_min, rank, group_size, m_absmax, v_absmax, block_size, moment_seed);
}

// The multi-tensor step: one dispatcher call for a list of parameters (one side, one
// projector kind), the single-tensor step on each in turn. Empty projector lists mean
// "not given" (the dense kind; rank from the projectors). Every entry's shapes are
// checked before the first one is written.
void projection_foreach_project_update_backproject_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, c10::string_view side, at::ArrayRef<double> lr, double beta1, double beta2,
    double eps, at::IntArrayRef step, at::ArrayRef<double> weight_decay, at::ArrayRef<double> scale,
    at::TensorList indices, at::TensorList q_scale, at::TensorList q_min, at::IntArrayRef rank, int64_t group_size,
    at::TensorList m_absmax, at::TensorList v_absmax, int64_t block_size, at::IntArrayRef moment_seed,
    const OptTensor& skip, const OptTensor& coeffs) {
  const char* op = "projection_foreach_project_update_backproject_cpu";
  const bool left = is_left(side, op);
  const size_t n = params.size();
  for (const auto& len : {grads.size(), projs.size(), exp_avgs.size(), exp_avg_sqs.size(), lr.size(), step.size(),
                          weight_decay.size(), scale.size()}) {
    TORCH_CHECK(len == n, op, ": every list must have one entry per parameter (", n, "), got one of ", len);
  }
  for (const auto& len : {indices.size(), q_scale.size(), q_min.size(), rank.size()}) {
    TORCH_CHECK(len == 0 || len == n, op, ": projector lists must be empty or have one entry per parameter (", n,
                "), got one of ", len);
  }
  for (const auto& len : {m_absmax.size(), v_absmax.size(), moment_seed.size()}) {
    TORCH_CHECK(len == 0 || len == n, op, ": moment lists must be empty or have one entry per parameter (", n,
                "), got one of ", len);
  }
  // Device-side control, read through data pointers (no aten op, no host sync elsewhere):
  // skip[i] != 0 leaves parameter i untouched; coeffs[i] = (a, d): W <- d W - a back(N).
  const bool has_skip = skip.has_value() && skip->defined();
  const bool has_coeffs = coeffs.has_value() && coeffs->defined();
  if (has_skip) {
    TORCH_CHECK(skip->device().is_cpu() && (skip->scalar_type() == at::kByte || skip->scalar_type() == at::kBool) &&
                    skip->dim() == 1 && skip->size(0) == static_cast<int64_t>(n) && skip->is_contiguous(),
                op, ": skip must be a contiguous bool/uint8 CPU vector of length ", n, ", got ", skip->scalar_type(),
                " ", skip->sizes());
  }
  if (has_coeffs) {
    TORCH_CHECK(coeffs->device().is_cpu() &&
                    (coeffs->scalar_type() == at::kFloat || coeffs->scalar_type() == at::kDouble) &&
                    coeffs->dim() == 2 && coeffs->size(0) == static_cast<int64_t>(n) && coeffs->size(1) == 2 &&
                    coeffs->is_contiguous(),
                op, ": coeffs must be a contiguous float32/float64 CPU tensor of shape (", n, ", 2), got ",
                coeffs->scalar_type(), " ", coeffs->sizes());
  }
  auto skipped = [&](size_t i) -> bool {
    return has_skip && static_cast<const uint8_t*>(skip->const_data_ptr())[i] != 0;
  };
  auto coeff = [&](size_t i, int j) -> double {
    if (coeffs->scalar_type() == at::kDouble) return coeffs->const_data_ptr<double>()[2 * i + j];
    return static_cast<double>(coeffs->const_data_ptr<float>()[2 * i + j]);
  };
  auto seed_of = [&](size_t i) -> int64_t { return moment_seed.empty() ? -1 : moment_seed[i]; };
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor {
    return xs.empty() ? OptTensor() : OptTensor(xs[i]);
  };
  for (size_t i = 0; i < n; ++i) {  // checks only: nothing is written until all pass
    check_float_cpu(params[i], "param", op);
    check_float_cpu(grads[i], "grad", op);
    check_2d(params[i], "param", op);
    TORCH_CHECK(grads[i].sizes() == params[i].sizes(), op, ": grads[", i, "] must have shape ", params[i].sizes(),
                ", got ", grads[i].sizes());
    TORCH_CHECK(step[i] >= 1, op, ": step[", i, "] must be >= 1, got ", step[i]);
    std::vector<int64_t> shape;
    make_source(op, params[i].size(0), params[i].size(1), left, projs[i], opt(indices, i), opt(q_scale, i),
                opt(q_min, i), rank.empty() ? 0 : rank[i], group_size, shape);
    check_moment_state(op, exp_avgs[i], exp_avg_sqs[i], shape, opt(m_absmax, i), opt(v_absmax, i), block_size,
                       seed_of(i));
  }
  for (size_t i = 0; i < n; ++i) {
    if (skipped(i)) continue;
    Tensor p = params[i], ea = exp_avgs[i], eas = exp_avg_sqs[i];
    const double alpha =
        has_coeffs ? -coeff(i, 0) : -adam_step_size(lr[i], beta1, beta2, step[i]) * scale[i];
    const double decay = has_coeffs ? coeff(i, 1) : 1.0 - lr[i] * weight_decay[i];
    fused_step(op, p, grads[i], projs[i], ea, eas, side, beta1, beta2, eps, step[i], alpha, decay, opt(indices, i),
               opt(q_scale, i), opt(q_min, i), rank.empty() ? 0 : rank[i], group_size, opt(m_absmax, i),
               opt(v_absmax, i), block_size, seed_of(i));
  }
}

}  // namespace
}  // namespace lowrank_kernels

#define LOWRANK_PROJECTOR_ARGS \
  "Tensor? indices=None, Tensor? q_scale=None, Tensor? q_min=None, int rank=0, int group_size=0"
#define LOWRANK_MOMENT_ARGS \
  "Tensor(d!)? m_absmax=None, Tensor(e!)? v_absmax=None, int block_size=0, int moment_seed=-1"

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {
  m.def("projection_fast_path_cpu(int mode=-1) -> int", &lowrank_kernels::projection_fast_path_cpu);
  m.def("projection_project_cpu(Tensor grad, Tensor proj, str side, " LOWRANK_PROJECTOR_ARGS ") -> Tensor");
  m.def(
      "projection_foreach_project_update_backproject_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, str side, float[] lr, float beta1, float beta2, float eps, "
      "int[] step, float[] weight_decay, float[] scale, Tensor[] indices, Tensor[] q_scale, "
      "Tensor[] q_min, int[] rank, int group_size, Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, int block_size, "
      "int[] moment_seed, Tensor? skip=None, Tensor? coeffs=None) -> ()");
  m.def(
      "projection_project_adam_cpu(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, str side, "
      "float beta1, float beta2, float eps, " LOWRANK_PROJECTOR_ARGS ", " LOWRANK_MOMENT_ARGS ") -> Tensor");
  m.def(
      "projection_backproject_apply_cpu(Tensor(a!) param, Tensor update, Tensor proj, str side, float alpha, "
      "float decay, " LOWRANK_PROJECTOR_ARGS ", Tensor? row_decay=None, Tensor? row_alpha=None) -> ()");
  m.def(
      "projection_project_update_backproject_cpu(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, str side, float lr, float beta1, float beta2, float eps, int step, "
      "float weight_decay, float scale, " LOWRANK_PROJECTOR_ARGS ", " LOWRANK_MOMENT_ARGS ") -> ()");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("projection_project_cpu", &lowrank_kernels::projection_project_cpu);
  m.impl("projection_foreach_project_update_backproject_cpu",
         &lowrank_kernels::projection_foreach_project_update_backproject_cpu);
  m.impl("projection_project_adam_cpu", &lowrank_kernels::projection_project_adam_cpu);
  m.impl("projection_backproject_apply_cpu", &lowrank_kernels::projection_backproject_apply_cpu);
  m.impl("projection_project_update_backproject_cpu", &lowrank_kernels::projection_project_update_backproject_cpu);
}
