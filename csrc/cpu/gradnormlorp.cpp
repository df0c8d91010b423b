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
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

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
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& grad = grads[i];
    const Tensor& proj = projs[i];
    const int64_t m = p.size(0), n = p.size(1);
    float* gm = wn_g[i].data_ptr<float>();
    float* vn = wn_vnorm[i].data_ptr<float>();

    // weight_norm_grads: a = dL/dg, Gv = dL/dV, s = max(||W||_row, 1e-12), wsq = ||W||^2_row.
    Tensor wsq_t = row_dots(p, p);
    Tensor rd_t = row_dots(grad, p);
    Tensor root_t = at::sqrt(wsq_t);  // ATen's float32 sqrt, as wsq.sqrt() (not always std::sqrt's rounding)
    const float* wsq = wsq_t.data_ptr<float>();
    const float* rd = rd_t.data_ptr<float>();
    const float* root = root_t.data_ptr<float>();
    std::vector<float> a(m), s(m), sg(m), k1(m), k2(m);
    const float floor = static_cast<float>(1e-12);
    for (int64_t r = 0; r < m; ++r) {
      s[r] = clamp_min(root[r], floor);
      sg[r] = sign_of(gm[r]);
      a[r] = (sg[r] * rd[r]) / s[r];
      k1[r] = safe_div(gm[r], vn[r]);
      k2[r] = ((k1[r] * a[r]) * sg[r]) / s[r];
    }
    Tensor gv = at::empty({m, n}, fopt);
    {
      const float* gp = grad.data_ptr<float>();
      const float* wp = p.data_ptr<float>();
      float* out = gv.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r) {
        const float c1 = k1[r], c2 = k2[r];
        const float* gr = gp + r * n;
        const float* wr = wp + r * n;
        float* o = out + r * n;
        for (int64_t j = 0; j < n; ++j) {
          const float x = gr[j] * c1;
          const float y = wr[j] * c2;
          o[j] = x - y;
        }
      }
    }

    // GaLore's projected Adam on Gv.
    Tensor ea = exp_avg[i], es = exp_avg_sq[i];
    Tensor nn = projection_project_adam_cpu(gv, proj, ea, es, side, beta1, beta2, eps, std::nullopt, std::nullopt,
                                            std::nullopt, 0, 0, opt(m_absmax, i), opt(v_absmax, i), block_size,
                                            moment_seed.empty() ? -1 : moment_seed[i]);
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
    Tensor n_ = nn.scalar_type() == at::kFloat ? nn : nn.to(at::kFloat);
    Tensor cross_t, bsq_t;
    if (right) {
      Tensor wpt = row_panel_matmul(p, proj.t());
      cross_t = at::sum(at::mul(wpt, n_), 1);
      bsq_t = at::sum(at::mul(n_, n_), 1);
    } else {
      Tensor wn = row_panel_matmul(p, n_.t());
      cross_t = at::sum(at::mul(wn, proj), 1);
      bsq_t = at::sum(at::mul(at::matmul(proj, at::matmul(n_, n_.t())), proj), 1);
    }
    const float* cross = cross_t.data_ptr<float>();
    const float* bsq = bsq_t.data_ptr<float>();
    const float neg_c = static_cast<float>(-c);
    const float epsf = static_cast<float>(eps);
    const float d = static_cast<float>(decay[i]);
    const float two_cs = static_cast<float>(2.0 * cs);
    const float cs_sq = static_cast<float>(cs * cs);
    const float neg_cs = static_cast<float>(-cs);
    Tensor row_decay = at::empty({m}, fopt), row_alpha = at::empty({m}, fopt);
    float* rdc = row_decay.data_ptr<float>();
    float* ral = row_alpha.data_ptr<float>();
    std::vector<float> g_new(m), vd(m);
    Tensor vsq_t = at::empty({m}, fopt);
    float* vsq = vsq_t.data_ptr<float>();
    {
      Tensor den_t = at::sqrt(exp_avg_sq_g[i]);  // as exp_avg_sq_g.sqrt()
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
    Tensor vnorm_t = at::sqrt(vsq_t);  // as vsq.clamp_min(0).sqrt()
    const float* vnorm_new = vnorm_t.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) {
      const float kk = safe_div(g_new[r], vnorm_new[r]);
      rdc[r] = ((kk * vd[r]) * sg[r]) / s[r];
      ral[r] = kk * neg_cs;
    }
    projection_backproject_apply_cpu(p, nn, proj, side, 1.0, 1.0, std::nullopt, std::nullopt, std::nullopt, 0, 0,
                                     row_decay, row_alpha);
    std::copy(g_new.begin(), g_new.end(), gm);
    std::copy(vnorm_new, vnorm_new + m, vn);
  }
}

}  // namespace lowrank_kernels
