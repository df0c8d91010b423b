// The counter-based hash shared by every stochastic-rounding kernel on the CPU (Q-GaLore's
// INT8 update in quant.cpp, the bf16 moment store in moments8.h): "lowbias32" (C. Wellons)
// and the two 32-bit keys of a 64-bit seed, exactly as lowrank_kernels/reference/quant.py
// (mix32_int, seed_keys) and the Triton kernels compute them.
#pragma once

#include <cstdint>

namespace lowrank_kernels {
namespace hash {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline void seed_keys(int64_t seed, uint32_t* k1, uint32_t* k2) {
  const uint64_t s = static_cast<uint64_t>(seed);
  *k1 = mix32(static_cast<uint32_t>(s & 0xFFFFFFFFu) ^ mix32(static_cast<uint32_t>(s >> 32) ^ 0x9E3779B9u));
  *k2 = mix32(*k1 ^ 0x85EBCA6Bu);
}

}  // namespace hash
}  // namespace lowrank_kernels
