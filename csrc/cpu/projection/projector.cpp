// The projector source of the projection family: builds a ProjectorSource from the ops'
// projector arguments (proj, indices?, q_scale?, q_min?, rank, group_size).
//
// Validation with messages is the op layer's (lowrank_kernels/ops/projection.py,
// check_projector), which runs before every call of these kernels through the router;
// the bare checks here guard what the kernels rely on (shapes, dtypes and index ranges
// read through raw pointers) when the C++ ops are called directly.
#include "cpu/projection/projector.h"

#include <c10/util/Exception.h>

namespace lowrank_kernels {
namespace projection {
namespace {

bool is_float_cpu(const Tensor& t) {
  const auto s = t.scalar_type();
  return t.device().is_cpu() && (s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf);
}

}  // namespace

ProjectorSource make_source(int64_t m, int64_t n, bool left, const Tensor& proj, const OptTensor& indices,
                            const OptTensor& q_scale, const OptTensor& q_min, int64_t rank, int64_t group_size,
                            std::vector<int64_t>& shape, bool any_rank) {
  const int64_t max_rank = any_rank ? (left ? m : n) : std::min(m, n);
  const bool has_idx = indices.has_value() && indices->defined();
  const bool has_s = q_scale.has_value() && q_scale->defined();
  const bool has_mn = q_min.has_value() && q_min->defined();
  ProjectorSource src;
  src.K = left ? m : n;
  if (!has_idx && !has_s && !has_mn) {
    TORCH_CHECK(is_float_cpu(proj) && proj.dim() == 2);
    TORCH_CHECK(left ? proj.size(0) == m : proj.size(1) == n);
    src.kind = ProjKind::Dense;
    src.dense = proj;  // P = proj^T for side="left": run() orients it (no view made here)
    src.dense_left = left;
    src.r = left ? proj.size(1) : proj.size(0);
    TORCH_CHECK(rank == 0 || rank == src.r);
  } else if (has_idx && !has_s && !has_mn) {
    const Tensor& idx = *indices;
    TORCH_CHECK(is_float_cpu(proj) && proj.dim() == 2 && proj.size(0) == src.K && proj.size(1) == src.K);
    TORCH_CHECK(idx.device().is_cpu() && (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong) &&
                idx.dim() == 1);
    src.kind = ProjKind::DCT;
    src.basis = proj;
    src.idx = idx;  // read in place, int32 or int64 (no conversion, no copy)
    src.r = idx.size(0);
    for (int64_t a = 0; a < src.r; ++a) {
      const int64_t i = index_at(idx, a);
      TORCH_CHECK(i >= 0 && i < src.K, "indices must lie in [0, ", src.K, "), got ", i);
    }
    TORCH_CHECK(rank == 0 || rank == src.r);
  } else {
    TORCH_CHECK(!has_idx && has_s && has_mn);
    TORCH_CHECK(group_size >= 2 && group_size % 2 == 0);
    TORCH_CHECK(rank >= 1 && rank <= max_rank);
    const int64_t numel = rank * src.K;
    const int64_t groups = (numel + group_size - 1) / group_size;
    TORCH_CHECK(proj.device().is_cpu() && proj.scalar_type() == at::kByte && proj.is_contiguous() &&
                proj.numel() == (numel + 1) / 2);
    for (const Tensor* t : {&*q_scale, &*q_min}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->numel() == groups);
    }
    src.kind = ProjKind::Int4;
    src.packed = proj;
    src.qscale = *q_scale;
    src.qmin = *q_min;
    src.gs = group_size;
    src.stored_left = left;
    src.r = rank;
  }
  if (src.kind != ProjKind::Int4) TORCH_CHECK(group_size == 0);
  TORCH_CHECK(src.r >= 1 && src.r <= max_rank);
  shape = left ? std::vector<int64_t>{src.r, n} : std::vector<int64_t>{m, src.r};
  return src;
}

at::ScalarType proj_dtype(const ProjectorSource& src) {
  switch (src.kind) {
    case ProjKind::Dense:
      return src.dense.scalar_type();
    case ProjKind::DCT:
      return src.basis.scalar_type();
    default:
      return at::kFloat;
  }
}

}  // namespace projection
}  // namespace lowrank_kernels
