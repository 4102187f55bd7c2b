// Philox4x32-10 exactly as Triton's tl.rand4x: the scalar generator, and keep_row (dropout keep flags of consecutive
// logical counters) per ISA: avx2::keep_row (8 Philox counters, 32 flags, at a time), avx512::keep_row (16, 64),
// keep_row_scalar. Logical counter i takes word i % 4 of the Philox output at counter i / 4: one Philox evaluation
// gives four flags (kernels/dropout.py's philox_keep draws the same in Triton).
#pragma once

#include "simd.h"
#include "vec_traits.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastattn {
namespace cpu {
namespace {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;

inline float word_uniform(uint32_t w) {  // tl.rand's uint -> [0, 1): x < 0 ? ~x : x, times 2^-31
  int32_t x;
  std::memcpy(&x, &w, 4);
  x = x < 0 ? ~x : x;
  return float(x) * kUniformScale;
}

// The four words of Philox4x32-10 at counter (lo, hi, 0, 0) under key seed, as uniforms in [0, 1).
inline void philox4_uniform(uint64_t seed, uint64_t counter, float u[4]) {
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
  u[0] = word_uniform(c0);
  u[1] = word_uniform(c1);
  u[2] = word_uniform(c2);
  u[3] = word_uniform(c3);
}

// keep[j] = uniform(ctr + j) >= p for j < n, uniform(i) = word i % 4 of Philox at counter i / 4
inline void keep_row_scalar(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
  for (int64_t j = 0; j < n;) {
    const uint64_t i = ctr + uint64_t(j);
    float u[4];
    philox4_uniform(seed, i >> 2, u);
    for (int k = int(i & 3); k < 4 && j < n; ++k, ++j) keep[j] = u[k] >= p;
  }
}

#define FA_ISA_INCLUDE "philox_simd-inl.h"
#include "foreach_isa.h"

}  // namespace
}  // namespace cpu
}  // namespace fastattn
