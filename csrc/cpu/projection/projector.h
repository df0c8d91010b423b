// The projector of the projection family's C++ kernels: which of its three kinds a call
// passes (dense P, DCT basis rows by index, packed INT4 P) and how the engine reads it.
//
// The engine (engine.cpp) reads the projector only through ProjectorSource::panel(k0, len, acc,
// scratch): columns [k0, k0 + len) of P (r x K, right orientation) in the accumulation
// dtype, and materialize(acc), the whole r x K P (the size of one moment). The apply
// phase over K panels asks for exactly its panel; the row-panel loops need all of P and
// assemble it once per call. The three kinds:
//   - dense: a view (right orientation of proj) when already in acc, else converted;
//   - DCT (P = C[idx]: C the shared s x s DCT basis, idx an int vector of r rows; with
//     side="left" P = C[idx]^T, whose right orientation is again C[idx]): the panel is
//     rows idx of C, columns k0..k0+len, gathered and converted to acc;
//   - packed INT4 (two nibbles per byte, even index in the low nibble, float32 (scale,
//     min) per group of consecutive elements of the stored row-major P: r x n for
//     side="right", m x r for side="left"): x = min + scale * q, in float32 as the
//     reference, then converted to acc.
// The GEMM and epilogue code is the same for all three.
//
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace lowrank_kernels {
namespace projection {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Panel size of the engine (engine.cpp): about kPanelElems elements of the big matrix.
// materialize() converts a dense projector in chunks of that size too.
constexpr int64_t kPanelElems = 1 << 18;

enum class ProjKind { Dense, DCT, Int4 };

// Value f of a packed INT4 tensor in float32 (the reference's dequantization).
inline float int4_value(const uint8_t* pk, const float* s, const float* mn, int64_t f, int64_t gs) {
  const int q = (pk[f >> 1] >> ((f & 1) * 4)) & 15;
  const int64_t g = f / gs;
  return mn[g] + s[g] * static_cast<float>(q);
}

struct ProjectorSource {
  ProjKind kind = ProjKind::Dense;
  int64_t r = 0, K = 0;
  // Dense: P in right orientation (r x K), any floating dtype and strides; as make_source
  // leaves it (no ATen call there), the projector as given, whose transpose P is when
  // dense_left (side="left"); run() takes oriented().
  Tensor dense;
  bool dense_left = false;
  Tensor basis;  // DCT: the s x s basis (s = K)
  Tensor idx;    // DCT: the r row indices as given (int32 or int64, 1-D, any stride)
  // Int4: the packed codes, per-group stats, group size, and whether the stored P is
  // m x r (side="left": element (a, k) of the right orientation is stored at k * r + a)
  // or r x n (side="right": at a * K + k).
  Tensor packed, qscale, qmin;
  int64_t gs = 0;
  bool stored_left = false;

  int64_t rank() const { return r; }
  int64_t k() const { return K; }

  // This source with a dense P in right orientation (the one ATen call make_source saves).
  ProjectorSource oriented() const {
    ProjectorSource s = *this;
    if (s.kind == ProjKind::Dense && s.dense_left) {
      s.dense = s.dense.t();
      s.dense_left = false;
    }
    return s;
  }

  // Columns [k0, k0 + len) of P in dtype `acc`: a view when a dense projector already
  // has that dtype, else filled into `scratch` (at least r * len elements of acc).
  Tensor panel(int64_t k0, int64_t len, at::ScalarType acc, const Tensor& scratch) const {
    if (kind == ProjKind::Dense) {
      Tensor src = dense.narrow(1, k0, len);
      if (src.scalar_type() == acc) return src;
      Tensor out = scratch.narrow(0, 0, r * len).view({r, len});
      out.copy_(src);
      return out;
    }
    Tensor out = scratch.narrow(0, 0, r * len).view({r, len});
    if (kind == ProjKind::DCT) {
      out.copy_(basis.narrow(1, k0, len).index_select(0, idx));  // r x len gathered rows
      return out;
    }
    const uint8_t* pk = packed.data_ptr<uint8_t>();
    const float* s = qscale.data_ptr<float>();
    const float* mn = qmin.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES(acc, "projection_int4_panel", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, r, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          for (int64_t j = 0; j < len; ++j) {
            const int64_t kk = k0 + j;
            const int64_t f = stored_left ? kk * r + a : a * K + kk;
            o[a * len + j] = static_cast<scalar_t>(int4_value(pk, s, mn, f, gs));
          }
        }
      });
    });
    return out;
  }

  // The whole P (r x K) in dtype `acc` (a view for a dense projector already in acc).
  Tensor materialize(at::ScalarType acc) const {
    if (kind == ProjKind::Dense && dense.scalar_type() == acc) return dense;
    if (kind == ProjKind::DCT) return basis.index_select(0, idx).to(acc);
    const auto opts = (kind == ProjKind::Dense ? dense : packed).options().dtype(acc);
    Tensor out = at::empty({r * K}, opts);
    if (kind == ProjKind::Int4) return panel(0, K, acc, out);  // one parallel pass over the rows
    // Dense in another dtype: converted in parallel chunks of columns.
    Tensor full = out.view({r, K});
    const int64_t chunk = std::min(K, std::max<int64_t>(64, kPanelElems / std::max<int64_t>(r, 1)));
    const int64_t nchunks = (K + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * chunk;
        const int64_t len = std::min(chunk, K - k0);
        full.narrow(1, k0, len).copy_(dense.narrow(1, k0, len));
      }
    });
    return full;
  }
};

// Element a of a 1-D int32 / int64 CPU index vector, read in place (any stride).
inline int64_t index_at(const Tensor& idx, int64_t a) {
  const int64_t off = a * idx.stride(0);
  if (idx.scalar_type() == at::kInt) return static_cast<const int32_t*>(idx.const_data_ptr())[off];
  return static_cast<const int64_t*>(idx.const_data_ptr())[off];
}

// Builds the source (right orientation) of a projector of any kind for an (m x n) matrix;
// `shape` receives the low-rank shape. The op layer (lowrank_kernels/ops/projection.py,
// check_projector) has validated the arguments; the bare checks here guard what the
// kernels read through raw pointers. The rank lies in [1, min(m, n)], or with `any_rank`
// (the plain projection, no Adam) in [1, K].
ProjectorSource make_source(int64_t m, int64_t n, bool left, const Tensor& proj, const OptTensor& indices,
                            const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size,
                            std::vector<int64_t>& shape, bool any_rank = false);

// The projector's dtype for the accumulation rule (a dequantized INT4 P is float32).
at::ScalarType proj_dtype(const ProjectorSource& src);

}  // namespace projection
}  // namespace lowrank_kernels
