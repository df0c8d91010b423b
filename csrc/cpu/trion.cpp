// C++ CPU kernel of the trion family (lowrank_kernels/ops/trion.py has the schema and the
// validation, lowrank_kernels/reference/trion.py the specification): Trion's step over a list
// of weights in one call. Trion's per-parameter step (foreach=False) calls this op with a
// one-entry list, so the bucketed and the per-parameter steps are the same arithmetic.
//
// Float32 fast path (float32 gradient, momentum and basis, all contiguous, rank <= kSmallS,
// and m * n * s <= kFastMaxMacs for the scoring GEMM; the weight update also needs a float32
// contiguous weight): the whole step of an entry on raw pointers in one thread-local scratch
// arena, no ATen op at all (the general path below makes ~75 ATen calls per entry: ~1.5 ms of
// host time for the 28 tiny weights of bench.host_cost, whose arithmetic, mostly the scoring
// GEMM's 12.6M multiply-adds, takes ~0.3 ms at this CPU's one-core peak). With Mo the momentum
// in the right orientation (M on the right, M^T on the left: rows x s, s the basis order) and
// the kernels of fast_f32.h (AVX2 + FMA, or portable loops; every product element one FMA
// chain in order):
//   M      += G, element by element (ATen's add_);
//   S      = Mo B^T (rows x s, B the basis, rows its vectors), by butterfly steps where the
//          basis has the DCT's symmetry (Scoring below: two for the right side's basis, 3/8
//          of the multiply-adds; one for the left side's, half);
//   scores column sums of |S| (or S^2, then sqrt) in double, in row order, rounded to
//          float32; top-r with dct.cpp's total order (descending, NaN first, ties to the
//          lower index);
//   P      = B[idx] (r x s), gathered once and used by the two back-projections;
//   m      = Mo P^T, the selected columns of S (no product of its own), kept as Xt = X^T for
//          the Newton-Schulz (X: m in the orth family's wide orientation, m itself when it is
//          not tall, i.e. on the right with m == r);
//   M      += -(1 - mu) back(m) (fma(acc, -(1 - mu), M));
//   O      = Newton-Schulz of X, the orth family's iteration on the same GEMM
//          (newton_schulz_fast);
//   W      = decay W + alpha back(O) (fma(acc, alpha, W decay)), read and written once.
// Deterministic and single-threaded (the same result for any thread count); within float32
// rounding of the reference (the products' summation order differs from BLAS, the scores'
// by the butterfly). Everything else (other dtypes, strides, larger ranks, m * n * s above
// the bound, which is the projection fast path's one-thread bound: larger products keep
// BLAS's multi-threaded GEMMs) takes the general path: the per-stage
// kernels (M.add_(G), dct_foreach_score_topk_cpu, projection_project_cpu and
// projection_backproject_apply_cpu with the DCT projector's indices, orth_newton_schulz_cpu),
// bitwise the single ops the reference sequence names.
//
// The sharded step's halves (trion_foreach_orth_cpu: up to O; trion_foreach_apply_cpu: the
// weight update) run the same two stages, each deciding fast or general alike (stage A on
// the gradient, momentum and basis; stage B on the weight, O's dtype and the basis), so
// together they are bitwise this op. The private switch lowrank_kernels._C.projection_fast_path
// (0 off, 1 on, 2 portable kernels) also governs this fast path, for tests.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/fast_f32.h"
#include "cpu/kernels.h"
#include "cpu/topk.h"

namespace lowrank_kernels {
namespace {

// The fast path's bound on the scoring GEMM's multiply-adds per entry (m * n * s): 1024 x 64
// against a basis of order 64, or 64 x 256 on the right at s = 256.
constexpr int64_t kFastMaxMacs = int64_t(1) << 22;
// The fast path's largest rank (the orth family's raw-pointer bound too: the r x r Gram
// matrices stay small).
constexpr int64_t kSmallS = 32;

using fast::MatF;

// Whether stage A (M += G up to O) of an entry takes the fast path: float32 gradient, momentum
// and basis, contiguous, and the bounds. (The weight is not read there: the sharded step's
// orth op decides alike.)
bool fast_entry(const Tensor& g, const Tensor& M, const Tensor& basis, int64_t rank) {
  if (projection_fast_path(-1) == 0) return false;
  for (const Tensor* t : {&g, &M, &basis}) {
    if (t->scalar_type() != at::kFloat || !t->is_contiguous()) return false;
  }
  return rank <= kSmallS && M.numel() * basis.size(0) <= kFastMaxMacs;
}

// A float32 / double / index scratch arena kept per thread between calls.
struct Arena {
  std::vector<float> f;
  std::vector<double> d;
  std::vector<int64_t> i;
};

Arena& arena() {
  thread_local Arena a;
  return a;
}

// The scoring operands of a basis, prepared once per call. The DCT bases are symmetric: the
// right side's basis (C^T, rows b_j[k] = C[k, j]) has b_{s-1-j} = diag((-1)^k) b_j ("pairs of
// rows"), the left side's (C, rows b_j[k] = C[j, k]) b_j[s-1-k] = (-1)^j b_j[k] ("mirrored
// rows"). Where the basis (of even order) has one of them (to kSymUlps ulps), the scores take
// one butterfly step, two (rows x s/2 x s/2) GEMMs instead of one (rows x s x s), reading
// the first half of the basis (the scores then are those of the basis symmetrized, within a
// few ulps of the stored one; the projections use the stored rows):
//   pairs:    E = Mo[:, even k] Be, Q = Mo[:, odd k] Bo (Be[t, j] = b_j[2t], Bo[t, j] =
//             b_j[2t + 1], j < s/2); S[:, j] = E + Q, S[:, s-1-j] = E - Q;
//   mirrored: U = Mo[:, k] + Mo[:, s-1-k], V = Mo[:, k] - Mo[:, s-1-k] (k < s/2);
//             S[:, 2t] = U Be, S[:, 2t+1] = V Bo (Be[k, t] = b_{2t}[k], Bo[k, t] = b_{2t+1}[k]).
// Otherwise S = Mo B^T with B^T transposed once. Either way deterministic; the scores differ
// from the full GEMM's by float32 rounding only.
constexpr float kSymUlps = 4.0f;

struct Scoring {
  enum Kind { Unprepared, Full, Pairs, Mirrored } kind = Unprepared;
  int64_t s = 0, h = 0, h2 = 0;
  std::vector<float> bt, be, bo;  // Full: B^T (s x s); else the halves (h x h each)
  // Pairs whose even half Be has the same symmetry again (s a multiple of 4: the DCT's even
  // part is the DCT of half the order): E by a second butterfly step, Be2 / Bo2 (h2 x h2).
  bool two = false;
  std::vector<float> be2, bo2;

  void prepare(const Tensor& basis) {
    if (kind != Unprepared) return;
    const float* b = basis.const_data_ptr<float>();
    s = basis.size(0);
    h = s / 2;
    // The symmetry within kSymUlps float32 ulps of the basis' largest element (the DCT
    // matrices of most orders hold it to the last bit; others, e.g. 40 or 172, to an ulp).
    float amax = 0.0f;
    for (int64_t k = 0; k < s * s; ++k) amax = std::max(amax, std::abs(b[k]));
    const float tol = kSymUlps * std::numeric_limits<float>::epsilon() * amax;
    auto near = [tol](float x, float y) { return std::abs(x - y) <= tol; };  // false for NaN
    auto pairs = [&] {
      for (int64_t j = 0; j < h; ++j) {
        for (int64_t k = 0; k < s; ++k) {
          const float v = b[j * s + k];
          if (!near(b[(s - 1 - j) * s + k], (k & 1) ? -v : v)) return false;
        }
      }
      return true;
    };
    auto mirrored = [&] {
      for (int64_t j = 0; j < s; ++j) {
        for (int64_t k = 0; k < h; ++k) {
          const float v = b[j * s + k];
          if (!near(b[j * s + s - 1 - k], (j & 1) ? -v : v)) return false;
        }
      }
      return true;
    };
    if (s >= 2 && s % 2 == 0 && pairs()) {
      kind = Pairs;
      be.resize(h * h);
      bo.resize(h * h);
      for (int64_t t = 0; t < h; ++t) {
        for (int64_t j = 0; j < h; ++j) {
          be[t * h + j] = b[j * s + 2 * t];
          bo[t * h + j] = b[j * s + 2 * t + 1];
        }
      }
      // Be's columns as vectors over t: Be[t, h-1-j] = (-1)^t Be[t, j] for j < h / 2?
      h2 = h / 2;
      two = h >= 2 && h % 2 == 0;
      for (int64_t j = 0; two && j < h2; ++j) {
        for (int64_t t = 0; t < h; ++t) {
          const float v = be[t * h + j];
          if (!near(be[t * h + h - 1 - j], (t & 1) ? -v : v)) {
            two = false;
            break;
          }
        }
      }
      if (two) {
        be2.resize(h2 * h2);
        bo2.resize(h2 * h2);
        for (int64_t t = 0; t < h2; ++t) {
          for (int64_t j = 0; j < h2; ++j) {
            be2[t * h2 + j] = be[(2 * t) * h + j];
            bo2[t * h2 + j] = be[(2 * t + 1) * h + j];
          }
        }
      }
    } else if (s >= 2 && s % 2 == 0 && mirrored()) {
      kind = Mirrored;
      be.resize(h * h);
      bo.resize(h * h);
      for (int64_t k = 0; k < h; ++k) {
        for (int64_t t = 0; t < h; ++t) {
          be[k * h + t] = b[(2 * t) * s + k];
          bo[k * h + t] = b[(2 * t + 1) * s + k];
        }
      }
    } else {
      kind = Full;
      bt.resize(s * s);
      for (int64_t a = 0; a < s; ++a) {
        for (int64_t c = 0; c < s; ++c) bt[c * s + a] = b[a * s + c];
      }
    }
  }

  // Floats of scratch scores() needs for `rows` rows.
  int64_t scratch(int64_t rows) const {
    return kind == Full ? rows * s : (kind == Pairs ? (two ? 3 : 2) : 4) * rows * h;
  }

  // sc[j] = sum over i of |S[i, j]| (norm 1) or S[i, j]^2 (norm 2), in double, in row order.
  // hi: s / 2 doubles of scratch.
  void scores(const MatF& Mo, int norm, float* ws, double* sc, double* hi, bool portable) const {
    const int64_t rows = Mo.rows;
    std::fill(sc, sc + s, 0.0);
    auto add = [norm](double& acc, float x) {
      const double d = static_cast<double>(x);
      acc += norm == 1 ? std::abs(d) : d * d;
    };
    if (kind == Full) {
      const MatF S{ws, rows, s, s, 1};
      fast::gemm_rows(S, Mo, MatF{const_cast<float*>(bt.data()), s, s, s, 1}, 1.0f, 0.0f, portable);
      for (int64_t i = 0; i < rows; ++i) {
        const float* row = ws + i * s;
        for (int64_t j = 0; j < s; ++j) add(sc[j], row[j]);
      }
      return;
    }
    float* E = ws;
    float* Q = ws + rows * h;
    const MatF Be{const_cast<float*>(be.data()), h, h, h, 1}, Bo{const_cast<float*>(bo.data()), h, h, h, 1};
    std::fill(hi, hi + h, 0.0);
    if (kind == Pairs && two) {
      // E = E2 (+/-) Q2: E2 = Mo[:, k = 0 mod 4] Be2, Q2 = Mo[:, k = 2 mod 4] Bo2.
      float* E2 = ws + 2 * rows * h;
      float* Q2 = E2 + rows * h2;
      fast::gemm_rows(MatF{E2, rows, h2, h2, 1}, MatF{Mo.p, rows, h2, Mo.rs, 4 * Mo.cs},
                      MatF{const_cast<float*>(be2.data()), h2, h2, h2, 1}, 1.0f, 0.0f, portable);
      fast::gemm_rows(MatF{Q2, rows, h2, h2, 1}, MatF{Mo.p + 2 * Mo.cs, rows, h2, Mo.rs, 4 * Mo.cs},
                      MatF{const_cast<float*>(bo2.data()), h2, h2, h2, 1}, 1.0f, 0.0f, portable);
      for (int64_t i = 0; i < rows; ++i) {
        const float* e2 = E2 + i * h2;
        const float* q2 = Q2 + i * h2;
        float* e = E + i * h;
        for (int64_t j = 0; j < h2; ++j) {
          e[j] = e2[j] + q2[j];
          e[h - 1 - j] = e2[j] - q2[j];
        }
      }
    } else if (kind == Pairs) {
      fast::gemm_rows(MatF{E, rows, h, h, 1}, MatF{Mo.p, rows, h, Mo.rs, 2 * Mo.cs}, Be, 1.0f, 0.0f, portable);
    }
    if (kind == Pairs) {
      fast::gemm_rows(MatF{Q, rows, h, h, 1}, MatF{Mo.p + Mo.cs, rows, h, Mo.rs, 2 * Mo.cs}, Bo, 1.0f, 0.0f,
                      portable);
      for (int64_t i = 0; i < rows; ++i) {
        const float* e = E + i * h;
        const float* q = Q + i * h;
        for (int64_t j = 0; j < h; ++j) {
          add(sc[j], e[j] + q[j]);
          add(hi[j], e[j] - q[j]);
        }
      }
      for (int64_t j = 0; j < h; ++j) sc[s - 1 - j] = hi[j];
      return;
    }
    // Mirrored: U^T, V^T (h x rows) first, so that the passes run along Mo's rows when Mo is M^T.
    float* UT = ws + 2 * rows * h;
    float* VT = ws + 3 * rows * h;
    for (int64_t k = 0; k < h; ++k) {
      const float* a = Mo.p + k * Mo.cs;
      const float* c = Mo.p + (s - 1 - k) * Mo.cs;
      float* u = UT + k * rows;
      float* v = VT + k * rows;
      for (int64_t i = 0; i < rows; ++i) {
        const float x = a[i * Mo.rs], y = c[i * Mo.rs];
        u[i] = x + y;
        v[i] = x - y;
      }
    }
    fast::gemm_rows(MatF{E, rows, h, h, 1}, MatF{UT, h, rows, rows, 1}.t(), Be, 1.0f, 0.0f, portable);
    fast::gemm_rows(MatF{Q, rows, h, h, 1}, MatF{VT, h, rows, rows, 1}.t(), Bo, 1.0f, 0.0f, portable);
    for (int64_t i = 0; i < rows; ++i) {
      const float* e = E + i * h;
      const float* q = Q + i * h;
      for (int64_t t = 0; t < h; ++t) {
        add(sc[t], e[t]);
        add(hi[t], q[t]);
      }
    }
    for (int64_t t = h - 1; t >= 0; --t) {  // interleave: even j from sc[t], odd j from hi[t]
      const double ev = sc[t], od = hi[t];
      sc[2 * t] = ev;
      sc[2 * t + 1] = od;
    }
  }

  // L[i, a] = S[i, cols[a]] (rows x r) from the scratch `ws` of the last scores() call: the
  // projection m = Mo B[idx]^T is a part of the scores' product, no GEMM of its own.
  void gather(const float* ws, int64_t rows, const int64_t* cols, int64_t r, float* L) const {
    const float* E = ws;
    const float* Q = ws + rows * h;
    for (int64_t a = 0; a < r; ++a) {
      const int64_t j = cols[a];
      if (kind == Full) {
        for (int64_t i = 0; i < rows; ++i) L[i * r + a] = ws[i * s + j];
      } else if (kind == Pairs && j < h) {
        for (int64_t i = 0; i < rows; ++i) L[i * r + a] = E[i * h + j] + Q[i * h + j];
      } else if (kind == Pairs) {
        const int64_t jj = s - 1 - j;
        for (int64_t i = 0; i < rows; ++i) L[i * r + a] = E[i * h + jj] - Q[i * h + jj];
      } else {
        const float* src = (j % 2 == 0 ? E : Q) + j / 2;
        for (int64_t i = 0; i < rows; ++i) L[i * r + a] = src[i * h];
      }
    }
  }
};

// Newton-Schulz in the orth family's iteration, on Xt = X^T (l x r, contiguous, r <= l: X the
// wide orientation r x l), with fast_f32.h's GEMM and no transposes: Xt / (||Xt||_F + eps)
// (the sum of squares in double, in four lanes), then per (a, b, c) triple A = X X^T = Xt^T Xt,
// B = b A + c A A, Xt' = a Xt + Xt B (= (a X + B X)^T: A and so B are symmetric bit for bit,
// their (i, j) and (j, i) elements being the same FMA chains). Each product element one FMA
// chain in order, then fma(acc, alpha, C beta). Within float32 rounding of the orth family's
// kernels. A2: 2 r x r scratch; Yt: l x r. Returns the result (Xt or Yt).
float* newton_schulz_fast(float* Xt, float* Yt, float* A2, int64_t r, int64_t l, at::ArrayRef<double> coefficients,
                          double eps, bool portable) {
  // The sum of squares in 4 double lanes (element k in lane k % 4), then (l0 + l1) + (l2 + l3).
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t k = 0; k < r * l; ++k) lane[k & 3] += static_cast<double>(Xt[k]) * static_cast<double>(Xt[k]);
  const double sq = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  const float denom = static_cast<float>(std::sqrt(sq) + eps);
  for (int64_t k = 0; k < r * l; ++k) Xt[k] = Xt[k] / denom;
  float* A = A2;
  float* B = A2 + r * r;
  const MatF Am{A, r, r, r, 1}, Bm{B, r, r, r, 1};
  for (size_t it = 0; it < coefficients.size(); it += 3) {
    const float a = static_cast<float>(coefficients[it]), b = static_cast<float>(coefficients[it + 1]),
                c = static_cast<float>(coefficients[it + 2]);
    const MatF X{Xt, l, r, r, 1};
    fast::gemm_rows(Am, X.t(), X, 1.0f, 0.0f, portable);
    std::copy(A, A + r * r, B);
    fast::gemm_rows(Bm, Am, Am, c, b, portable);
    std::copy(Xt, Xt + r * l, Yt);
    fast::gemm_rows(MatF{Yt, l, r, r, 1}, X, Bm, 1.0f, a, portable);
    std::swap(Xt, Yt);
  }
  return Xt;
}

// Stage A of the fast path (module comment: M += G up to O) on one entry. W is not read.
// G, Mp: m x n row-major; basis and bt (its transpose): s x s row-major. Writes the r selected
// indices to idx_out and returns O in the arena: r x rows (X's orientation; for the right side
// with m == r, m itself, r x r); also *P_out: the gathered rows B[idx] (r x s) in the arena.
struct StageA {
  const float* O = nullptr;
  const float* P = nullptr;
  int64_t rows = 0;
  bool o_is_low = false;  // O is laid out as the low-rank m (right side, m == r)
};

StageA fast_stage_a(const float* G, float* Mp, int64_t m, int64_t n, bool right, const float* basis,
                    const Scoring& scoring, int64_t s, int64_t r, int norm, at::ArrayRef<double> coefficients,
                    double eps, double mu, bool portable, int32_t* idx_out) {
  const int64_t numel = m * n;
  for (int64_t k = 0; k < numel; ++k) Mp[k] = Mp[k] + G[k];
  const int64_t rows = right ? m : n;  // Mo: rows x s
  const MatF Mo = right ? MatF{Mp, m, n, n, 1} : MatF{Mp, n, m, 1, n};
  Arena& ar = arena();
  const int64_t sw = scoring.scratch(rows);
  const int64_t need = sw + r * s + 3 * rows * r + s + 2 * r * r;
  if (static_cast<int64_t>(ar.f.size()) < need) ar.f.resize(need);
  if (static_cast<int64_t>(ar.d.size()) < 2 * s) ar.d.resize(2 * s);
  if (static_cast<int64_t>(ar.i.size()) < s) ar.i.resize(s);
  float* Sp = ar.f.data();       // the scores' scratch
  float* Pp = Sp + sw;           // r x s
  float* Lp = Pp + r * s;        // rows x r: Mo P^T
  float* Xp = Lp + rows * r;     // rows x r: Xt, then O^T (left side)
  float* Yp = Xp + rows * r;     // rows x r
  float* scf = Yp + rows * r;    // s
  float* A2 = scf + s;           // 2 r x r (Newton-Schulz)

  // Scores and top-r.
  double* sc = ar.d.data();
  scoring.scores(Mo, norm, Sp, sc, sc + s, portable);
  for (int64_t j = 0; j < s; ++j) scf[j] = static_cast<float>(norm == 1 ? sc[j] : std::sqrt(sc[j]));
  int64_t* order = ar.i.data();
  topk_order(scf, order, s, r);
  for (int64_t a = 0; a < r; ++a) {
    idx_out[a] = static_cast<int32_t>(order[a]);
    std::copy(basis + order[a] * s, basis + (order[a] + 1) * s, Pp + a * s);
  }
  const MatF P{Pp, r, s, s, 1};
  const float am = static_cast<float>(-(1.0 - mu));
  const MatF Mw{Mp, m, n, n, 1};  // M as stored
  // L = Mo P^T (rows x r), the selected columns of S: m on the right (m x r), m^T on the left
  // (m = B[idx] M, r x n).
  scoring.gather(Sp, rows, order, r, Lp);
  StageA out;
  out.P = Pp;
  out.rows = rows;
  // M += -(1 - mu) back(m), then Xt = X^T for the Newton-Schulz (X: m in the orth family's
  // wide orientation; m itself when it is not tall, i.e. the right side with m == r).
  float* Xt = Lp;
  if (right) {
    fast::gemm_rows(Mw, MatF{Lp, rows, r, r, 1}, P, am, 1.0f, portable);  // M += am m P
    out.o_is_low = rows == r;
    if (out.o_is_low) {
      Xt = Xp;
      for (int64_t i = 0; i < r; ++i) {
        for (int64_t a = 0; a < r; ++a) Xt[a * r + i] = Lp[i * r + a];
      }
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) {  // m = L^T (r x n), contiguous for the product
      for (int64_t a = 0; a < r; ++a) Xp[a * rows + i] = Lp[i * r + a];
    }
    fast::gemm_rows(Mw, P.t(), MatF{Xp, r, n, n, 1}, am, 1.0f, portable);  // M += am B[idx]^T m
  }
  out.O = newton_schulz_fast(Xt, Xt == Lp ? Yp : Lp, A2, r, rows, coefficients, eps, portable);  // O^T
  return out;
}

// O of stage A (stored as O^T, rows x r) as a view in the low-rank shape (m x r on the
// right, r x n on the left).
MatF low_view(const StageA& a, int64_t r, bool right) {
  const MatF Ot{const_cast<float*>(a.O), a.rows, r, r, 1};
  if (right && !a.o_is_low) return Ot;
  return Ot.t();
}

// Whether stage B (W = decay W + alpha back(O)) takes the fast path: float32 W and basis,
// contiguous, a float32 O, and the fast path's bounds.
bool fast_apply(const Tensor& p, const Tensor& basis, int64_t rank, bool o_float) {
  if (projection_fast_path(-1) == 0 || !o_float) return false;
  if (p.scalar_type() != at::kFloat || basis.scalar_type() != at::kFloat) return false;
  if (!p.is_contiguous() || !basis.is_contiguous()) return false;
  return rank <= kSmallS && p.numel() * basis.size(0) <= kFastMaxMacs;
}

// Stage B of the fast path: W (m x n row-major) = decay W + alpha back(O), O the low-rank
// update (m x r on the right, any strides; r x n with unit column stride on the left), P =
// B[idx] (r x s row-major): every element one FMA chain over r, then fma(acc, alpha, W decay).
void fast_stage_b(float* W, int64_t m, int64_t n, bool right, const MatF& O, const MatF& P, double alpha, double decay,
                  bool portable) {
  const float fa = static_cast<float>(alpha), fd = static_cast<float>(decay);
  const MatF Ww{W, m, n, n, 1};
  if (right) {
    fast::gemm_rows(Ww, O, P, fa, fd, portable);
  } else if (O.cs == 1 || O.cols == 1) {
    fast::gemm_rows(Ww, P.t(), O, fa, fd, portable);
  } else {  // O^T stored: a row-major copy (the values, so the same result)
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(O.rows * O.cols));
    for (int64_t i = 0; i < O.rows; ++i) {
      for (int64_t j = 0; j < O.cols; ++j) buf[i * O.cols + j] = O.p[i * O.rs + j * O.cs];
    }
    fast::gemm_rows(Ww, P.t(), MatF{buf.data(), O.rows, O.cols, O.cols, 1}, fa, fd, portable);
  }
}

// Rows idx (r int32) of the s x s row-major basis into P (r x s).
void gather_rows(const float* basis, const int32_t* idx, int64_t r, int64_t s, float* P) {
  for (int64_t a = 0; a < r; ++a) std::copy(basis + idx[a] * s, basis + (idx[a] + 1) * s, P + a * s);
}

// The general stage A of one entry: the single ops' kernels. Returns O (the low-rank shape)
// and writes the indices into idx (a 1-D int32 tensor of rank elements).
Tensor general_stage_a(const Tensor& grad, Tensor M, const Tensor& basis, bool right, int64_t rank, int64_t norm,
                       at::ArrayRef<double> coefficients, double eps, double mu, Tensor idx) {
  const c10::string_view sd = right ? "right" : "left";
  M.add_(grad);
  const Tensor sel = dct_foreach_score_topk_cpu({M}, basis, rank, sd, norm).select(0, 0);
  idx.copy_(sel);
  Tensor low = projection_project_cpu(M, basis, sd, sel, std::nullopt, std::nullopt, 0, 0);
  projection_backproject_apply_cpu(M, low, basis, sd, -(1.0 - mu), 1.0, sel, std::nullopt, std::nullopt, 0, 0,
                                   std::nullopt, std::nullopt);
  return orth_newton_schulz_cpu(low, coefficients, eps);
}

void general_stage_b(Tensor p, const Tensor& orth, const Tensor& basis, bool right, const Tensor& idx, double alpha,
                     double decay) {
  projection_backproject_apply_cpu(p, orth, basis, right ? "right" : "left", alpha, decay, idx, std::nullopt,
                                   std::nullopt, 0, 0, std::nullopt, std::nullopt);
}

// A contiguous tensor copy of the fast stage A's O in the low-rank shape.
Tensor low_tensor(const MatF& o, const at::TensorOptions& opts) {
  Tensor out = at::empty({o.rows, o.cols}, opts.dtype(at::kFloat));
  float* q = out.data_ptr<float>();
  for (int64_t i = 0; i < o.rows; ++i) {
    for (int64_t j = 0; j < o.cols; ++j) q[i * o.cols + j] = o.p[i * o.rs + j * o.cs];
  }
  return out;
}

void check_entries(at::TensorList params, at::TensorList grads, at::TensorList momentum, const Tensor& basis,
                   bool right, int64_t rank) {
  TORCH_CHECK(basis.device().is_cpu() && basis.dim() == 2 && basis.size(0) == basis.size(1));
  const int64_t s = basis.size(0);
  for (size_t i = 0; i < momentum.size(); ++i) {
    const Tensor& M = momentum[i];
    TORCH_CHECK(M.device().is_cpu() && M.dim() == 2);
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].sizes() == M.sizes());
    if (!params.empty()) TORCH_CHECK(params[i].device().is_cpu() && params[i].sizes() == M.sizes());
    TORCH_CHECK((right ? M.size(1) : M.size(0)) == s);
    TORCH_CHECK(rank >= 1 && rank <= std::min(M.size(0), M.size(1)));
  }
}

}  // namespace

void trion_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                              const Tensor& basis, c10::string_view side, int64_t rank, int64_t norm,
                              at::ArrayRef<double> coefficients, double eps, at::ArrayRef<double> mu,
                              at::ArrayRef<double> alpha, at::ArrayRef<double> decay) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && momentum.size() == k && mu.size() == k && alpha.size() == k && decay.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(norm == 1 || norm == 2);
  TORCH_CHECK(coefficients.size() % 3 == 0);
  check_entries(params, grads, momentum, basis, right, rank);
  if (k == 0) return;
  const int64_t s = basis.size(0);
  const bool portable = projection_fast_path(-1) == 2;
  Scoring scoring;
  std::vector<int32_t> idx(static_cast<size_t>(rank));
  std::vector<float> pbuf;
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i], M = momentum[i];
    const int64_t m = p.size(0), n = p.size(1);
    if (fast_entry(grads[i], M, basis, rank)) {
      scoring.prepare(basis);
      const StageA a = fast_stage_a(grads[i].const_data_ptr<float>(), M.data_ptr<float>(), m, n, right,
                                    basis.const_data_ptr<float>(), scoring, s, rank, static_cast<int>(norm),
                                    coefficients, eps, mu[i], portable, idx.data());
      const MatF O = low_view(a, rank, right);
      if (fast_apply(p, basis, rank, true)) {
        fast_stage_b(p.data_ptr<float>(), m, n, right, O, MatF{const_cast<float*>(a.P), rank, s, s, 1}, alpha[i],
                     decay[i], portable);
      } else {
        const Tensor orth = low_tensor(O, M.options());
        const Tensor sel = at::from_blob(idx.data(), {rank}, at::TensorOptions().dtype(at::kInt)).clone();
        general_stage_b(p, orth, basis, right, sel, alpha[i], decay[i]);
      }
      continue;
    }
    Tensor sel = at::empty({rank}, basis.options().dtype(at::kInt));
    const Tensor orth = general_stage_a(grads[i], M, basis, right, rank, norm, coefficients, eps, mu[i], sel);
    if (fast_apply(p, basis, rank, orth.scalar_type() == at::kFloat)) {
      const Tensor o = orth.contiguous();
      pbuf.resize(static_cast<size_t>(rank * s));
      gather_rows(basis.const_data_ptr<float>(), sel.const_data_ptr<int32_t>(), rank, s, pbuf.data());
      fast_stage_b(p.data_ptr<float>(), m, n, right, MatF{o.data_ptr<float>(), o.size(0), o.size(1), o.size(1), 1},
                   MatF{pbuf.data(), rank, s, s, 1}, alpha[i], decay[i], portable);
    } else {
      general_stage_b(p, orth, basis, right, sel, alpha[i], decay[i]);
    }
  }
}

void trion_foreach_orth_cpu(at::TensorList grads, at::TensorList momentum, const Tensor& basis, c10::string_view side,
                            int64_t rank, int64_t norm, at::ArrayRef<double> coefficients, double eps,
                            at::ArrayRef<double> mu, at::TensorList orths, const Tensor& indices) {
  const size_t k = momentum.size();
  TORCH_CHECK(grads.size() == k && mu.size() == k && orths.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(norm == 1 || norm == 2);
  TORCH_CHECK(coefficients.size() % 3 == 0);
  check_entries({}, grads, momentum, basis, right, rank);
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kInt && indices.dim() == 2 &&
              indices.size(0) == static_cast<int64_t>(k) && indices.size(1) == rank);
  for (size_t i = 0; i < k; ++i) {
    const Tensor& M = momentum[i];
    const std::vector<int64_t> want = right ? std::vector<int64_t>{M.size(0), rank}
                                            : std::vector<int64_t>{rank, M.size(1)};
    TORCH_CHECK(orths[i].device().is_cpu() && orths[i].sizes() == at::IntArrayRef(want));
  }
  const int64_t s = basis.size(0);
  const bool portable = projection_fast_path(-1) == 2;
  Scoring scoring;
  std::vector<int32_t> idx(static_cast<size_t>(rank));
  for (size_t i = 0; i < k; ++i) {
    Tensor M = momentum[i];
    Tensor sel = indices.select(0, static_cast<int64_t>(i));
    Tensor out = orths[i];
    if (fast_entry(grads[i], M, basis, rank)) {
      scoring.prepare(basis);
      const StageA a = fast_stage_a(grads[i].const_data_ptr<float>(), M.data_ptr<float>(), M.size(0), M.size(1),
                                    right, basis.const_data_ptr<float>(), scoring, s, rank,
                                    static_cast<int>(norm), coefficients, eps, mu[i], portable, idx.data());
      int32_t* ip = sel.data_ptr<int32_t>();
      for (int64_t j = 0; j < rank; ++j) ip[j * sel.stride(0)] = idx[j];
      const MatF o = low_view(a, rank, right);
      if (out.scalar_type() == at::kFloat) {
        float* q = out.data_ptr<float>();
        for (int64_t r0 = 0; r0 < o.rows; ++r0) {
          for (int64_t c = 0; c < o.cols; ++c) q[r0 * out.stride(0) + c * out.stride(1)] = o.p[r0 * o.rs + c * o.cs];
        }
      } else {
        out.copy_(low_tensor(o, M.options()));
      }
    } else {
      out.copy_(general_stage_a(grads[i], M, basis, right, rank, norm, coefficients, eps, mu[i], sel));
    }
  }
}

void trion_foreach_apply_cpu(at::TensorList params, at::TensorList orths, const Tensor& indices, const Tensor& basis,
                             c10::string_view side, at::ArrayRef<double> alpha, at::ArrayRef<double> decay) {
  const size_t k = params.size();
  TORCH_CHECK(orths.size() == k && alpha.size() == k && decay.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(basis.device().is_cpu() && basis.dim() == 2 && basis.size(0) == basis.size(1));
  TORCH_CHECK(indices.device().is_cpu() && indices.dim() == 2 && indices.size(0) == static_cast<int64_t>(k));
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong);
  const int64_t s = basis.size(0), rank = indices.size(1);
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.dim() == 2 && (right ? p.size(1) : p.size(0)) == s);
    TORCH_CHECK(rank >= 1 && rank <= std::min(p.size(0), p.size(1)));
    const std::vector<int64_t> want = right ? std::vector<int64_t>{p.size(0), rank}
                                            : std::vector<int64_t>{rank, p.size(1)};
    TORCH_CHECK(orths[i].device().is_cpu() && orths[i].sizes() == at::IntArrayRef(want));
  }
  const Tensor idx32 = indices.to(at::kInt).contiguous();
  for (int64_t i = 0; i < idx32.size(0); ++i) {
    for (int64_t a = 0; a < rank; ++a) {
      const int32_t v = idx32.const_data_ptr<int32_t>()[i * rank + a];
      TORCH_CHECK(v >= 0 && v < s, "trion_foreach_apply: index ", v, " out of range for a basis of order ", s);
    }
  }
  const bool portable = projection_fast_path(-1) == 2;
  std::vector<float> pbuf;
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor sel = idx32.select(0, static_cast<int64_t>(i));
    if (fast_apply(p, basis, rank, orths[i].scalar_type() == at::kFloat)) {
      const Tensor o = orths[i].contiguous();
      pbuf.resize(static_cast<size_t>(rank * s));
      gather_rows(basis.const_data_ptr<float>(), sel.const_data_ptr<int32_t>(), rank, s, pbuf.data());
      fast_stage_b(p.data_ptr<float>(), p.size(0), p.size(1), right,
                   MatF{const_cast<float*>(o.const_data_ptr<float>()), o.size(0), o.size(1), o.size(1), 1},
                   MatF{pbuf.data(), rank, s, s, 1}, alpha[i], decay[i], portable);
    } else {
      general_stage_b(p, orths[i], basis, right, sel, alpha[i], decay[i]);
    }
  }
}

}  // namespace lowrank_kernels
