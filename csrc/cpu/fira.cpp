// C++ CPU kernel of the fira family (lowrank_kernels/ops/fira.py has the schema and the
// validation, lowrank_kernels/reference/fira.py the specification): Fira's non-refresh step
// over a list of float32 weights in one call. FiraAdamW's per-parameter step on a float32
// CPU weight calls this op with a one-entry list, so the bucketed and per-parameter steps
// are the same arithmetic (bit-identical); the reference matches to rounding.
//
// Two paths per weight, chosen by size alone (never by the thread count, so a result does
// not depend on it):
//
// Small weights (m * n * r <= kSmallMacs and a projected dimension K <= kSmallMaxK, the
// common case of the host-cost stack: ATen calls would cost more than the arithmetic; each
// is ~1 us of dispatch and allocation, some 140 of them per weight in the general path): the
// whole step on raw float pointers, no ATen call, one thread, with fast_f32.h's kernels (AVX2
// + FMA where the CPU has them, else portable loops with the same operations):
//   P     the dense projector in place (a row-major copy where a GEMM wants its rows
//         contiguous), or the DCT rows picked by the indices gathered (r x K);
//   R     = G P^T (right) or P^T G (left), fast::gemm_rows (one FMA chain per element);
//   Adam  float32 moments: fast::adam_run, N beside R; 8-bit: moments8::adam8_step on the
//         same pointers; other formats (16-bit): adam_update_cpu, the one ATen detour;
//   s     = ||N||_k / (||R||_k + 1e-8) over the rank dimension (squares summed in double);
//   limiter: q^2 = sum (back(-mix s R) + s G)^2, back() one bounded panel of rows at a time
//         into a scratch in L1/L2, the squares summed in double (eight lanes per row, SSE2,
//         the rows in order);
//   W     = decay W + alpha (back(scale N - mix s R) + s G), panel by panel.
// Float32 glue in the reference's order; the GEMMs' and sums' order differs from ATen's
// (within the tests' float32 tolerances).
//
// Larger weights: the projection, the Adam update and the two residual passes are this
// extension's own kernels (projection_project_cpu, adam_update_cpu, residual_sumsq_cpu,
// residual_apply_cpu: BLAS GEMMs, torch's threads), the norms over the rank dimension and
// the residual norm's square root ATen calls; the rest of the glue (scaling factors,
// limiter, the low-rank operands of the residual passes) is plain float32 arithmetic in the
// reference's order (this file is compiled for the baseline ISA, which has no FMA
// instruction to contract two operations into). A DCT projector's rows are gathered once
// per weight and handed to both residual passes as the dense projector.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/direct.h"
#include "cpu/fast_f32.h"
#include "cpu/kernels.h"
#include "cpu/moments8.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

constexpr float kTiny = 1e-8f;

// The raw path takes weights with m * n * r up to this many multiply-adds per GEMM. Measured
// (AMD EPYC, 2 cores under heavy load from other jobs, one thread, best of 5, the op on one
// weight with the limiter, raw vs general in us, side right / left): 64x172 r8 33 / 48 vs
// 132 / 369; 256x256 r8 327 / 311 vs 790 / 960; 256x512 r8 191 / 424 vs 2310 / 1213;
// 512x512 r4 308 / 694 vs 662 / 3199. Two-thread timings were too noisy under that load to
// place a bound, so it stays at a quarter of the projection fast path's one-thread bound
// (csrc/cpu/projection/fast_path.cpp; this step makes three GEMMs, not two), fixed: never
// scaled by the thread count, so no result depends on it.
constexpr int64_t kSmallMacs = int64_t(1) << 20;
// ... and a projected dimension of at most this many (each entry of R is one float32 FMA
// chain over it: longer chains lose accuracy against BLAS's blocked sums).
constexpr int64_t kSmallMaxK = int64_t(1) << 14;
// Rows of a back-projection panel: about this many elements of W (64 KiB of float32).
constexpr int64_t kPanelElems = 1 << 14;

// 0 off (the general path for every weight), 1 on, 2 on with the portable kernels
// (fira_small_path(), a testing switch).
std::atomic<int> g_small_mode{1};

using OptRef = const OptTensor&;

// ------------------------------------------------------------------ the general path
void entry_general(Tensor p, const Tensor& g, const Tensor& proj, OptRef idx, Tensor m1, Tensor v1, Tensor* prev,
                   bool right, double beta1, double beta2, double eps, double scale, double mix, double gamma,
                   double alpha, double decay, OptRef m_absmax, OptRef v_absmax, int64_t block_size, int64_t seed) {
  const c10::string_view sd = right ? "right" : "left";
  const int64_t rank_dim = right ? 1 : 0;
  Tensor low = projection_project_cpu(g, proj, sd, idx, std::nullopt, std::nullopt, 0, 0);
  // The dense projector of both residual passes: the DCT rows picked by the indices.
  Tensor pr = proj;
  if (idx.has_value()) {
    Tensor rows = pr.index_select(0, idx->to(at::kLong));
    pr = right ? rows : rows.t();
  }
  const auto upd = m1.scalar_type() == at::kByte ? at::kFloat : m1.scalar_type();
  Tensor nlr = adam_update_cpu(upd == at::kFloat ? low : low.to(upd), m1, v1, beta1, beta2, eps, m_absmax, v_absmax,
                               block_size, seed);
  Tensor n32 = nlr.to(at::kFloat).contiguous();
  low = low.contiguous();
  // s = ||N||_k / (||R||_k + 1e-8), one factor per index k of the kept dimension.
  Tensor nn = at::linalg_vector_norm(n32, 2, at::IntArrayRef{rank_dim}, false, std::nullopt).contiguous();
  Tensor rn = at::linalg_vector_norm(low, 2, at::IntArrayRef{rank_dim}, false, std::nullopt).contiguous();
  const int64_t len = nn.numel();
  Tensor s = at::empty({len}, nn.options());
  float* sp = s.data_ptr<float>();
  {
    const float* a = nn.const_data_ptr<float>();
    const float* b = rn.const_data_ptr<float>();
    for (int64_t j = 0; j < len; ++j) sp[j] = a[j] / (b[j] + kTiny);
  }
  const int64_t lm = low.size(0), ln = low.size(1);
  const float* lp = low.const_data_ptr<float>();
  // low * s (s per row of low on the right side, per column on the left) * c, into out.
  auto scaled_low = [&](float* out, float c) {
    for (int64_t a = 0; a < lm; ++a) {
      for (int64_t b = 0; b < ln; ++b) {
        const float f = right ? sp[a] : sp[b];
        out[a * ln + b] = (lp[a * ln + b] * f) * c;
      }
    }
  };
  if (prev != nullptr) {
    Tensor lowb = at::empty({lm, ln}, low.options());
    scaled_low(lowb.data_ptr<float>(), -static_cast<float>(mix));
    // ATen's sqrt, as the residual family's Python users write Tensor.sqrt().
    const float q = at::sqrt(residual_sumsq_cpu(g, lowb, pr, s, sd, std::nullopt)).item<float>();
    float* pv = prev->data_ptr<float>();
    const float gm = static_cast<float>(gamma);
    float ratio = q / (*pv + kTiny);
    if (!std::isnan(ratio) && ratio < gm) ratio = gm;
    const float lim = ratio / gm;
    for (int64_t j = 0; j < len; ++j) sp[j] = sp[j] / lim;
    *pv = q / lim;
  }
  // update = scale N - (R s) mix
  Tensor update = at::empty({lm, ln}, low.options());
  {
    float* up = update.data_ptr<float>();
    scaled_low(up, static_cast<float>(mix));
    const float* np = n32.const_data_ptr<float>();
    const float sc = static_cast<float>(scale);
    for (int64_t j = 0; j < lm * ln; ++j) up[j] = np[j] * sc - up[j];
  }
  residual_apply_cpu(p, g, update, pr, s, sd, alpha, decay, std::nullopt);
}

// ------------------------------------------------------------------ the raw path (small weights)
// Float32 scratch of at least n floats: this thread's buffer, kept between calls up to
// kKeepScratch floats (4 MiB), or one for the call (`own`) beyond that.
constexpr int64_t kKeepScratch = int64_t(1) << 20;

float* scratch(int64_t n, std::vector<float>& own) {
  if (n > kKeepScratch) {
    own.resize(static_cast<size_t>(n));
    return own.data();
  }
  thread_local std::vector<float> kept;
  if (static_cast<int64_t>(kept.size()) < n) kept.resize(static_cast<size_t>(n));
  return kept.data();
}

// Sum of (t[j] + f[j] g[j])^2 (f == nullptr: f_row for the whole row) in double: eight
// lanes (lane l takes the elements j = l mod 8 of each block of eight, then the tail's
// first lanes), added in a fixed order; AVX2 or SSE2 where available, else scalar loops
// with the same lanes and order (the same bits everywhere). The elementwise e is one
// float32 multiply and add, as the reference's e + f * G.
inline double lanes_total(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

inline double row_sumsq_sse2(const float* t, const float* g, const float* f, float f_row, int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
#if LOWRANK_FAST_X86
  {
    __m128d a01 = _mm_setzero_pd(), a23 = _mm_setzero_pd(), a45 = _mm_setzero_pd(), a67 = _mm_setzero_pd();
    const __m128 fr = _mm_set1_ps(f_row);
    for (; j + 8 <= n; j += 8) {
      const __m128 f0 = f != nullptr ? _mm_loadu_ps(f + j) : fr;
      const __m128 f1 = f != nullptr ? _mm_loadu_ps(f + j + 4) : fr;
      const __m128 e0 = _mm_add_ps(_mm_loadu_ps(t + j), _mm_mul_ps(f0, _mm_loadu_ps(g + j)));
      const __m128 e1 = _mm_add_ps(_mm_loadu_ps(t + j + 4), _mm_mul_ps(f1, _mm_loadu_ps(g + j + 4)));
      const __m128d d0 = _mm_cvtps_pd(e0), d1 = _mm_cvtps_pd(_mm_movehl_ps(e0, e0));
      const __m128d d2 = _mm_cvtps_pd(e1), d3 = _mm_cvtps_pd(_mm_movehl_ps(e1, e1));
      a01 = _mm_add_pd(a01, _mm_mul_pd(d0, d0));
      a23 = _mm_add_pd(a23, _mm_mul_pd(d1, d1));
      a45 = _mm_add_pd(a45, _mm_mul_pd(d2, d2));
      a67 = _mm_add_pd(a67, _mm_mul_pd(d3, d3));
    }
    _mm_storeu_pd(acc, a01);
    _mm_storeu_pd(acc + 2, a23);
    _mm_storeu_pd(acc + 4, a45);
    _mm_storeu_pd(acc + 6, a67);
  }
#else
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const float e = t[j + l] + (f != nullptr ? f[j + l] : f_row) * g[j + l];
      acc[l] += static_cast<double>(e) * static_cast<double>(e);
    }
  }
#endif
  for (int l = 0; j < n; ++j, ++l) {
    const float e = t[j] + (f != nullptr ? f[j] : f_row) * g[j];
    acc[l] += static_cast<double>(e) * static_cast<double>(e);
  }
  return lanes_total(acc);
}

// w[j] = w[j] decay + alpha (t[j] + f[j] g[j]) (f == nullptr: f_row), float32, one IEEE
// operation each (the compiler vectorizes it for the baseline ISA).
inline void row_apply_base(float* w, const float* t, const float* g, const float* f, float f_row, float fd, float fa,
                           int64_t n) {
  if (f == nullptr) {
    for (int64_t j = 0; j < n; ++j) w[j] = w[j] * fd + fa * (t[j] + f_row * g[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) w[j] = w[j] * fd + fa * (t[j] + f[j] * g[j]);
  }
}

#if LOWRANK_FAST_X86
// The same two row loops eight floats wide, with the same operations in the same order
// (fp-contract off: no multiply and add fused into an FMA), so the same bits.
__attribute__((target("avx2,fma"), optimize("fp-contract=off"))) double row_sumsq_avx2(const float* t, const float* g,
                                                                                     const float* f, float f_row,
                                                                                     int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  __m256d a03 = _mm256_setzero_pd(), a47 = _mm256_setzero_pd();
  const __m256 fr = _mm256_set1_ps(f_row);
  for (; j + 8 <= n; j += 8) {
    const __m256 fv = f != nullptr ? _mm256_loadu_ps(f + j) : fr;
    const __m256 e = _mm256_add_ps(_mm256_loadu_ps(t + j), _mm256_mul_ps(fv, _mm256_loadu_ps(g + j)));
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(e)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    a03 = _mm256_add_pd(a03, _mm256_mul_pd(d0, d0));
    a47 = _mm256_add_pd(a47, _mm256_mul_pd(d1, d1));
  }
  _mm256_storeu_pd(acc, a03);
  _mm256_storeu_pd(acc + 4, a47);
  for (int l = 0; j < n; ++j, ++l) {
    const float e = t[j] + (f != nullptr ? f[j] : f_row) * g[j];
    acc[l] += static_cast<double>(e) * static_cast<double>(e);
  }
  return lanes_total(acc);
}

__attribute__((target("avx2,fma"), optimize("fp-contract=off"))) void row_apply_avx2(float* w, const float* t,
                                                                                   const float* g, const float* f,
                                                                                   float f_row, float fd, float fa,
                                                                                   int64_t n) {
  const __m256 vd = _mm256_set1_ps(fd), va = _mm256_set1_ps(fa), fr = _mm256_set1_ps(f_row);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 fv = f != nullptr ? _mm256_loadu_ps(f + j) : fr;
    const __m256 e = _mm256_add_ps(_mm256_loadu_ps(t + j), _mm256_mul_ps(fv, _mm256_loadu_ps(g + j)));
    _mm256_storeu_ps(w + j, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(w + j), vd), _mm256_mul_ps(va, e)));
  }
  row_apply_base(w + j, t + j, g + j, f != nullptr ? f + j : nullptr, f_row, fd, fa, n - j);
}
#endif

inline double row_sumsq(const float* t, const float* g, const float* f, float f_row, int64_t n, bool portable) {
#if LOWRANK_FAST_X86
  if (!portable && fast::have_avx2_fma()) return row_sumsq_avx2(t, g, f, f_row, n);
#endif
  return row_sumsq_sse2(t, g, f, f_row, n);
}

inline void row_apply(float* w, const float* t, const float* g, const float* f, float f_row, float fd, float fa,
                      int64_t n, bool portable) {
#if LOWRANK_FAST_X86
  if (!portable && fast::have_avx2_fma()) {
    row_apply_avx2(w, t, g, f, f_row, fd, fa, n);
    return;
  }
#endif
  row_apply_base(w, t, g, f, f_row, fd, fa, n);
}

// Whether a weight takes the raw path: float32 contiguous moments (or 8-bit codes, or any
// other format through adam_update_cpu), dense P or DCT basis float32 (checked by the op),
// within the size bound.
bool small_eligible(const Tensor& p, int64_t r, bool right, const Tensor& m1, const Tensor& v1) {
  if (g_small_mode.load(std::memory_order_relaxed) == 0) return false;
  if (p.size(0) * p.size(1) * r > kSmallMacs || p.size(right ? 1 : 0) > kSmallMaxK) return false;
  return m1.is_contiguous() && v1.is_contiguous();
}

void entry_small(Tensor& p, const Tensor& g, const Tensor& proj, OptRef idx, Tensor& m1, Tensor& v1, Tensor* prev,
                 bool right, int64_t r, double beta1, double beta2, double eps, double scale, double mix, double gamma,
                 double alpha, double decay, OptRef m_absmax, OptRef v_absmax, int64_t block_size, int64_t seed) {
  using fast::MatF;
  const bool portable = g_small_mode.load(std::memory_order_relaxed) == 2;
  const int64_t m = p.size(0), n = p.size(1);
  const int64_t K = right ? n : m;            // the projected dimension
  const int64_t len = right ? m : n;          // the kept dimension (length of s)
  const int64_t lr = right ? m : r, lc = right ? r : n;  // R's shape
  const int64_t lowsz = lr * lc;
  const int64_t prow = std::max<int64_t>(1, std::min<int64_t>(m, kPanelElems / std::max<int64_t>(n, 1)));
  // P (r x K) row-major copy or gathered rows, P^T row-major (right), R, N, the low-rank
  // operand of a pass, s, the panel.
  const int64_t need = 2 * r * K + 3 * lowsz + len + prow * n;
  std::vector<float> own;
  float* ws = scratch(need, own);
  float* Pbuf = ws;
  float* PTbuf = Pbuf + r * K;
  float* R = PTbuf + r * K;
  float* N = R + lowsz;
  float* L = N + lowsz;
  float* s = L + lowsz;
  float* T = s + len;

  // P as an r x K view (element (a, k) = the a-th projection vector's k-th entry).
  MatF P;
  if (idx.has_value()) {
    const Tensor& ix = *idx;
    const float* b = static_cast<const float*>(proj.const_data_ptr());
    const int64_t s0 = proj.stride(0), s1 = proj.stride(1), is = ix.stride(0);
    const bool i32 = ix.scalar_type() == at::kInt;
    TORCH_CHECK(i32 || ix.scalar_type() == at::kLong);
    for (int64_t a = 0; a < r; ++a) {
      const int64_t row = i32 ? static_cast<const int32_t*>(ix.const_data_ptr())[a * is]
                              : static_cast<const int64_t*>(ix.const_data_ptr())[a * is];
      TORCH_CHECK(row >= 0 && row < proj.size(0));
      const float* src = b + row * s0;
      for (int64_t k = 0; k < K; ++k) Pbuf[a * K + k] = src[k * s1];
    }
    P = MatF{Pbuf, r, K, K, 1};
  } else {
    float* q = static_cast<float*>(proj.data_ptr());
    P = right ? MatF{q, r, K, proj.stride(0), proj.stride(1)} : MatF{q, K, r, proj.stride(0), proj.stride(1)}.t();
  }
  // P with contiguous rows (the right side's back-projection reads P's rows; the left's
  // projection reads P^T's rows: both P read as B below).
  auto rowmajor = [](const MatF& x, float* dst) {
    if (x.cs == 1 || x.cols == 1) return x;
    for (int64_t i = 0; i < x.rows; ++i) {
      for (int64_t j = 0; j < x.cols; ++j) dst[i * x.cols + j] = x.p[i * x.rs + j * x.cs];
    }
    return MatF{dst, x.rows, x.cols, x.cols, 1};
  };
  const MatF G{const_cast<float*>(g.const_data_ptr<float>()), m, n, n, 1};
  const MatF Rm{R, lr, lc, lc, 1};
  if (right) {
    // R (m x r) = G P^T, P^T's rows contiguous.
    fast::gemm_rows(Rm, G, rowmajor(P.t(), PTbuf), 1.0f, 0.0f, portable);
  } else {
    // R (r x n) = P^T G, the left projector m x r = P^T read with any strides.
    fast::gemm_rows(Rm, P, G, 1.0f, 0.0f, portable);
  }
  // The back-projection's operands: right: back(X)[rows] = X[rows] P (P's rows contiguous; a
  // copy goes over P^T's, which the projection above was the last to read); left:
  // back(X)[rows] = P^T[rows] X (P^T = the m x r projector, any strides).
  const MatF Pb = right ? rowmajor(P, PTbuf) : P.t();

  // Adam: N from R and the moments.
  const bool eight = m_absmax.has_value() && m_absmax->defined();
  if (eight) {
    moments8::adam8_step<float, float>(R, lc, 1, m1.data_ptr<uint8_t>(), v1.data_ptr<uint8_t>(),
                                       m_absmax->data_ptr<float>(), v_absmax->data_ptr<float>(), N, lc, 1, lr, lc,
                                       block_size, beta1, beta2, eps);
  } else if (m1.scalar_type() == at::kFloat && v1.scalar_type() == at::kFloat && seed < 0) {
    std::copy(R, R + lowsz, N);
    fast::adam_run(m1.data_ptr<float>(), v1.data_ptr<float>(), N, lowsz, fast::adam_consts(beta1, beta2, eps),
                   portable);
  } else {  // another moment format: the adam family's kernel in the moments' dtype, as the reference
    const Tensor low = at::from_blob(R, {lr, lc}, at::TensorOptions().dtype(at::kFloat));
    const Tensor nlr =
        adam_update_cpu(low.to(m1.scalar_type()), m1, v1, beta1, beta2, eps, m_absmax, v_absmax, block_size, seed);
    const Tensor n32 = nlr.to(at::kFloat).contiguous();
    std::copy(n32.const_data_ptr<float>(), n32.const_data_ptr<float>() + lowsz, N);
  }

  // s = ||N||_k / (||R||_k + 1e-8) over the rank dimension.
  {
    if (right) {
      // four rows at a time (independent sums, each in order over the rank)
      constexpr int64_t kB = 4;
      for (int64_t i0 = 0; i0 < m; i0 += kB) {
        const int64_t nb = std::min(kB, m - i0);
        double a[kB] = {0.0, 0.0, 0.0, 0.0}, b[kB] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t k = 0; k < r; ++k) {
          for (int64_t l = 0; l < nb; ++l) {
            const double x = N[(i0 + l) * r + k], y = R[(i0 + l) * r + k];
            a[l] += x * x;
            b[l] += y * y;
          }
        }
        for (int64_t l = 0; l < nb; ++l) {
          s[i0 + l] = static_cast<float>(std::sqrt(a[l])) / (static_cast<float>(std::sqrt(b[l])) + kTiny);
        }
      }
    } else {
      std::vector<double> sa(static_cast<size_t>(2 * n), 0.0);
      double* a = sa.data();
      double* b = a + n;
      for (int64_t k = 0; k < r; ++k) {
        for (int64_t j = 0; j < n; ++j) {
          a[j] += static_cast<double>(N[k * n + j]) * N[k * n + j];
          b[j] += static_cast<double>(R[k * n + j]) * R[k * n + j];
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        s[j] = static_cast<float>(std::sqrt(a[j])) / (static_cast<float>(std::sqrt(b[j])) + kTiny);
      }
    }
  }
  // L = (R s) c (s per row of R on the right side, per column on the left) [+ N scale].
  auto low_operand = [&](float c, bool with_n, float sc) {
    for (int64_t a = 0; a < lr; ++a) {
      const float* ra = R + a * lc;
      const float* na = N + a * lc;
      float* la = L + a * lc;
      if (right) {
        const float f = s[a];
        for (int64_t b = 0; b < lc; ++b) la[b] = (ra[b] * f) * c;
      } else {
        for (int64_t b = 0; b < lc; ++b) la[b] = (ra[b] * s[b]) * c;
      }
      if (with_n) {
        for (int64_t b = 0; b < lc; ++b) la[b] = na[b] * sc - la[b];
      }
    }
  };
  const MatF Lm{L, lr, lc, lc, 1};
  // back(L) for rows [i0, i0 + rows) into the panel T.
  auto back_panel = [&](int64_t i0, int64_t rows) {
    const MatF Tm{T, rows, n, n, 1};
    if (right) {
      fast::gemm_rows(Tm, MatF{L + i0 * r, rows, r, r, 1}, Pb, 1.0f, 0.0f, portable);
    } else {
      fast::gemm_rows(Tm, MatF{Pb.p + i0 * Pb.rs, rows, r, Pb.rs, Pb.cs}, Lm, 1.0f, 0.0f, portable);
    }
  };
  const float* gp = g.const_data_ptr<float>();
  if (prev != nullptr) {
    low_operand(-static_cast<float>(mix), false, 0.0f);
    double total = 0.0;
    for (int64_t i0 = 0; i0 < m; i0 += prow) {
      const int64_t rows = std::min(prow, m - i0);
      back_panel(i0, rows);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = i0 + i;
        total += row_sumsq(T + i * n, gp + row * n, right ? nullptr : s, right ? s[row] : 0.0f, n, portable);
      }
    }
    const float q = static_cast<float>(std::sqrt(total));
    float* pv = prev->data_ptr<float>();
    const float gm = static_cast<float>(gamma);
    float ratio = q / (*pv + kTiny);
    if (!std::isnan(ratio) && ratio < gm) ratio = gm;
    const float lim = ratio / gm;
    for (int64_t j = 0; j < len; ++j) s[j] = s[j] / lim;
    *pv = q / lim;
  }
  // W = decay W + alpha (back(scale N - mix s R) + s G).
  low_operand(static_cast<float>(mix), true, static_cast<float>(scale));
  float* wp = p.data_ptr<float>();
  const float fa = static_cast<float>(alpha), fd = static_cast<float>(decay);
  for (int64_t i0 = 0; i0 < m; i0 += prow) {
    const int64_t rows = std::min(prow, m - i0);
    back_panel(i0, rows);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = i0 + i;
      row_apply(wp + row * n, T + i * n, gp + row * n, right ? nullptr : s, right ? s[row] : 0.0f, fd, fa, n,
                portable);
    }
  }
}

}  // namespace

void fira_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs, at::TensorList indices,
                             at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                             c10::string_view side, double beta1, double beta2, double eps, at::ArrayRef<double> scale,
                             at::ArrayRef<double> mix, at::ArrayRef<double> gamma, at::ArrayRef<double> alpha,
                             at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && projs.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              scale.size() == k && mix.size() == k && alpha.size() == k && decay.size() == k);
  TORCH_CHECK(indices.empty() || indices.size() == k);
  TORCH_CHECK(prev_norm.empty() || prev_norm.size() == k);
  TORCH_CHECK(gamma.size() == prev_norm.size());
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(v_absmax.empty() || v_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].scalar_type() == at::kFloat && grads[i].sizes() == p.sizes() &&
                grads[i].is_contiguous());
    TORCH_CHECK(projs[i].device().is_cpu() && projs[i].scalar_type() == at::kFloat && projs[i].dim() == 2);
    if (!prev_norm.empty()) {
      TORCH_CHECK(prev_norm[i].device().is_cpu() && prev_norm[i].scalar_type() == at::kFloat &&
                  prev_norm[i].numel() == 1);
    }
    if (!indices.empty()) {
      const Tensor& ix = indices[i];
      TORCH_CHECK(ix.device().is_cpu() && ix.dim() == 1 &&
                  (ix.scalar_type() == at::kInt || ix.scalar_type() == at::kLong));
      const int64_t sz = right ? p.size(1) : p.size(0);
      TORCH_CHECK(projs[i].size(0) == sz && projs[i].size(1) == sz);
    } else {
      TORCH_CHECK(right ? projs[i].size(1) == p.size(1) : projs[i].size(0) == p.size(0));
    }
  }
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    Tensor m1 = exp_avg[i], v1 = exp_avg_sq[i];
    OptTensor idx = opt(indices, i);
    const int64_t r = idx.has_value() ? idx->size(0) : (right ? projs[i].size(0) : projs[i].size(1));
    Tensor pn = prev_norm.empty() ? Tensor() : prev_norm[i];
    Tensor* prev = prev_norm.empty() ? nullptr : &pn;
    const double gm = prev_norm.empty() ? 1.0 : gamma[i];
    const int64_t seed = moment_seed.empty() ? -1 : moment_seed[i];
    if (small_eligible(p, r, right, m1, v1)) {
      entry_small(p, grads[i], projs[i], idx, m1, v1, prev, right, r, beta1, beta2, eps, scale[i], mix[i], gm, alpha[i],
                  decay[i], opt(m_absmax, i), opt(v_absmax, i), block_size, seed);
    } else {
      entry_general(p, grads[i], projs[i], idx, m1, v1, prev, right, beta1, beta2, eps, scale[i], mix[i], gm, alpha[i],
                    decay[i], opt(m_absmax, i), opt(v_absmax, i), block_size, seed);
    }
  }
}

int64_t fira_small_path(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2, "mode must be -1 (query), 0 (off), 1 (on) or 2 (on, portable kernels), got ",
              mode);
  return mode >= 0 ? g_small_mode.exchange(static_cast<int>(mode)) : g_small_mode.load();
}

}  // namespace lowrank_kernels
