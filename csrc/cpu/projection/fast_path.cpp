// The float32 fast path of the projection family's fused step (ops.cpp, fused_step()).
//
// The common small case of the fused step, with NO ATen op and no dispatcher call (each
// costs ~0.5-1 us, some 45 of them per parameter in the general engine (engine.cpp), against a
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
#include "cpu/projection/fast_path.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "cpu/fast_f32.h"

namespace lowrank_kernels {
namespace projection {
namespace {

constexpr int64_t kFastMaxMacs = int64_t(1) << 22;
constexpr int64_t kFastMaxThreadDiv = 4;
// Low-rank workspace up to this many floats is kept per thread between calls (4 MB);
// larger ones are allocated for the call and freed.
constexpr int64_t kFastKeepWorkspace = 1 << 20;

// Mode of the fast path (fast_path_mode(); from Python lowrank_kernels._C.projection_fast_path):
// 0 off (the general engine for every case), 1 on (AVX2 kernels where the CPU has them),
// 2 on with the portable kernels.
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

}  // namespace

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

int64_t fast_path_mode(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2, "mode must be -1 (query), 0 (off), 1 (on) or 2 (on, portable kernels), got ",
              mode);
  return mode >= 0 ? g_fast_mode.exchange(static_cast<int>(mode)) : g_fast_mode.load();
}

}  // namespace projection
}  // namespace lowrank_kernels
