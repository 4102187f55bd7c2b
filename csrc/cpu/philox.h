// Philox4x32-10 exactly as Triton's tl.rand: the scalar generator, and keep_row (the dropout keep flags of
// consecutive counters) per ISA: avx2::keep_row (8 counters at a time), avx512::keep_row (16), keep_row_scalar.
#pragma once

#include "simd.h"
#include "vec_traits.h"

#include <cstdint>
#include <cstring>

namespace fastattn {
namespace cpu {
namespace {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;

inline float philox_uniform(uint64_t seed, uint64_t counter) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c0, pb = uint64_t(kPhiloxRoundB) * c2;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  int32_t x;
  std::memcpy(&x, &c0, 4);
  x = x < 0 ? ~x : x;
  return float(x) * kUniformScale;
}

// keep[j] = philox_uniform(seed, ctr + j) >= p for j < n
inline void keep_row_scalar(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
  for (int64_t j = 0; j < n; ++j) keep[j] = philox_uniform(seed, ctr + uint64_t(j)) >= p;
}

#define FA_ISA_INCLUDE "philox_simd-inl.h"
#include "foreach_isa.h"

}  // namespace
}  // namespace cpu
}  // namespace fastattn
