// The DCT projector's top-k order, shared by the scoring kernels (dct.cpp) and Trion's fast
// path (trion.cpp), which must pick the very same indices.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>

namespace lowrank_kernels {

// order[0..k) = the indices of the k best of the s scores v, best first, in a total order:
// NaN first, then descending score, ties to the lower index (order needs room for s entries).
template <typename scalar_t>
inline void topk_order(const scalar_t* v, int64_t* order, int64_t s, int64_t k) {
  std::iota(order, order + s, int64_t(0));
  std::partial_sort(order, order + k, order + s, [v](int64_t a, int64_t b) {
    const bool na = std::isnan(v[a]), nb = std::isnan(v[b]);
    if (na || nb) {
      if (na && nb) return a < b;
      return na;
    }
    if (v[a] != v[b]) return v[a] > v[b];
    return a < b;
  });
}

}  // namespace lowrank_kernels
