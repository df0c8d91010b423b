// C++ CPU kernel of the adam family (lowrank_kernels/ops/adam.py has the schema and
// lowrank_kernels/reference/adam.py the specification): the elementwise Adam moment
// update on an already projected R (APOLLO, FRUGAL), returning N.
//
// One pass over flat contiguous data, split by at::parallel_for; the inner loop is plain
// arithmetic on contiguous arrays (no branches), which the compiler vectorizes. R is
// read in the accumulation dtype (float32, float64 when R or the moments are float64);
// the moments are read and written in their own dtype, N is stored in the moments'
// dtype, computed from the unrounded moments, exactly as the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace lowrank_kernels {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 16384;

void check_float(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must have a floating dtype (float32, bfloat16, float16, float64), got ", s);
}

// The update with N written into `out` (contiguous, the moments' dtype and shape).
void adam_update_into(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& out, double beta1,
                      double beta2, double eps);

Tensor adam_update_cpu(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, double beta1, double beta2, double eps,
                       const std::optional<Tensor>& m_absmax, const std::optional<Tensor>& v_absmax,
                       int64_t block_size, int64_t moment_seed) {
  const char* op = "adam_update_cpu";
  TORCH_CHECK(!(m_absmax.has_value() && m_absmax->defined()) && !(v_absmax.has_value() && v_absmax->defined()), op,
              ": 8-bit moments are not implemented in C++ yet");
  TORCH_CHECK(moment_seed < 0, op, ": stochastic rounding is not implemented in C++ yet");
  check_float(r, "r", op);
  check_float(exp_avg, "exp_avg", op);
  check_float(exp_avg_sq, "exp_avg_sq", op);
  TORCH_CHECK(exp_avg.sizes() == r.sizes(), op, ": exp_avg must have shape ", r.sizes(), ", got ", exp_avg.sizes());
  TORCH_CHECK(exp_avg_sq.sizes() == r.sizes(), op, ": exp_avg_sq must have shape ", r.sizes(), ", got ",
              exp_avg_sq.sizes());
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), op, ": exp_avg (", exp_avg.scalar_type(),
              ") and exp_avg_sq (", exp_avg_sq.scalar_type(), ") must have one dtype");
  Tensor out = at::empty(exp_avg.sizes(), exp_avg.options().memory_format(at::MemoryFormat::Contiguous));
  adam_update_into(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps);
  return out;
}

void adam_update_into(const Tensor& r, Tensor& exp_avg, Tensor& exp_avg_sq, const Tensor& out, double beta1,
                      double beta2, double eps) {
  const bool f64 = r.scalar_type() == at::kDouble || exp_avg.scalar_type() == at::kDouble;
  const at::ScalarType acc = f64 ? at::kDouble : at::kFloat;
  const Tensor rc = r.to(acc).contiguous();
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

// The multi-tensor form: every entry checked first, then the update on each in turn.
// N goes into the caller's `n` list (a schema returning Tensor[] next to mutated lists
// cannot be functionalized by torch.compile).
void adam_foreach_update_cpu(at::TensorList r, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList n,
                             double beta1, double beta2, double eps, at::TensorList m_absmax, at::TensorList v_absmax,
                             int64_t block_size, at::IntArrayRef moment_seed) {
  const char* op = "adam_foreach_update_cpu";
  TORCH_CHECK(m_absmax.empty() && v_absmax.empty(), op, ": 8-bit moments are not implemented in C++ yet");
  for (auto sd : moment_seed) TORCH_CHECK(sd < 0, op, ": stochastic rounding is not implemented in C++ yet");
  TORCH_CHECK(exp_avg.size() == r.size() && exp_avg_sq.size() == r.size() && n.size() == r.size(), op,
              ": exp_avg, exp_avg_sq and n must have one entry per tensor of r (", r.size(), ")");
  for (size_t i = 0; i < r.size(); ++i) {
    check_float(r[i], "r", op);
    check_float(exp_avg[i], "exp_avg", op);
    check_float(exp_avg_sq[i], "exp_avg_sq", op);
    TORCH_CHECK(exp_avg[i].sizes() == r[i].sizes() && exp_avg_sq[i].sizes() == r[i].sizes(), op, ": entry ", i,
                ": the moments must have r's shape ", r[i].sizes());
    TORCH_CHECK(exp_avg[i].scalar_type() == exp_avg_sq[i].scalar_type(), op, ": entry ", i,
                ": exp_avg and exp_avg_sq must have one dtype");
    TORCH_CHECK(n[i].device().is_cpu() && n[i].scalar_type() == exp_avg[i].scalar_type() &&
                    n[i].sizes() == r[i].sizes() && n[i].is_contiguous(),
                op, ": entry ", i, ": n must be a contiguous CPU tensor of the moments' dtype and r's shape");
  }
  for (size_t i = 0; i < r.size(); ++i) {
    Tensor m = exp_avg[i], v = exp_avg_sq[i];
    adam_update_into(r[i], m, v, n[i], beta1, beta2, eps);
  }
}

}  // namespace
}  // namespace lowrank_kernels

TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {
  m.def(
      "adam_update_cpu(Tensor r, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, float beta1, float beta2, float eps, "
      "Tensor(d!)? m_absmax=None, Tensor(e!)? v_absmax=None, int block_size=0, int moment_seed=-1) -> Tensor");
  m.def(
      "adam_foreach_update_cpu(Tensor[] r, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, Tensor(c!)[] n, "
      "float beta1, float beta2, float eps, Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, int block_size, "
      "int[] moment_seed) -> ()");
}

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) {
  m.impl("adam_update_cpu", &lowrank_kernels::adam_update_cpu);
  m.impl("adam_foreach_update_cpu", &lowrank_kernels::adam_foreach_update_cpu);
}
