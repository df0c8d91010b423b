// C++ CPU kernel of the apollo family (lowrank_kernels/ops/apollo.py has the schema and the
// validation, lowrank_kernels/reference/apollo.py the specification): APOLLO's non-refresh
// step over a list of float32 weights in one call.
//
// Bit-identical to the per-parameter step of APOLLOAdamW (and to the reference on CPU): the
// operations whose rounding depends on an algorithm are the very ATen kernels the Python step
// calls (the seeded normal draw and the projection GEMM through their CPU entry points, no
// dispatcher: cpu/direct.h) or, for the float32 norms' reductions, ATen's order reproduced on
// raw pointers where a one-time self-check confirms it (fast_norm below), the Adam update
// is the adam family's C++ kernel (adam_update_cpu), and the scalar and elementwise tail
// (scaling factors, limiter, decay) is plain float32 arithmetic in the reference's order, one
// IEEE operation per ATen operation (no two fused: this file is compiled for the baseline ISA,
// setup.py passes no -march, which has no FMA instruction to contract them into). The last
// operation, W.addcmul_(G, coef), rounds once in ATen (a fused multiply-add, measured on
// torch 2.13's CPU kernel): here std::fma.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/aten_order.h"
#include "cpu/direct.h"
#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

using at::Tensor;

Tensor vnorm(const Tensor& x, std::optional<int64_t> dim) {
  if (dim.has_value()) return at::linalg_vector_norm(x, 2, at::IntArrayRef{*dim}, false, at::kFloat);
  return at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat);
}

// ---------------------------------------------------------------------------------------
// The float32 2-norms of torch.linalg.vector_norm(x, dim=..., dtype=float32) on contiguous
// 2-D data, computed here on raw pointers in ATen's very order (each ATen call costs
// several microseconds of dispatch and TensorIterator setup, against well under that of
// arithmetic on a small weight; a norm over dim 0 even builds one sub-iterator per column).
// ATen's CPU kernel (norm_kernel_tensor_iterator_impl, AVX2 build) has two paths:
//
// - reduction along contiguous memory (dim=-1, or the whole tensor):
//   binary_kernel_reduce_lastdim, per output: 8 float lanes accumulate lane += x * x
//   (a multiply, then an add: not fused) over the largest multiple of 8, the lanes are
//   folded left to right into lane 0, then the remaining (size % 8) elements: the first
//   four of them (when there are four) as s = s + x * x unfused, the rest fused,
//   s = fma(x, x, s) (the compiled tail loop of torch's binary), then sqrt;
// - reduction along strided memory (dim=0 of rows x cols): binary_kernel_reduce with
//   NormTwoOps, per column a serial acc = acc + x * x down the rows (unfused), then sqrt;
//   serial below GRAIN_SIZE (32768) rows, split among threads above (not reproduced: ATen).
//
// The tail's fused/unfused split is a property of one torch binary, not of its source,
// so these run only where they were checked: on the AVX2 kernels (at::get_cpu_capability),
// and after a self-check at first use that compares them bitwise with ATen's calls on
// data covering every tail length and both paths; otherwise every norm is ATen's call.
// The functions are compiled for AVX2 without FMA, so no multiply-add is contracted. The
// contiguous path is aten_order.h's norm_all (the one copy of it; GaLore-Adafactor and
// GradNormLoRP use it too), the strided one is below.
// Column norms of a rows x cols row-major block (cols >= 2), into out[cols].
__attribute__((target("avx2"))) void norm_cols_avx2(const float* x, int64_t rows, int64_t cols, float* out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const float p = xr[j] * xr[j];
      out[j] = out[j] + p;
    }
  }
  for (int64_t j = 0; j < cols; ++j) out[j] = std::sqrt(out[j]);
}

constexpr int64_t kSerialRows = 32768;  // at::internal::GRAIN_SIZE

// The norms of a contiguous float32 rows x cols tensor along dim (0, 1, or -1: all), into
// out (cols, rows or 1 values), by the functions above.
void fast_norm(const float* x, int64_t rows, int64_t cols, int dim, float* out) {
  if (dim < 0) {
    out[0] = aten_order::norm_all(x, rows * cols);
  } else if (dim == 1) {
    for (int64_t i = 0; i < rows; ++i) out[i] = aten_order::norm_all(x + i * cols, cols);
  } else if (cols == 1) {  // one strided column is contiguous: ATen's contiguous path
    out[0] = aten_order::norm_all(x, rows);
  } else {
    norm_cols_avx2(x, rows, cols, out);
  }
}

// Whether fast_norm applies to this tensor and dim (beyond the one-time check below).
bool fast_norm_fits(const Tensor& x, int dim) {
  if (x.scalar_type() != at::kFloat || x.dim() != 2 || !x.is_contiguous() || x.numel() == 0) return false;
  return dim != 0 || x.size(0) < kSerialRows;
}

bool fast_norm_checked() {
  if (at::get_cpu_capability() != "AVX2" || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    return false;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto same = [](const Tensor& ref, const std::vector<float>& mine) {
    const float* r = ref.data_ptr<float>();
    for (size_t i = 0; i < mine.size(); ++i) {
      if (std::memcmp(&r[i], &mine[i], sizeof(float)) != 0) return false;
    }
    return static_cast<int64_t>(mine.size()) == ref.numel();
  };
  // Every row length 1..40 (all tail lengths, with and without full lanes) and a long one,
  // along dim 1, dim 0 and the whole tensor.
  for (int64_t cols : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 28, 31, 37, 40,
                       172, 333}) {
    for (int64_t rows : {1, 2, 7, 64}) {
      std::vector<float> data = aten_order::check_data(rows * cols, static_cast<uint64_t>(rows * 1000 + cols));
      Tensor x = at::from_blob(data.data(), {rows, cols}, opts);
      for (int dim : {1, 0, -1}) {
        std::vector<float> mine(dim == 1 ? rows : dim == 0 ? cols : 1);
        fast_norm(data.data(), rows, cols, dim, mine.data());
        Tensor ref = dim < 0 ? at::linalg_vector_norm(x, 2, std::nullopt, false, at::kFloat)
                             : at::linalg_vector_norm(x, 2, at::IntArrayRef{dim}, false, at::kFloat);
        if (!same(ref.contiguous(), mine)) return false;
      }
    }
  }
  return true;
}

// Whether the reproduced norms are in use in this process (decided once).
bool use_fast_norm() {
  static const bool ok = fast_norm_checked();
  return ok;
}

// W <- W * decay (when decay != 1), then W <- fma(G, c, W) (c per row, per column or one value).
// Rows [r0, r1). Compiled twice: for CPUs with the FMA instruction (apply_rows_fma, vectorized
// fused multiply-adds) and for the baseline ISA, where std::fma is the C library's (exact,
// slower) fused multiply-add; both round each W + G * c once, as ATen's addcmul_.
#define APOLLO_APPLY_ROWS_BODY                                                    \
  for (int64_t i = r0; i < r1; ++i) {                                            \
    float* wr = w + i * n;                                                       \
    const float* gr = g + i * n;                                                 \
    if (decayed) {                                                               \
      for (int64_t j = 0; j < n; ++j) wr[j] = wr[j] * decay;                     \
    }                                                                            \
    if (which == 0) {                                                            \
      const float ci = c[i];                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], ci, wr[j]);  \
    } else if (which == 1) {                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], c[j], wr[j]); \
    } else {                                                                     \
      const float c0 = c[0];                                                     \
      for (int64_t j = 0; j < n; ++j) wr[j] = __builtin_fmaf(gr[j], c0, wr[j]);  \
    }                                                                            \
  }

__attribute__((target("avx2,fma"))) void apply_rows_fma(float* w, const float* g, int64_t n, const float* c,
                                                        int which, float decay, bool decayed, int64_t r0, int64_t r1) {
  APOLLO_APPLY_ROWS_BODY
}

void apply_rows_portable(float* w, const float* g, int64_t n, const float* c, int which, float decay, bool decayed,
                         int64_t r0, int64_t r1) {
  APOLLO_APPLY_ROWS_BODY
}

void apply(float* w, const float* g, int64_t m, int64_t n, const float* c, int which, float decay, bool decayed) {
  static const bool has_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    if (has_fma) {
      apply_rows_fma(w, g, n, c, which, decay, decayed, r0, r1);
    } else {
      apply_rows_portable(w, g, n, c, which, decay, decayed, r0, r1);
    }
  });
}

}  // namespace

void apollo_foreach_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList seeds,
                               at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList prev_norm,
                               c10::string_view side, int64_t rank, bool channel, double beta1, double beta2,
                               double eps, at::ArrayRef<double> front, at::ArrayRef<double> alpha,
                               at::ArrayRef<double> decay, at::TensorList m_absmax, at::TensorList v_absmax,
                               int64_t block_size, at::IntArrayRef moment_seed) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && seeds.size() == k && exp_avg.size() == k && exp_avg_sq.size() == k &&
              front.size() == k && alpha.size() == k && decay.size() == k);
  TORCH_CHECK(prev_norm.empty() || prev_norm.size() == k);
  TORCH_CHECK(m_absmax.empty() || m_absmax.size() == k);
  TORCH_CHECK(v_absmax.empty() || v_absmax.size() == k);
  TORCH_CHECK(moment_seed.empty() || moment_seed.size() == k);
  const bool right = side == "right";
  TORCH_CHECK(right || side == "left");
  TORCH_CHECK(rank >= 1);
  for (size_t i = 0; i < k; ++i) {
    const Tensor& p = params[i];
    const Tensor& g = grads[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous());
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.sizes() == p.sizes() && g.is_contiguous());
    TORCH_CHECK(rank <= (right ? p.size(1) : p.size(0)));
    TORCH_CHECK(seeds[i].device().is_cpu() && seeds[i].scalar_type() == at::kLong && seeds[i].numel() == 1);
    if (!prev_norm.empty()) {
      TORCH_CHECK(prev_norm[i].device().is_cpu() && prev_norm[i].scalar_type() == at::kFloat &&
                  prev_norm[i].numel() == 1);
    }
  }
  const float inv_root = static_cast<float>(std::sqrt(static_cast<double>(rank)));
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  const bool fast = use_fast_norm();
  for (size_t i = 0; i < k; ++i) {
    Tensor p = params[i];
    const Tensor& g = grads[i];
    const int64_t m = p.size(0), n = p.size(1);
    // P = randn(shape) / sqrt(r): torch.randn from a CPU generator seeded with the seed.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(*seeds[i].data_ptr<int64_t>()));
    // (at::randn is at::empty, then normal_(0, 1, gen): here both without the dispatcher.)
    Tensor proj = direct::empty_f32(right ? at::IntArrayRef{rank, n} : at::IntArrayRef{m, rank});
    at::cpu::normal_(proj, 0.0, 1.0, gen);
    {
      float* pp = proj.data_ptr<float>();
      const int64_t cnt = proj.numel();
      for (int64_t j = 0; j < cnt; ++j) pp[j] = pp[j] / inv_root;
    }
    // R = G P^T or P^T G, in the moments' update dtype.
    Tensor r = right ? direct::mm(g, direct::t(proj)) : direct::mm(direct::t(proj), g);  // at::mm, undispatched
    const Tensor& ea = exp_avg[i];
    Tensor m1 = exp_avg[i], v1 = exp_avg_sq[i];
    const auto upd = ea.scalar_type() == at::kByte ? at::kFloat : ea.scalar_type();
    if (upd != at::kFloat) r = r.to(upd);
    Tensor nlr = adam_update_cpu(r, m1, v1, beta1, beta2, eps, opt(m_absmax, i), opt(v_absmax, i), block_size,
                                 moment_seed.empty() ? -1 : moment_seed[i]);
    // Scaling factors s (float32): per channel of the full dimension, or one value.
    std::vector<float> s;
    float scaled_norm;
    const int dim = right ? 1 : 0;
    if (fast && fast_norm_fits(nlr, channel ? dim : -1) && fast_norm_fits(r, channel ? dim : -1) &&
        fast_norm_fits(g, channel ? dim : -1)) {
      // The same values as the ATen branch below, from the reproduced norms.
      if (channel) {
        const int64_t len = right ? m : n;
        s.resize(len);
        std::vector<float> b(len), c(len);
        fast_norm(nlr.const_data_ptr<float>(), nlr.size(0), nlr.size(1), dim, s.data());
        fast_norm(r.const_data_ptr<float>(), r.size(0), r.size(1), dim, b.data());
        fast_norm(g.const_data_ptr<float>(), m, n, dim, c.data());
        for (int64_t j = 0; j < len; ++j) {
          s[j] = s[j] / (b[j] + 1e-8f);
          c[j] = s[j] * c[j];
        }
        fast_norm(c.data(), 1, len, -1, &scaled_norm);
      } else {
        float a, b, c;
        fast_norm(nlr.const_data_ptr<float>(), nlr.size(0), nlr.size(1), -1, &a);
        fast_norm(r.const_data_ptr<float>(), r.size(0), r.size(1), -1, &b);
        fast_norm(g.const_data_ptr<float>(), m, n, -1, &c);
        s.assign(1, a / (b + 1e-8f));
        scaled_norm = s[0] * c;
      }
    } else if (channel) {
      Tensor nn = vnorm(nlr, dim), rn = vnorm(r, dim), gn = vnorm(g, dim);
      const int64_t len = nn.numel();
      const float* a = nn.data_ptr<float>();
      const float* b = rn.data_ptr<float>();
      const float* c = gn.data_ptr<float>();
      s.resize(len);
      Tensor sg = at::empty({len}, at::TensorOptions().dtype(at::kFloat));
      float* sgp = sg.data_ptr<float>();
      for (int64_t j = 0; j < len; ++j) {
        s[j] = a[j] / (b[j] + 1e-8f);
        sgp[j] = s[j] * c[j];
      }
      scaled_norm = vnorm(sg, std::nullopt).item<float>();
    } else {
      const float a = vnorm(nlr, std::nullopt).item<float>();
      const float b = vnorm(r, std::nullopt).item<float>();
      const float c = vnorm(g, std::nullopt).item<float>();
      s.assign(1, a / (b + 1e-8f));
      scaled_norm = s[0] * c;
    }
    if (front[i] != 1.0) {
      const float f = static_cast<float>(front[i]);
      for (auto& x : s) x = x * f;
      scaled_norm = scaled_norm * f;
    }
    if (!prev_norm.empty()) {
      float* prev = prev_norm[i].data_ptr<float>();
      float q = scaled_norm / (*prev + 1e-8f);
      if (!std::isnan(q) && q < 1.01f) q = 1.01f;
      const float lim = q / 1.01f;
      for (auto& x : s) x = x / lim;
      scaled_norm = scaled_norm / lim;
      *prev = scaled_norm;
    }
    const float a = static_cast<float>(alpha[i]);
    for (auto& x : s) x = x * a;
    const float d = static_cast<float>(decay[i]);
    apply(p.data_ptr<float>(), g.data_ptr<float>(), m, n, s.data(), channel ? (right ? 0 : 1) : 2, d, decay[i] != 1.0);
  }
}

}  // namespace lowrank_kernels
