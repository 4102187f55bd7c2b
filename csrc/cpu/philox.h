// Philox4x32-10 exactly as Triton's tl.rand: the scalar generator, the dropout keep flags of consecutive counters
// (keep_row_scalar), and the generator on 8 (AVX2) and 16 (AVX-512F) consecutive counters.
#pragma once

#include "simd.h"

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

#ifdef FA_X86

// Philox on 8 consecutive counters (no carry into the high word inside the group).
FA_AVX2 inline __m256i mulhilo_epu32(__m256i a, __m256i b, __m256i* lo) {  // a: a 32-bit splat
  const __m256i pe = _mm256_mul_epu32(a, b);
  const __m256i po = _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32));
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

FA_AVX2 inline __m256 philox_uniform8(uint64_t seed, uint32_t lo0, uint32_t hi) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(lo0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(int(hi)), c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m256i ra = _mm256_set1_epi32(int(kPhiloxRoundA)), rb = _mm256_set1_epi32(int(kPhiloxRoundB));
  for (int r = 0; r < 10; ++r) {
    __m256i loa, lob;
    const __m256i hia = mulhilo_epu32(ra, c0, &loa), hib = mulhilo_epu32(rb, c2, &lob);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hib, c1), _mm256_set1_epi32(int(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hia, c3), _mm256_set1_epi32(int(k1)));
    c1 = lob;
    c3 = loa;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

// Philox on 16 consecutive counters (no carry into the high word inside the group), as philox_uniform8.
FA_AVX512 inline __m512i mulhilo_epu32_512(__m512i a, __m512i b, __m512i* lo) {  // a: a 32-bit splat
  const __m512i pe = _mm512_mul_epu32(a, b);
  const __m512i po = _mm512_mul_epu32(a, _mm512_srli_epi64(b, 32));
  *lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

FA_AVX512 inline __m512 philox_uniform16(uint64_t seed, uint32_t lo0, uint32_t hi) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(lo0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(int(hi)), c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m512i ra = _mm512_set1_epi32(int(kPhiloxRoundA)), rb = _mm512_set1_epi32(int(kPhiloxRoundB));
  for (int r = 0; r < 10; ++r) {
    __m512i loa, lob;
    const __m512i hia = mulhilo_epu32_512(ra, c0, &loa), hib = mulhilo_epu32_512(rb, c2, &lob);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hib, c1), _mm512_set1_epi32(int(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hia, c3), _mm512_set1_epi32(int(k1)));
    c1 = lob;
    c3 = loa;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i x = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
}
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
