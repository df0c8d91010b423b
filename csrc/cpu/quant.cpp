// The quant family on CPU: packed INT4 projectors, INT8 weights with stochastic
// rounding (lowrank_kernels/ops/quant.py has the schemas and the validation). (The projection ops with a packed INT4 projector are the projection
// family's INT4 projector kind: csrc/cpu/projection/projector.h dequantizes it in its panel
// loader.)
// Specification: lowrank_kernels/reference/quant.py (same group layout, same
// rounding, same counter hash for the random numbers, float32 arithmetic).
//
// Quantizing kernels run one group per iteration of at::parallel_for: a sweep for the
// group's min/max, a sweep to quantize (the group is in cache).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cpu/hash.h"
#include "cpu/kernels.h"

namespace lowrank_kernels {
namespace {

constexpr float kScaleFloor = 1e-5f;

using hash::mix32;      // csrc/cpu/hash.h
using hash::seed_keys;

inline float uniform_at(int64_t idx, uint32_t k1, uint32_t k2) {
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(idx & 0xFFFFFFFF) ^ k1) ^ k2);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

inline int64_t ngroups(int64_t numel, int64_t gs) { return (numel + gs - 1) / gs; }

inline float round_level(float v, float levels) {
  return std::min(std::max(std::floor(v + 0.5f), 0.0f), levels);
}

// A group holding a NaN or an infinity: scale = minimum = NaN and every level 0, so the
// group dequantizes to NaN (lowrank_kernels/reference/quant.py, "Non-finite values").
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Quantize a flat contiguous tensor group by group with round-to-nearest; `emit(i, q)`
// stores level q of element i.
template <typename scalar_t, typename Emit>
void quantize_groups(const scalar_t* x, int64_t numel, int64_t gs, float levels, float* scale, float* mn_out,
                     Emit emit) {
  at::parallel_for(0, ngroups(numel, gs), 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g * gs, e = std::min(b + gs, numel);
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      bool finite = true;
      for (int64_t i = b; i < e; ++i) {
        const float v = static_cast<float>(x[i]);
        finite = finite && std::isfinite(v);
        mn = std::min(mn, v);
        mx = std::max(mx, v);
      }
      if (!finite) {
        for (int64_t i = b; i < e; ++i) emit(i, 0.0f);
        scale[g] = kNaN;
        mn_out[g] = kNaN;
        continue;
      }
      const float s = std::max(mx - mn, kScaleFloor) / levels;
      for (int64_t i = b; i < e; ++i) emit(i, round_level((static_cast<float>(x[i]) - mn) / s, levels));
      scale[g] = s;
      mn_out[g] = mn;
    }
  });
}

// What the kernels read through raw pointers (ops/quant.py validates with messages).
bool is_u8(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous(); }

bool are_stats(const at::Tensor& scale, const at::Tensor& minimum, int64_t groups) {
  for (const at::Tensor* t : {&scale, &minimum}) {
    if (!(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == groups)) {
      return false;
    }
  }
  return true;
}

// --------------------------------------------------------------------------- INT4
inline float int4_at(const uint8_t* pk, const float* s, const float* mn, int64_t f, int64_t gs) {
  const int q = (pk[f >> 1] >> ((f & 1) * 4)) & 15;
  const int64_t g = f / gs;
  return mn[g] + s[g] * static_cast<float>(q);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_int4_pack_cpu(const at::Tensor& x_in, int64_t group_size) {
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0);
  const at::Tensor x = x_in.reshape({-1}).contiguous();
  const int64_t numel = x.numel();
  at::Tensor packed = at::zeros({(numel + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({ngroups(numel, group_size)}, x.options().dtype(at::kFloat));
  at::Tensor minimum = at::empty_like(scale);
  uint8_t* pk = packed.data_ptr<uint8_t>();
  // group_size is even, so a byte never holds two groups and groups write disjoint bytes.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quant_int4_pack_cpu", [&] {
    quantize_groups<scalar_t>(x.data_ptr<scalar_t>(), numel, group_size, 15.0f, scale.data_ptr<float>(),
                              minimum.data_ptr<float>(), [&](int64_t i, float q) {
                                const uint8_t v = static_cast<uint8_t>(q);
                                pk[i >> 1] |= (i & 1) ? static_cast<uint8_t>(v << 4) : v;
                              });
  });
  return {packed, scale, minimum};
}

at::Tensor quant_int4_unpack_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& minimum,
                                 at::IntArrayRef shape, at::ScalarType dtype, int64_t group_size) {
  TORCH_CHECK(group_size >= 1);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const int64_t numel = out.numel();
  TORCH_CHECK(is_u8(packed) && packed.numel() == (numel + 1) / 2);
  TORCH_CHECK(are_stats(scale, minimum, ngroups(numel, group_size)));
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* mn = minimum.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "quant_int4_unpack_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, 4096, [&](int64_t b, int64_t e) {
      for (int64_t f = b; f < e; ++f) o[f] = static_cast<scalar_t>(int4_at(pk, s, mn, f, group_size));
    });
  });
  return out;
}

// --------------------------------------------------------------------------- INT8
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_int8_quantize_cpu(const at::Tensor& w_in, int64_t group_size) {
  TORCH_CHECK(group_size >= 1);
  const at::Tensor w = w_in.reshape({-1}).contiguous();
  const int64_t numel = w.numel();
  at::Tensor q = at::empty(w_in.sizes(), w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({ngroups(numel, group_size)}, w.options().dtype(at::kFloat));
  at::Tensor minimum = at::empty_like(scale);
  uint8_t* qp = q.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quant_int8_quantize_cpu", [&] {
    quantize_groups<scalar_t>(w.data_ptr<scalar_t>(), numel, group_size, 255.0f, scale.data_ptr<float>(),
                              minimum.data_ptr<float>(),
                              [&](int64_t i, float v) { qp[i] = static_cast<uint8_t>(v); });
  });
  return {q, scale, minimum};
}

at::Tensor quant_int8_dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& minimum,
                                     int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(group_size >= 1 && is_u8(q) && are_stats(scale, minimum, ngroups(q.numel(), group_size)));
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int64_t numel = q.numel();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* mn = minimum.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "quant_int8_dequantize_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, 4096, [&](int64_t b, int64_t e) {
      for (int64_t f = b; f < e; ++f) {
        const int64_t g = f / group_size;
        o[f] = static_cast<scalar_t>(mn[g] + s[g] * static_cast<float>(qp[f]));
      }
    });
  });
  return out;
}

void quant_int8_update_sr_cpu(at::Tensor& q, at::Tensor& scale, at::Tensor& minimum, const at::Tensor& update_in,
                              double decay, double alpha, int64_t seed, int64_t group_size) {
  TORCH_CHECK(group_size >= 1 && is_u8(q) && are_stats(scale, minimum, ngroups(q.numel(), group_size)));
  TORCH_CHECK(update_in.numel() == q.numel());
  const at::Tensor update = update_in.reshape({-1}).contiguous();
  const int64_t numel = q.numel();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  float* mp = minimum.data_ptr<float>();
  uint32_t k1, k2;
  seed_keys(seed, &k1, &k2);
  const float dec = static_cast<float>(decay), alp = static_cast<float>(alpha);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, update.scalar_type(), "quant_int8_update_sr_cpu", [&] {
    const scalar_t* up = update.data_ptr<scalar_t>();
    at::parallel_for(0, ngroups(numel, group_size), 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b = g * group_size, e = std::min(b + group_size, numel);
        const float os = sp[g], om = mp[g];
        auto value = [&](int64_t i) {
          return (om + os * static_cast<float>(qp[i])) * dec + static_cast<float>(up[i]) * alp;
        };
        float mn = std::numeric_limits<float>::infinity(), mx = -mn;
        bool finite = true;
        for (int64_t i = b; i < e; ++i) {
          const float v = value(i);
          finite = finite && std::isfinite(v);
          mn = std::min(mn, v);
          mx = std::max(mx, v);
        }
        if (!finite) {
          for (int64_t i = b; i < e; ++i) qp[i] = 0;
          sp[g] = kNaN;
          mp[g] = kNaN;
          continue;
        }
        const float s = std::max(mx - mn, kScaleFloor) / 255.0f;
        for (int64_t i = b; i < e; ++i) {
          const float v = std::floor((value(i) - mn) / s + uniform_at(i, k1, k2));
          qp[i] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 255.0f));
        }
        sp[g] = s;
        mp[g] = mn;
      }
    });
  });
}

}  // namespace lowrank_kernels
