// C++ CPU kernel of the gradnormlorp family (lowrank_kernels/ops/gradnormlorp.py has the schema
// and the validation, lowrank_kernels/reference/gradnormlorp.py the specification):
// GradNormLoRP's non-refresh step over a list of float32 weights in one call.
//
// Bit-identical to the per-parameter step of GradNormLoRPAdamW (the reference's loop calling the
// projection ops, which run their C++ kernels on CPU):
// the operations whose rounding depends on an algorithm (the row sums, in the reference's row
// panels; the GEMMs; the three length-m square roots, since ATen's float32 sqrt does not always
// round as std::sqrt does) are the very ATen calls the Python step makes, the magnitude's Adam
// moments round as ATen's add_ / addcmul_ kernels of this CPU capability do (fused
// multiply-adds on AVX2 / AVX512, measured on torch 2.13), the projected Adam and the
// per-row back-projection are the projection family's C++ kernels, and the rest (length-m
// vectors and the m x n direction gradient) is plain float32 arithmetic in the reference's
// order, one IEEE operation per ATen operation (no two fused: this file is compiled for the
// baseline ISA, setup.py passes no -march, which has no FMA instruction to contract them into).
// A Python float multiplying a float32 tensor is rounded to float32 first, as ATen does.
// For the common float32 case (plain moments, a contiguous dense projector, sizes ATen reduces
// serially) the same results come without the dispatcher: see "the reproduced path" below.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cpu/aten_order.h"
#include "cpu/direct.h"
#include "cpu/fast_f32.h"
#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

// The reference's panel height (PANEL_ELEMS = 1 << 20 elements per row panel).
constexpr int64_t kPanelElems = int64_t(1) << 20;

int64_t panel_rows(int64_t n) { return std::max<int64_t>(1, kPanelElems / std::max<int64_t>(n, 1)); }

// rowsum(x * y) of two m x n float32 matrices, panel by panel (reference: row_dots).
Tensor row_dots(const Tensor& x, const Tensor& y) {
  const int64_t m = x.size(0), rows = panel_rows(x.size(1));
  if (rows >= m) return at::sum(at::mul(x, y), 1);
  Tensor out = at::empty({m}, x.options());
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t e = std::min(m, i + rows);
    out.slice(0, i, e).copy_(at::sum(at::mul(x.slice(0, i, e), y.slice(0, i, e)), 1));
  }
  return out;
}

// w @ right (m x n times n x r), panel by panel (reference: row_panel_matmul).
Tensor row_panel_matmul(const Tensor& w, const Tensor& right) {
  const int64_t m = w.size(0), rows = panel_rows(w.size(1));
  Tensor out = at::empty({m, right.size(1)}, w.options());
  for (int64_t i = 0; i < m; i += rows) {
    const int64_t e = std::min(m, i + rows);
    Tensor o = out.slice(0, i, e);
    at::matmul_out(o, w.slice(0, i, e), right);
  }
  return out;
}

inline float sign_of(float x) { return static_cast<float>((0.f < x) - (x < 0.f)); }
inline float safe_div(float x, float y) { return y > 0.f ? x / y : 0.f; }
inline float clamp_min(float x, float lo) { return std::isnan(x) ? x : std::max(x, lo); }

// ------------------------------------------------------------------ the reproduced path
// For a float32 weight with plain float32 moments, a dense contiguous projector and sizes
// whose reductions ATen runs serially, the step's ATen calls are replaced by their results
// computed without the dispatcher, bit for bit (each replacement behind a one-time bitwise
// comparison with ATen's own call in this process; where one fails, ATen's call stays):
//   - the GEMMs: the sgemm call ATen's CPU mm makes, made directly (aten_order::mm_into), and
//     the back-projection's rank-inner panel GEMMs as in-order FMA chains (fast::gemm_rows:
//     see "the back-projection panels" below), on views of scratch memory;
//   - the square roots: MKL's vector square root, what ATen's float32 sqrt kernel calls
//     (aten_order::vsqrt), else at::cpu::sqrt_out;
//   - the row sums rowsum(x * y): the float32 products summed in ATen's order (aten_order.h);
//   - the projected Adam's moments m.mul_(b1).add_(R, 1 - b1), v.mul_(b2).addcmul_(R, R, 1 - b2):
//     raw loops with the rounding ATen's kernels give here (fused or not, moment_rule());
//   - the back-projection with per-row factors: the engine's panels (csrc/cpu/projection/
//     engine.cpp: the same panel GEMMs, then w * rd + c * ra per element).

const at::TensorOptions& f32() {
  static const at::TensorOptions o = at::TensorOptions().dtype(at::kFloat);
  return o;
}

Tensor blob(float* p, at::IntArrayRef sizes) { return at::from_blob(p, sizes, f32()); }
Tensor blob(float* p, at::IntArrayRef sizes, at::IntArrayRef strides) { return at::from_blob(p, sizes, strides, f32()); }

// out = at::sqrt(x) for contiguous float32 out and x of one length: MKL's vector square root
// called directly where aten_order::vsqrt's check passed, else ATen's sqrt kernel undispatched.
void sqrt_into(Tensor& out, const Tensor& x) {
  if (!aten_order::vsqrt(x.data_ptr<float>(), out.data_ptr<float>(), x.numel())) at::cpu::sqrt_out(out, x);
}

// out[i] = rowsum(x * y) of two contiguous m x n float32 matrices: the products (one
// rounding each, as at::mul), then at::sum(., 1) in ATen's order.
void row_dots_raw(const float* x, const float* y, int64_t m, int64_t n, float* /*prod*/, float* out) {
  aten_order::row_dots(x, y, m, n, out);
}

// One row of the direction gradient, o = g * c1 - w * c2, and one row of the weight update,
// w = w * fd + c * fa: three float32 roundings per element, as the reference's ATen ops (the
// AVX build has no FMA either: nothing is contracted). The AVX build serves the reproduced
// path, which runs on AVX2 CPUs only.
#define GNL_DIR_ROW_BODY                  \
  for (int64_t j = 0; j < n; ++j) {       \
    const float x = g[j] * c1;            \
    const float y = w[j] * c2;            \
    o[j] = x - y;                         \
  }
#define GNL_APPLY_ROW_BODY                \
  for (int64_t j = 0; j < n; ++j) {       \
    const float x = w[j] * fd;            \
    const float y = c[j] * fa;            \
    w[j] = x + y;                         \
  }

__attribute__((target("avx2"))) void dir_row_avx(const float* g, const float* w, float* o, int64_t n, float c1,
                                                 float c2) {
  GNL_DIR_ROW_BODY
}

__attribute__((target("avx2"))) void apply_row_avx(float* w, const float* c, int64_t n, float fd, float fa) {
  GNL_APPLY_ROW_BODY
}

void dir_row(const float* g, const float* w, float* o, int64_t n, float c1, float c2) { GNL_DIR_ROW_BODY }

// The moments' update, m <- m * b1 (+) R * w1 and v <- v * b2 (+) (w2 * R) * R, with (+)
// fused into one rounding (fma) or not, per `rule` (bit 0: add_'s, bit 1: addcmul_'s).
#define GNL_MOMENTS_BODY(FMA)                                                  \
  for (int64_t j = 0; j < len; ++j) {                                          \
    const float m1 = m[j] * b1;                                                \
    const float v1 = v[j] * b2;                                                \
    const float x = R[j];                                                      \
    const float wx = w2 * x;                                                   \
    if (rule & 1) {                                                            \
      m[j] = FMA(x, w1, m1);                                                   \
    } else {                                                                   \
      const float t = x * w1;                                                  \
      m[j] = m1 + t;                                                           \
    }                                                                          \
    if (rule & 2) {                                                            \
      v[j] = FMA(wx, x, v1);                                                   \
    } else {                                                                   \
      const float t = wx * x;                                                  \
      v[j] = v1 + t;                                                           \
    }                                                                          \
  }

__attribute__((target("avx2,fma"))) void moments_fma(float* m, float* v, const float* R, int64_t len, float b1,
                                                     float w1, float b2, float w2, int rule) {
  GNL_MOMENTS_BODY(__builtin_fmaf)
}

void moments_portable(float* m, float* v, const float* R, int64_t len, float b1, float w1, float b2, float w2,
                      int rule) {
  GNL_MOMENTS_BODY(std::fma)
}

void moments(float* m, float* v, const float* R, int64_t len, double beta1, double beta2, int rule) {
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float w1 = static_cast<float>(1.0 - beta1), w2 = static_cast<float>(1.0 - beta2);
  // The FMA build only for both fused (its compiler could contract the unfused pairs).
  if (rule == 3 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    moments_fma(m, v, R, len, b1, w1, b2, w2, rule);
  } else {
    moments_portable(m, v, R, len, b1, w1, b2, w2, rule);
  }
}

// Which rounding rule reproduces ATen's m.mul_(b1).add_(R, 1 - b1), v.mul_(b2).addcmul_(R, R,
// 1 - b2) on this CPU and torch (vector bodies and scalar tails, lengths 1..40 and longer),
// decided once by comparison with ATen's calls; -1: none (the reproduced path stays off).
int moment_rule_checked() {
  const double beta1 = 0.9, beta2 = 0.999;
  std::vector<int64_t> lens;
  for (int64_t l = 1; l <= 40; ++l) lens.push_back(l);
  for (int64_t l : {64, 100, 172, 512, 1376, 4099}) lens.push_back(l);
  for (int rule = 3; rule >= 0; --rule) {
    bool ok = true;
    for (int64_t len : lens) {
      std::vector<float> r = aten_order::check_data(len, 5 * len + 1);
      std::vector<float> m = aten_order::check_data(len, 5 * len + 2);
      std::vector<float> v = aten_order::check_data(len, 5 * len + 3);
      for (float& x : v) x = std::fabs(x);
      Tensor rt = blob(r.data(), {len}).clone(), mt = blob(m.data(), {len}).clone(), vt = blob(v.data(), {len}).clone();
      mt.mul_(beta1).add_(rt, 1.0 - beta1);
      vt.mul_(beta2).addcmul_(rt, rt, 1.0 - beta2);
      moments(m.data(), v.data(), r.data(), len, beta1, beta2, rule);
      if (std::memcmp(m.data(), mt.data_ptr<float>(), len * sizeof(float)) != 0 ||
          std::memcmp(v.data(), vt.data_ptr<float>(), len * sizeof(float)) != 0) {
        ok = false;
        break;
      }
    }
    if (ok) return rule;
  }
  return -1;
}

int moment_rule() {
  static const int rule = aten_order::ready() ? moment_rule_checked() : -1;
  return rule;
}

// The engine's panel length (csrc/cpu/projection/engine.cpp, panel_len with projector.h's
// kPanelElems = 1 << 18): about 2^18 / other along a dimension of length len, at least
// max(8, 4 r), at most ceil(len / 4).
int64_t engine_panel_len(int64_t len, int64_t other, int64_t r) {
  int64_t b = std::max<int64_t>({8, (int64_t(1) << 18) / std::max<int64_t>(other, 1), 4 * r});
  b = std::min(b, (len + 3) / 4);
  return std::max<int64_t>(1, std::min(b, len));
}

// Scratch of this thread, kept across weights and calls.
// 64-byte aligned, as ATen's CPU allocations (a BLAS may take other paths for other alignments).
float* scratch(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + 16) v.resize(n + 16);
  const uintptr_t a = (reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63);
  return reinterpret_cast<float*>(a);
}

// ------------------------------------------------------------------ the back-projection panels
// The engine's panel GEMMs have the rank r as their inner dimension; measured on the AMD EPYC
// CPU of the host-cost table, torch's BLAS (MKL) computes such a product (r = 8) as one
// in-order fused multiply-add chain per element, which fast::gemm_rows also is, at a fraction
// of the call's cost. Since a GEMM's order of operations depends on its shapes, strides and
// alignment only, never on the values, each panel GEMM (side, m, n, r, panel start and
// length, the projector's alignment) is compared once with at::mm_out on data of the same
// layout (values of every magnitude, negative ones, a zero row for the signs of zeros), and
// fast::gemm_rows replaces at::mm_out for that panel only where they agreed bit for bit.
using PanelKey = std::array<int64_t, 7>;

bool panel_gemm_agrees(const PanelKey& key) {
  const bool left = key[0] != 0;
  const int64_t m = key[1], n = key[2], r = key[3], o0 = key[4], len = key[5], palign = key[6];
  std::vector<float> nbuf, pbuf, cbuf, obuf;
  for (uint64_t seed : {11u, 12u}) {
    const int64_t nlen = r * (left ? n : m), plen = r * (left ? m : n);
    float* nb = scratch(nbuf, nlen);
    float* pb = scratch(pbuf, plen + palign) + palign;
    float* cb = scratch(cbuf, m * len);
    float* ob = scratch(obuf, m * len);
    std::vector<float> d = aten_order::check_data(nlen + plen, seed * 1000003 + static_cast<uint64_t>(m * n + r));
    std::copy(d.begin(), d.begin() + nlen, nb);
    std::copy(d.begin() + nlen, d.end(), pb);
    if (left) {  // N (r x n): a zero column of N^T's panel, i.e. N[:, o0] = 0
      for (int64_t a = 0; a < r; ++a) nb[a * n + o0] = 0.0f;
      Tensor C = blob(cb, {len, m}, {1, len});
      at::cpu::mm_out(C, blob(nb + o0, {len, r}, {1, n}), blob(pb, {r, m}, {1, r}));
      fast::gemm_rows(fast::MatF{ob, m, len, len, 1}, fast::MatF{pb, m, r, r, 1}, fast::MatF{nb + o0, r, len, n, 1},
                      1.0f, 0.0f, false);
    } else {  // N (m x r): a zero row
      for (int64_t a = 0; a < r; ++a) nb[a] = 0.0f;
      Tensor C = blob(cb, {m, len});
      at::cpu::mm_out(C, blob(nb, {m, r}), blob(pb + o0, {r, len}, {n, 1}));
      fast::gemm_rows(fast::MatF{ob, m, len, len, 1}, fast::MatF{nb, m, r, r, 1}, fast::MatF{pb + o0, r, len, n, 1},
                      1.0f, 0.0f, false);
    }
    if (std::memcmp(cb, ob, m * len * sizeof(float)) != 0) return false;
  }
  return true;
}

// Whether the panel GEMM of `key` may run as fast::gemm_rows (compared once per key).
bool panel_gemm_ok(const PanelKey& key) {
  static std::mutex mu;
  static std::map<PanelKey, bool> known;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  const bool ok = panel_gemm_agrees(key);
  std::lock_guard<std::mutex> lock(mu);
  known.emplace(key, ok);
  return ok;
}


}  // namespace

void gradnormlorp_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                                     at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList wn_g,
                                     at::TensorList wn_vnorm, at::TensorList exp_avg_g, at::TensorList exp_avg_sq_g,
                                     c10::string_view side, double beta1, double beta2, double eps,
                                     at::ArrayRef<double> step_size, at::ArrayRef<double> scale,
                                     at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                                     int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && projs.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              wn_g.size() == k && wn_vnorm.size() == k && exp_avg_g.size() == k && exp_avg_sq_g.size() == k &&
              step_size.size() == k && scale.size() == k && decay.size() == k);
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(v_absmax.empty() || v_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    const Tensor& g = grads[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.sizes() == p.sizes() && g.is_contiguous());
    TORCH_CHECK(projs[i].scalar_type() == at::kFloat && projs[i].dim() == 2);
    for (const Tensor* v : {&wn_g[i], &wn_vnorm[i], &exp_avg_g[i], &exp_avg_sq_g[i]}) {
      TORCH_CHECK(v->device().is_cpu() && v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == p.size(0) &&
                  v->is_contiguous());
    }
  }
  // ATen's add_(x, alpha) and addcmul_ round once (fused multiply-adds) in its AVX2 and AVX512
  // kernels, twice in its baseline kernels (as apollo.cpp: the CPU's AVX2 + FMA stands for the
  // capability ATen picks; at::native::get_cpu_capability is not exported to extensions).
  static const bool fused = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const int rule = moment_rule();  // -1: the reproduced path is off in this process
  thread_local std::vector<float> b_prod, b_wsq, b_rd, b_root, b_gv, b_n, b_mr, b_cross, b_bsq, b_den, b_vn, b_c, b_in,
      b_out, b_vsq, b_a, b_s, b_sg, b_k1, b_k2, b_rdc, b_ral, b_gnew, b_vd;
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& grad = grads[i];
    const Tensor& proj = projs[i];
    const int64_t m = p.size(0), n = p.size(1);
    float* gm = wn_g[i].data_ptr<float>();
    float* vn = wn_vnorm[i].data_ptr<float>();
    Tensor ea = exp_avg[i], es = exp_avg_sq[i];
    const int64_t r = right ? proj.size(0) : proj.size(1);
    const int64_t K = right ? n : m;
    // The reproduced path (see above) where its conditions hold, else ATen's calls.
    const bool fast = rule >= 0 && m_absmax.empty() && (moment_seed.empty() || moment_seed[i] < 0) &&
                      ea.scalar_type() == at::kFloat && es.scalar_type() == at::kFloat && ea.is_contiguous() &&
                      es.is_contiguous() && proj.device().is_cpu() && proj.is_contiguous() && m >= 2 && n >= 2 && r >= 2 &&
                      m * n <= panel_rows(n) * n && m * n <= kPanelElems && aten_order::serial(m * n) &&
                      aten_order::serial(r * std::max(m, n));

    // weight_norm_grads: a = dL/dg, Gv = dL/dV, s = max(||W||_row, 1e-12), wsq = ||W||^2_row.
    Tensor wsq_t, rd_t, root_t;
    if (fast) {
      float* prod = scratch(b_prod, m * n);
      wsq_t = blob(scratch(b_wsq, m), {m});
      rd_t = blob(scratch(b_rd, m), {m});
      root_t = blob(scratch(b_root, m), {m});
      row_dots_raw(p.data_ptr<float>(), p.data_ptr<float>(), m, n, prod, wsq_t.data_ptr<float>());
      row_dots_raw(grad.data_ptr<float>(), p.data_ptr<float>(), m, n, prod, rd_t.data_ptr<float>());
      sqrt_into(root_t, wsq_t);  // as wsq.sqrt()
    } else {
      wsq_t = row_dots(p, p);
      rd_t = row_dots(grad, p);
      root_t = at::sqrt(wsq_t);  // ATen's float32 sqrt (not always std::sqrt's rounding)
    }
    const float* wsq = wsq_t.data_ptr<float>();
    const float* rd = rd_t.data_ptr<float>();
    const float* root = root_t.data_ptr<float>();
    float* a = scratch(b_a, m);
    float* s = scratch(b_s, m);
    float* sg = scratch(b_sg, m);
    float* k1 = scratch(b_k1, m);
    float* k2 = scratch(b_k2, m);
    const float floor = static_cast<float>(1e-12);
    for (int64_t r = 0; r < m; ++r) {
      s[r] = clamp_min(root[r], floor);
      sg[r] = sign_of(gm[r]);
      a[r] = (sg[r] * rd[r]) / s[r];
      k1[r] = safe_div(gm[r], vn[r]);
      k2[r] = ((k1[r] * a[r]) * sg[r]) / s[r];
    }
    Tensor gv = fast ? blob(scratch(b_gv, m * n), {m, n}) : at::empty({m, n}, fopt);
    {
      const float* gp = grad.data_ptr<float>();
      const float* wp = p.data_ptr<float>();
      float* out = gv.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) {
        const float c1 = k1[r], c2 = k2[r];
        const float* gr = gp + r * n;
        const float* wr = wp + r * n;
        float* o = out + r * n;
        if (fast) {
          dir_row_avx(gr, wr, o, n, c1, c2);
        } else {
          dir_row(gr, wr, o, n, c1, c2);
        }
      }
    }

    // GaLore's projected Adam on Gv.
    Tensor nn;
    if (fast) {
      // The engine's project_adam (engine.cpp run()): R = Gv P^T into N's storage (right: m x r;
      // left: N is r x n, R its transpose), the moments, then N = m / (sqrt(v) + eps) over R.
      const int64_t len = r * (right ? m : n);
      float* nb = scratch(b_n, len);
      if (right) {
        nn = blob(nb, {m, r});
        aten_order::mm_into(nn, gv, direct::t(proj));
      } else {
        nn = blob(nb, {r, n});
        Tensor nf = direct::t(nn);
        aten_order::mm_into(nf, direct::t(gv), proj);
      }
      float* mp = ea.data_ptr<float>();
      float* vp = es.data_ptr<float>();
      moments(mp, vp, nb, len, beta1, beta2, rule);
      Tensor nflat = blob(nb, {len});
      sqrt_into(nflat, blob(vp, {len}));  // sqrt(v) over R, as sqrt_out(r, v)
      const float epsf = static_cast<float>(eps);
      for (int64_t j = 0; j < len; ++j) {
        const float d = nb[j] + epsf;
        nb[j] = mp[j] / d;
      }
    } else {
      nn = projection_project_adam_cpu(gv, proj, ea, es, side, beta1, beta2, eps, std::nullopt, std::nullopt,
                                       std::nullopt, 0, 0, opt(m_absmax, i), opt(v_absmax, i), block_size,
                                       moment_seed.empty() ? -1 : moment_seed[i]);
    }
    if (eps == 0.0) at::nan_to_num_(nn, 0.0, std::nullopt, std::nullopt);

    // Adam on the magnitude: m_g.mul_(b1).add_(a, alpha=1 - b1), v_g.mul_(b2).addcmul_(a, a, value=1 - b2).
    const double c = step_size[i];
    const double cs = c * scale[i];
    float* mgp = exp_avg_g[i].data_ptr<float>();
    float* vgp = exp_avg_sq_g[i].data_ptr<float>();
    {
      const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
      const float w1 = static_cast<float>(1.0 - beta1), w2 = static_cast<float>(1.0 - beta2);
      for (int64_t r = 0; r < m; ++r) {
        const float m1 = mgp[r] * b1;
        const float v1 = vgp[r] * b2;
        if (fused) {
          mgp[r] = std::fma(a[r], w1, m1);
          vgp[r] = std::fma(w2 * a[r], a[r], v1);
        } else {
          const float x = w1 * a[r];
          const float y = (w2 * a[r]) * a[r];
          mgp[r] = m1 + x;
          vgp[r] = v1 + y;
        }
      }
    }

    // new_row_norms_sq's row sums.
    Tensor cross_t, bsq_t;
    if (fast) {
      const float* nb = nn.data_ptr<float>();
      float* prod = scratch(b_prod, std::max(m * r, m * n));
      cross_t = blob(scratch(b_cross, m), {m});
      bsq_t = blob(scratch(b_bsq, m), {m});
      Tensor mr = blob(scratch(b_mr, m * r), {m, r});
      if (right) {
        aten_order::mm_into(mr, p, direct::t(proj));  // W P^T
        row_dots_raw(mr.data_ptr<float>(), nb, m, r, prod, cross_t.data_ptr<float>());
        row_dots_raw(nb, nb, m, r, prod, bsq_t.data_ptr<float>());
      } else {
        aten_order::mm_into(mr, p, direct::t(nn));  // W N^T
        row_dots_raw(mr.data_ptr<float>(), proj.data_ptr<float>(), m, r, prod, cross_t.data_ptr<float>());
        Tensor inner = blob(scratch(b_in, r * r), {r, r});
        aten_order::mm_into(inner, nn, direct::t(nn));  // N N^T
        Tensor outer = blob(scratch(b_out, m * r), {m, r});
        aten_order::mm_into(outer, proj, inner);  // P (N N^T)
        row_dots_raw(outer.data_ptr<float>(), proj.data_ptr<float>(), m, r, prod, bsq_t.data_ptr<float>());
      }
    } else {
      Tensor n_ = nn.scalar_type() == at::kFloat ? nn : nn.to(at::kFloat);
      if (right) {
        Tensor wpt = row_panel_matmul(p, proj.t());
        cross_t = at::sum(at::mul(wpt, n_), 1);
        bsq_t = at::sum(at::mul(n_, n_), 1);
      } else {
        Tensor wn = row_panel_matmul(p, n_.t());
        cross_t = at::sum(at::mul(wn, proj), 1);
        bsq_t = at::sum(at::mul(at::matmul(proj, at::matmul(n_, n_.t())), proj), 1);
      }
    }
    const float* cross = cross_t.data_ptr<float>();
    const float* bsq = bsq_t.data_ptr<float>();
    const float neg_c = static_cast<float>(-c);
    const float epsf = static_cast<float>(eps);
    const float d = static_cast<float>(decay[i]);
    const float two_cs = static_cast<float>(2.0 * cs);
    const float cs_sq = static_cast<float>(cs * cs);
    const float neg_cs = static_cast<float>(-cs);
    float* rdc = scratch(b_rdc, m);
    float* ral = scratch(b_ral, m);
    float* g_new = scratch(b_gnew, m);
    float* vd = scratch(b_vd, m);
    float* vsq = scratch(b_vsq, m);  // aligned as the at::empty it stands for
    {
      Tensor den_t = fast ? blob(scratch(b_den, m), {m}) : Tensor();
      if (fast) {
        sqrt_into(den_t, exp_avg_sq_g[i]);  // as exp_avg_sq_g.sqrt()
      } else {
        den_t = at::sqrt(exp_avg_sq_g[i]);
      }
      const float* den = den_t.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) {
        const float dg = safe_div(mgp[r], den[r] + epsf) * neg_c;
        vd[r] = vn[r] * d;
        g_new[r] = (gm[r] * d) + dg;
        // vsq = vd vd (wsq / (s s)) - (2 cs) vd (sg / s) cross + (cs cs) bsq
        const float t4 = (vd[r] * vd[r]) * (wsq[r] / (s[r] * s[r]));
        const float t8 = ((vd[r] * two_cs) * (sg[r] / s[r])) * cross[r];
        vsq[r] = clamp_min((t4 - t8) + bsq[r] * cs_sq, 0.f);
      }
    }
    Tensor vnorm_t = fast ? blob(scratch(b_vn, m), {m}) : Tensor();
    if (fast) {
      sqrt_into(vnorm_t, blob(vsq, {m}));  // as vsq.clamp_min(0).sqrt()
    } else {
      vnorm_t = at::sqrt(blob(vsq, {m}));
    }
    const float* vnorm_new = vnorm_t.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) {
      const float kk = safe_div(g_new[r], vnorm_new[r]);
      rdc[r] = ((kk * vd[r]) * sg[r]) / s[r];
      ral[r] = kk * neg_cs;
    }
    if (fast) {
      // The engine's back-projection with per-row factors (engine.cpp run(), apply phase): per
      // panel of W along its inner memory dimension, C = back(N) of the panel by at::mm_out into
      // scratch laid out like W, then w <- w * rd; c <- c * ra; w <- w + c (alpha 1, decay 1).
      float* w = p.data_ptr<float>();
      float* pp = proj.data_ptr<float>();
      const int64_t palign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(pp) % 64) / sizeof(float));
      if (right) {  // row-major W (m x n): panels of columns, C = N P[:, k0:k1] (m x len, row-major)
        const int64_t bk = engine_panel_len(K, m, r);
        float* cb = scratch(b_c, m * bk);
        for (int64_t k0 = 0; k0 < K; k0 += bk) {
          const int64_t len = std::min(bk, K - k0);
          if (panel_gemm_ok({0, m, n, r, k0, len, palign})) {
            fast::gemm_rows(fast::MatF{cb, m, len, len, 1}, fast::MatF{nn.data_ptr<float>(), m, r, r, 1},
                            fast::MatF{pp + k0, r, len, n, 1}, 1.0f, 0.0f, false);
          } else {
            Tensor C = blob(cb, {m, len});
            aten_order::mm_into(C, nn, proj.narrow(1, k0, len));
          }
          for (int64_t row = 0; row < m; ++row) {
            apply_row_avx(w + row * n + k0, cb + row * len, len, rdc[row], ral[row]);
          }
        }
      } else {  // W^T (n x m, column-major): panels of its rows (W's columns), C = N^T[i0:i1] P^T
        const int64_t bm = engine_panel_len(n, m, r);
        float* cb = scratch(b_c, bm * m);
        const Tensor nf = direct::t(nn);   // n x r
        const Tensor pw = direct::t(proj);  // r x m
        for (int64_t i0 = 0; i0 < n; i0 += bm) {
          const int64_t len = std::min(bm, n - i0);
          if (panel_gemm_ok({1, m, n, r, i0, len, palign})) {  // C^T = P N[:, i0:i1] (m x len, row-major)
            fast::gemm_rows(fast::MatF{cb, m, len, len, 1}, fast::MatF{pp, m, r, r, 1},
                            fast::MatF{nn.data_ptr<float>() + i0, r, len, n, 1}, 1.0f, 0.0f, false);
          } else {
            Tensor C = blob(cb, {len, m}, {1, len});  // column-major len x m
            aten_order::mm_into(C, nf.narrow(0, i0, len), pw);
          }
          for (int64_t row = 0; row < m; ++row) {  // W[row, i0 + j] = oriented (j, row)
            apply_row_avx(w + row * n + i0, cb + row * len, len, rdc[row], ral[row]);
          }
        }
      }
    } else {
      Tensor row_decay = at::empty({m}, fopt), row_alpha = at::empty({m}, fopt);
      std::copy(rdc, rdc + m, row_decay.data_ptr<float>());
      std::copy(ral, ral + m, row_alpha.data_ptr<float>());
      projection_backproject_apply_cpu(p, nn, proj, side, 1.0, 1.0, std::nullopt, std::nullopt, std::nullopt, 0, 0,
                                       row_decay, row_alpha);
    }
    std::copy(g_new, g_new + m, gm);
    std::copy(vnorm_new, vnorm_new + m, vn);
  }
}

}  // namespace lowrank_kernels
