// C++ CPU kernels of the adam family (lowrank_kernels/ops/adam.py has the schemas and the
// validation, lowrank_kernels/reference/adam.py the specification): the elementwise Adam moment
// update on an already projected R (APOLLO, FRUGAL), returning N.
//
// One pass over flat contiguous data, split by at::parallel_for; the inner loop is plain
// arithmetic on contiguous arrays (no branches), which the compiler vectorizes. R is
// read in the accumulation dtype (float32, float64 when R or the moments are float64);
// the moments are read and written in their own dtype, N is stored in the moments'
// dtype, computed from the unrounded moments, exactly as the reference.
//
// All-float32 contiguous data (the common case) skips ATen entirely: fast::adam_run
// (csrc/cpu/fast_f32.h) on raw pointers, the reference's operations in its order
// (m = fma(R, 1-b1, m*b1) as ATen's vectorized add_ with alpha).
//
// Moment formats (ops/adam.py): bf16 moments with moment_seed >= 0 are updated with the
// reference's ATen operations (so the float32 moments are bit-identical to it) and stored
// with the hashed stochastic rounding (moments8::store_bf16_sr; counters: the flat index,
// + numel for exp_avg_sq); 8-bit moments (uint8 codes + float32 absmax per block along
// the last dim) go through moments8::adam8_step, one row-block at a time on the stack
// (no float32 moment tensor), N float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include "cpu/fast_f32.h"
#include "cpu/kernels.h"
#include "cpu/moments8.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace lowrank_kernels {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 16384;

bool is_float_cpu(const Tensor& t) {
  const auto s = t.scalar_type();
  return t.device().is_cpu() && (s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf);
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Checks of one entry (ops/adam.py validate_adam_update has the messages); returns
// whether the moments are 8-bit.
bool check_entry(const Tensor& r, const Tensor& exp_avg, const Tensor& exp_avg_sq, const OptTensor& m_absmax,
                 const OptTensor& v_absmax, int64_t block_size, int64_t seed) {
  TORCH_CHECK(is_float_cpu(r));
  const bool eight = given(m_absmax) || given(v_absmax);
  if (!eight) {
    TORCH_CHECK(is_float_cpu(exp_avg) && is_float_cpu(exp_avg_sq) && exp_avg.scalar_type() == exp_avg_sq.scalar_type());
    TORCH_CHECK(block_size == 0);
    TORCH_CHECK(seed < 0 || exp_avg.scalar_type() == at::kBFloat16);
  }
  TORCH_CHECK(exp_avg.sizes() == r.sizes() && exp_avg_sq.sizes() == r.sizes());
  if (!eight) return false;
  TORCH_CHECK(given(m_absmax) && given(v_absmax));
  TORCH_CHECK(r.dim() >= 1);
  TORCH_CHECK(block_size >= 1 && block_size <= moments8::kMaxBlock);
  TORCH_CHECK(seed < 0);
  for (const Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kByte && t->is_contiguous());
  }
  std::vector<int64_t> ashape(r.sizes().begin(), r.sizes().end());
  ashape.back() = (ashape.back() + block_size - 1) / block_size;
  for (const Tensor* t : {&*m_absmax, &*v_absmax}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                t->sizes() == at::IntArrayRef(ashape));
  }
  return true;
}

// A 2-D (rows x cols) view of a contiguous tensor, blocks along its last dim (1 x numel
// for a 0-d one).
Tensor as_rows(const Tensor& t) {
  if (t.dim() == 0) return t.reshape({1, 1});
  const int64_t cols = t.size(-1);
  return t.reshape({cols == 0 ? 0 : t.numel() / cols, cols});
}

// The update with N written into `out` (contiguous, N's dtype, r's shape); m_absmax /
// v_absmax defined: 8-bit moments.
void adam_update_into(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& out, double beta1,
                      double beta2, double eps, const Tensor& m_absmax = Tensor(), const Tensor& v_absmax = Tensor(),
                      int64_t block_size = 0, int64_t seed = -1) {
  const bool f64 = r.scalar_type() == at::kDouble || exp_avg.scalar_type() == at::kDouble;
  const at::ScalarType acc = f64 ? at::kDouble : at::kFloat;
  if (!m_absmax.defined() && seed < 0 && r.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
      exp_avg_sq.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && r.is_contiguous() &&
      exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() && out.is_contiguous()) {
    // All float32 and contiguous: raw pointers, no ATen op (each would cost ~1 us against
    // well under that of arithmetic on a small moment), the reference's operations in its
    // order (fast::adam_run, as the projection step's fast path), N computed into `out`.
    const int64_t total = r.numel();
    const float* rv = static_cast<const float*>(r.const_data_ptr());
    float* ov = static_cast<float*>(out.data_ptr());
    if (ov != rv) std::copy(rv, rv + total, ov);
    fast::adam_run(static_cast<float*>(exp_avg.data_ptr()), static_cast<float*>(exp_avg_sq.data_ptr()), ov, total,
                   fast::adam_consts(beta1, beta2, eps), /*portable=*/false);
    return;
  }
  const Tensor rc = r.to(acc).contiguous();
  if (m_absmax.defined()) {  // 8-bit
    const Tensor r2 = as_rows(rc);
    const int64_t rows = r2.size(0), cols = r2.size(1);
    if (rows * cols == 0) return;
    AT_DISPATCH_FLOATING_TYPES(acc, "adam_update_cpu_8bit", [&] {
      moments8::adam8_step<scalar_t, float>(r2.data_ptr<scalar_t>(), cols, 1, exp_avg.data_ptr<uint8_t>(),
                                            exp_avg_sq.data_ptr<uint8_t>(), m_absmax.data_ptr<float>(),
                                            v_absmax.data_ptr<float>(), out.data_ptr<float>(), cols, 1, rows, cols,
                                            block_size, beta1, beta2, eps);
    });
    return;
  }
  if (seed >= 0) {
    // bf16 stochastic rounding: the reference's very ATen operations in acc, then the SR store.
    const Tensor m = exp_avg.to(acc).mul_(beta1).add_(rc, 1.0 - beta1);
    const Tensor v = exp_avg_sq.to(acc).mul_(beta2).addcmul_(rc, rc, 1.0 - beta2);
    out.copy_(m / (v.sqrt() + eps));
    Tensor mo = exp_avg.is_contiguous() ? exp_avg : at::empty_like(exp_avg, at::MemoryFormat::Contiguous);
    Tensor vo = exp_avg_sq.is_contiguous() ? exp_avg_sq : at::empty_like(exp_avg_sq, at::MemoryFormat::Contiguous);
    moments8::store_bf16_sr(as_rows(m.contiguous()), as_rows(mo), seed, 0);
    moments8::store_bf16_sr(as_rows(v.contiguous()), as_rows(vo), seed, m.numel());
    if (!mo.is_same(exp_avg)) exp_avg.copy_(mo);
    if (!vo.is_same(exp_avg_sq)) exp_avg_sq.copy_(vo);
    return;
  }
  Tensor m = exp_avg.contiguous();
  Tensor v = exp_avg_sq.contiguous();
  const int64_t total = rc.numel();
  AT_DISPATCH_FLOATING_TYPES(acc, "adam_update_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* rv = rc.data_ptr<acc_t>();
    const acc_t b1 = static_cast<acc_t>(beta1), b2 = static_cast<acc_t>(beta2), e = static_cast<acc_t>(eps);
    const acc_t ob1 = static_cast<acc_t>(1.0 - beta1), ob2 = static_cast<acc_t>(1.0 - beta2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), "adam_update_cpu_moments", [&] {
      scalar_t* mv = m.data_ptr<scalar_t>();
      scalar_t* vv = v.data_ptr<scalar_t>();
      scalar_t* ov = out.data_ptr<scalar_t>();
      at::parallel_for(0, total, kGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t g = rv[i];
          const acc_t mm = b1 * static_cast<acc_t>(mv[i]) + ob1 * g;
          const acc_t v2 = b2 * static_cast<acc_t>(vv[i]) + ob2 * g * g;  // addcmul order
          mv[i] = static_cast<scalar_t>(mm);
          vv[i] = static_cast<scalar_t>(v2);
          ov[i] = static_cast<scalar_t>(mm / (std::sqrt(v2) + e));
        }
      });
    });
  });
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
}

}  // namespace

Tensor adam_update_cpu(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, double beta1, double beta2, double eps,
                       const OptTensor& m_absmax, const OptTensor& v_absmax, int64_t block_size,
                       int64_t moment_seed) {
  const bool eight = check_entry(r, exp_avg, exp_avg_sq, m_absmax, v_absmax, block_size, moment_seed);
  // at::empty's contiguous CPU allocation, without the dispatcher (the per-weight loops of the
  // method-step list ops call this kernel directly).
  Tensor out = at::detail::empty_cpu(exp_avg.sizes(), eight ? at::kFloat : exp_avg.scalar_type(), false,
                                     std::nullopt);
  adam_update_into(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps, eight ? *m_absmax : Tensor(),
                   eight ? *v_absmax : Tensor(), block_size, moment_seed);
  return out;
}

// The multi-tensor form: every entry checked first, then the update on each in turn.
// N goes into the caller's `n` list (a schema returning Tensor[] next to mutated lists
// cannot be functionalized by torch.compile).
void adam_foreach_update_cpu(at::TensorList r, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList n,
                             double beta1, double beta2, double eps, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed) {
  TORCH_CHECK(exp_avg.size() == r.size() && exp_avg_sq.size() == r.size() && n.size() == r.size());
  for (const auto& len : {m_absmax.size(), v_absmax.size(), moment_seed.size()}) {
    TORCH_CHECK(len == 0 || len == r.size());
  }
  auto opt = [](at::TensorList xs, size_t i) -> OptTensor { return xs.empty() ? OptTensor() : OptTensor(xs[i]); };
  auto seed_of = [&](size_t i) -> int64_t { return moment_seed.empty() ? -1 : moment_seed[i]; };
  for (size_t i = 0; i < r.size(); ++i) {
    const bool eight =
        check_entry(r[i], exp_avg[i], exp_avg_sq[i], opt(m_absmax, i), opt(v_absmax, i), block_size, seed_of(i));
    const auto want = eight ? at::kFloat : exp_avg[i].scalar_type();
    TORCH_CHECK(n[i].device().is_cpu() && n[i].scalar_type() == want && n[i].sizes() == r[i].sizes() &&
                n[i].is_contiguous());
  }
  for (size_t i = 0; i < r.size(); ++i) {
    Tensor m = exp_avg[i], v = exp_avg_sq[i];
    adam_update_into(r[i], m, v, n[i], beta1, beta2, eps, m_absmax.empty() ? Tensor() : m_absmax[i],
                     v_absmax.empty() ? Tensor() : v_absmax[i], block_size, seed_of(i));
  }
}

}  // namespace lowrank_kernels
