// C++ CPU kernel of the adafactor family (lowrank_kernels/ops/adafactor.py has the schema and
// the validation, lowrank_kernels/reference/adafactor.py the specification): GaLore-Adafactor's
// non-refresh step over a list of float32 weights in one call.
//
// Bit-identical to GaLoreAdafactor's per-parameter step (and to the reference on CPU): the
// operations whose rounding depends on an algorithm are ATen's: the projection GEMM is at::mm's
// CPU kernel called without the dispatcher (cpu/direct.h); the means of the factored
// statistics (ATen's CPU mean: a sum, then a division by the count) and the RMS norms are
// ATen's reductions reproduced in ATen's order on raw pointers (cpu/aten_order.h) where its
// one-time self-check passed and the sizes reduce serially, else the very ATen calls; the
// back-projection is what the projection family's C++ kernel runs for a contiguous float32
// weight (W.mul_(decay), then addmm_'s CPU kernel, undispatched), and the elementwise
// work between them is plain float32 arithmetic in the reference's order, one IEEE operation
// per ATen operation (this file is compiled for the baseline ISA, which has no FMA
// instruction to contract two into one), except the moving averages x.mul_(b).add_(y,
// alpha=a), which ATen's vectorized add_ evaluates as one fused multiply-add
// fma(y, a, x * b) (as csrc/cpu/fast_f32.h's Adam epilogue): here fused as well (vectorized
// where the CPU has FMA, std::fma otherwise). The first moment's 8-bit blocks are
// dequantized and requantized with moments8.h's helpers (the reference's map and rounding),
// the 16-bit one is stored with its stochastic rounding.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/aten_order.h"
#include "cpu/direct.h"
#include "cpu/kernels.h"
#include "cpu/moments8.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

// y[j] <- fma(x[j], a, y[j] * b): ATen's y.mul_(b).add_(x, alpha=a) on float32.
#define ADAFACTOR_EMA_BODY(FMA) \
  for (int64_t j = 0; j < n; ++j) y[j] = FMA(x[j], a, y[j] * b);

__attribute__((target("avx2,fma"))) void ema_fma(float* y, const float* x, int64_t n, float b, float a) {
  ADAFACTOR_EMA_BODY(__builtin_fmaf)
}

void ema_portable(float* y, const float* x, int64_t n, float b, float a) { ADAFACTOR_EMA_BODY(std::fma) }

void ema(float* y, const float* x, int64_t n, float b, float a) {
  static const bool has_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_fma) {
    ema_fma(y, x, n, b, a);
  } else {
    ema_portable(y, x, n, b, a);
  }
}

// ||x||_2 accumulated in float32 (torch.linalg.vector_norm(x, dtype=torch.float32)) over sqrt(numel),
// as the Python step's _rms: the norm's 0-d tensor divided by the float32 value of sqrt(numel).
// With `fast`, the norm reproduced in ATen's order on raw pointers (cpu/aten_order.h).
float rms(const Tensor& x, bool fast) {
  const float norm = fast ? aten_order::norm_all(x.data_ptr<float>(), x.numel())
                          : at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat).item<float>();
  return norm / static_cast<float>(std::sqrt(static_cast<double>(x.numel())));
}

// at::mean(x, dim) of a contiguous rows x cols float32 matrix (dim 1, or 0), or of a vector
// (rows = 1, dim 1), into out: ATen's CPU mean is at::sum then div_ by the element count
// (a float32 division by the count as float32); with `fast` the sum reproduced on raw
// pointers, else ATen's calls.
void mean_into(const float* x, int64_t rows, int64_t cols, int dim, bool fast, float* out) {
  const int64_t len = dim == 1 ? rows : cols;
  if (fast) {
    if (dim == 1) {
      aten_order::sum_lastdim(x, rows, cols, out);
    } else {
      aten_order::sum_dim0(x, rows, cols, out);
    }
    const float count = static_cast<float>(dim == 1 ? cols : rows);
    for (int64_t j = 0; j < len; ++j) out[j] = out[j] / count;
    return;
  }
  const Tensor t = at::from_blob(const_cast<float*>(x), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const Tensor m = rows == 1 && dim == 1 ? at::mean(t.view({cols}), {-1}, true) : at::mean(t, {dim == 1 ? -1 : -2});
  std::copy(m.data_ptr<float>(), m.data_ptr<float>() + len, out);
}

// Scratch reused across weights and calls (no allocation per weight).
// 64-byte aligned, as ATen's CPU allocations (a BLAS may take other paths for other alignments).
float* scratch(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + 16) v.resize(n + 16);
  const uintptr_t a = (reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63);
  return reinterpret_cast<float*>(a);
}

// The rank up to which the projection family's back-projection of a contiguous float32 W is
// one BLAS addmm_ (engine.cpp, kBlasSingleKBlock).
constexpr int64_t kBlasSingleKBlock = 128;

// torch.clamp(x, min=lo) on a float32 value (NaN stays NaN).
float clamp_min(float x, float lo) { return x < lo ? lo : x; }

}  // namespace

void adafactor_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList projs,
                                  at::TensorList exp_avg_sq_row, at::TensorList exp_avg_sq_col,
                                  at::TensorList exp_avg, at::TensorList m_absmax, c10::string_view side,
                                  double eps1, double eps2, double clip_threshold, double beta1,
                                  bool scale_parameter, at::ArrayRef<double> beta2t, at::ArrayRef<double> lr,
                                  at::ArrayRef<double> weight_decay, at::ArrayRef<double> alpha,
                                  int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && projs.size() == k && exp_avg_sq_row.size() == k && exp_avg_sq_col.size() == k &&
              beta2t.size() == k && lr.size() == k && weight_decay.size() == k && alpha.size() == k);
  TORCH_CHECK(exp_avg.empty() || exp_avg.size() == k);
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].scalar_type() == at::kFloat && grads[i].sizes() == p.sizes() &&
                grads[i].is_contiguous());
    const Tensor& pr = projs[i];
    TORCH_CHECK(pr.device().is_cpu() && pr.scalar_type() == at::kFloat && pr.dim() == 2);
    TORCH_CHECK(right ? pr.size(1) == p.size(1) : pr.size(0) == p.size(0));
    const int64_t rows = right ? p.size(0) : pr.size(1);  // R's shape: m x r (right), r x n (left)
    const int64_t cols = right ? pr.size(0) : p.size(1);
    for (const Tensor* t : {&exp_avg_sq_row[i], &exp_avg_sq_col[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous());
    }
    TORCH_CHECK(exp_avg_sq_row[i].size(0) == rows && exp_avg_sq_col[i].size(0) == cols);
    if (!exp_avg.empty()) {
      const Tensor& m = exp_avg[i];
      TORCH_CHECK(m.device().is_cpu() && m.is_contiguous() && m.dim() == 2 && m.size(0) == rows && m.size(1) == cols);
      const auto st = m.scalar_type();
      if (!m_absmax.empty()) {
        TORCH_CHECK(st == at::kByte && block_size >= 1 && block_size <= moments8::kMaxBlock);
        TORCH_CHECK(m_absmax[i].scalar_type() == at::kFloat && m_absmax[i].is_contiguous() &&
                    m_absmax[i].numel() == rows * ((cols + block_size - 1) / block_size));
      } else if (st == at::kBFloat16) {
        TORCH_CHECK(!moment_seed.empty() && moment_seed[i] >= 0);
      } else {
        TORCH_CHECK(st == at::kFloat);
      }
    }
  }
  const c10::string_view sd = right ? "right" : "left";
  const float e1 = static_cast<float>(eps1);
  const float clip = static_cast<float>(clip_threshold);
  const float b1 = static_cast<float>(beta1), ob1 = static_cast<float>(1.0 - beta1);
  // Scratch of this thread, reused across weights and calls.
  thread_local std::vector<float> sq_buf, upd_buf, mf_buf, rmean_buf, cmean_buf, rf, cf;
  const auto fopts = at::TensorOptions().dtype(at::kFloat);
  const bool reproduced = aten_order::ready();
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& g = grads[i];
    const Tensor& pr = projs[i];
    // R = G P^T (right) or P^T G (left), float32: the Python step's torch.matmul (at::mm's
    // CPU kernel, called without the dispatcher).
    const Tensor prt = direct::t(pr);
    const Tensor low = right ? direct::mm(g, prt) : direct::mm(prt, g);
    const int64_t rows = low.size(0), cols = low.size(1), numel = rows * cols;
    const float* lo = low.data_ptr<float>();
    // The reductions in ATen's order on raw pointers where that order is the one reproduced.
    const bool fast = reproduced && rows >= 2 && cols >= 2 && aten_order::serial(numel) &&
                      (!scale_parameter || aten_order::serial(p.numel()));
    // lr_t: the relative or external step size, times max(eps2, RMS(W)) with scale_parameter.
    float lr_t = static_cast<float>(lr[i]);
    if (scale_parameter) lr_t = clamp_min(rms(p, fast), static_cast<float>(eps2)) * lr_t;
    // The factored second moment of U = R^2 + eps1: row and column means, moving averages.
    float* s = scratch(sq_buf, numel);
    for (int64_t j = 0; j < numel; ++j) {
      const float x = lo[j] * lo[j];
      s[j] = x + e1;
    }
    float* row_mean = scratch(rmean_buf, rows);
    float* col_mean = scratch(cmean_buf, cols);
    mean_into(s, rows, cols, 1, fast, row_mean);
    mean_into(s, rows, cols, 0, fast, col_mean);
    Tensor row = exp_avg_sq_row[i], col = exp_avg_sq_col[i];
    const float b2 = static_cast<float>(beta2t[i]), ob2 = static_cast<float>(1.0 - beta2t[i]);
    float* rw = row.data_ptr<float>();
    float* cl = col.data_ptr<float>();
    ema(rw, row_mean, rows, b2, ob2);
    ema(cl, col_mean, cols, b2, ob2);
    float rm = 0.f;
    mean_into(rw, 1, rows, 1, fast, &rm);
    rf.resize(rows);
    cf.resize(cols);
    for (int64_t r = 0; r < rows; ++r) {
      const float q = rw[r] / rm;
      rf[r] = 1.0f / std::sqrt(q);
    }
    for (int64_t c = 0; c < cols; ++c) cf[c] = 1.0f / std::sqrt(cl[c]);
    // upd = (rsqrt(row / mean(row)) rsqrt(col)) * R, clipped to RMS <= clip, times lr_t.
    float* u = scratch(upd_buf, numel);
    const Tensor upd = at::from_blob(u, {rows, cols}, fopts);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const float f = rf[r] * cf[c];
        u[r * cols + c] = f * lo[r * cols + c];
      }
    }
    const float q = clamp_min(rms(upd, fast) / clip, 1.0f);
    for (int64_t j = 0; j < numel; ++j) {
      const float x = u[j] / q;
      u[j] = x * lr_t;
    }
    // The first moment: m <- beta1 m + (1 - beta1) upd in float32, upd = m.
    Tensor out = upd;
    if (!exp_avg.empty()) {
      Tensor m = exp_avg[i];
      if (m.scalar_type() == at::kByte) {
        const moments8::Midpoints& mp = moments8::midpoints();
        const int64_t nblk = (cols + block_size - 1) / block_size;
        uint8_t* codes = m.data_ptr<uint8_t>();
        float* amax = m_absmax[i].data_ptr<float>();
        float* x = scratch(mf_buf, numel);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            x[r * cols + c] = moments8::kSignedMap[codes[r * cols + c]] * amax[r * nblk + c / block_size];
          }
        }
        ema(x, u, numel, b1, ob1);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t b = 0; b < nblk; ++b) {
            const int64_t c0 = b * block_size, len = std::min(block_size, cols - c0);
            amax[r * nblk + b] =
                moments8::requantize_block(x + r * cols + c0, len, mp.s, mp.zero_s, codes + r * cols + c0);
          }
        }
        out = at::from_blob(x, {rows, cols}, fopts);
      } else if (m.scalar_type() == at::kBFloat16) {
        Tensor mf = m.to(at::kFloat);
        ema(mf.data_ptr<float>(), u, numel, b1, ob1);
        moments8::store_bf16_sr(mf, m, moment_seed[i], 0);
        out = mf;
      } else {
        ema(m.data_ptr<float>(), u, numel, b1, ob1);
        out = m;
      }
    }
    // Decoupled weight decay (scaled by lr_t), then W <- decay W + alpha back(upd).
    double decay = 1.0;
    const double wd = weight_decay[i];
    if (wd != 0.0) {
      if (scale_parameter) {  // W + (-wd lr_t) W, as the Python step's addcmul_ on the device value
        const float c = static_cast<float>(-wd) * lr_t;
        p.addcmul_(p, at::scalar_tensor(c, low.options()));
      } else {
        decay = 1.0 - wd * lr[i];
      }
    }
    const int64_t rank = right ? pr.size(0) : pr.size(1);
    if (rank <= kBlasSingleKBlock) {
      // What the projection family's back-projection runs here (csrc/cpu/projection/engine.cpp:
      // a float32 W stored contiguously, no per-row factors, a rank within one BLAS K block):
      // W.mul_(decay) (one float32 product per element), then W.addmm_(N, P, 1, alpha) in
      // right orientation, with addmm_'s CPU kernel called without the dispatcher.
      if (decay != 1.0) {
        float* w = p.data_ptr<float>();
        const float d = static_cast<float>(decay);
        for (int64_t j = 0, n = p.numel(); j < n; ++j) w[j] = w[j] * d;
      }
      Tensor w = right ? p : direct::t(p);
      at::cpu::addmm_(w, right ? out : direct::t(out), right ? pr : prt, 1.0, alpha[i]);
    } else {
      projection_backproject_apply_cpu(p, out, pr, sd, alpha[i], decay, std::nullopt, std::nullopt, std::nullopt, 0,
                                       0, std::nullopt, std::nullopt);
    }
  }
}

}  // namespace lowrank_kernels
