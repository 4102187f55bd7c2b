// Vec: the float32 / int32 lane operations that width-generic kernel bodies ("*-inl.h", compiled once per ISA by
// foreach_isa.h) are written against: 8 lanes in namespace avx2 (AVX2/FMA/F16C), 16 lanes in namespace avx512
// (AVX-512F), and 1 lane in namespace portable (plain float, for the scalar fallbacks). Each x86 one is defined in
// its ISA's target region, so its operations inline only into code of that ISA.
#pragma once

#include "kernel_util.h"
#include "simd.h"

#include <cstdint>

namespace fastattn {
namespace cpu {
namespace {

namespace portable {
struct Vec {
  static constexpr int W = 1;
  using F = float;
  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static F load_i8(const int8_t* p) { return float(*p); }
  static void store(float* p, F v) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F max(F a, F b) { return a > b ? a : b; }
  static float reduce_add(F v) { return v; }
  static float reduce_max(F v) { return v; }
};
}  // namespace portable

#ifdef FA_X86

namespace avx2 {
FA_AVX2_BEGIN
struct Vec {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  FA_INLINE static F zero() { return _mm256_setzero_ps(); }
  FA_INLINE static F set1(float x) { return _mm256_set1_ps(x); }
  FA_INLINE static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  FA_INLINE static F load(const float* p) { return _mm256_loadu_ps(p); }
  FA_INLINE static F load_i8(const int8_t* p) {  // W int8 values, widened to float
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  FA_INLINE static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  FA_INLINE static F add(F a, F b) { return _mm256_add_ps(a, b); }
  FA_INLINE static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  FA_INLINE static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  FA_INLINE static F max(F a, F b) { return _mm256_max_ps(a, b); }
  FA_INLINE static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  FA_INLINE static float reduce_max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  FA_INLINE static F to_float(I a) { return _mm256_cvtepi32_ps(a); }

  FA_INLINE static I zeroi() { return _mm256_setzero_si256(); }
  FA_INLINE static I set1i(uint32_t x) { return _mm256_set1_epi32(int(x)); }
  FA_INLINE static I lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  FA_INLINE static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  FA_INLINE static I xori(I a, I b) { return _mm256_xor_si256(a, b); }
  FA_INLINE static I mul_epu32(I a, I b) { return _mm256_mul_epu32(a, b); }  // even lanes, 32 x 32 -> 64 bits
  template <int N> FA_INLINE static I srli64(I a) { return _mm256_srli_epi64(a, N); }
  template <int N> FA_INLINE static I slli64(I a) { return _mm256_slli_epi64(a, N); }
  template <int N> FA_INLINE static I srai32(I a) { return _mm256_srai_epi32(a, N); }
  FA_INLINE static I blend_odd(I a, I b) { return _mm256_blend_epi32(a, b, 0xAA); }  // odd lanes from b
  FA_INLINE static I ge01(F u, F p) {  // 1 where u >= p, else 0, per 32-bit lane
    return _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(u, p, _CMP_GE_OQ)), 31);
  }
  template <int N> FA_INLINE static I slli32(I a) { return _mm256_slli_epi32(a, N); }
  FA_INLINE static I ori(I a, I b) { return _mm256_or_si256(a, b); }
  FA_INLINE static void storei(void* p, I a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
};
FA_TARGET_END
}  // namespace avx2

namespace avx512 {
FA_AVX512_BEGIN
struct Vec {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  FA_INLINE static F zero() { return _mm512_setzero_ps(); }
  FA_INLINE static F set1(float x) { return _mm512_set1_ps(x); }
  FA_INLINE static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  FA_INLINE static F load(const float* p) { return _mm512_loadu_ps(p); }
  FA_INLINE static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  FA_INLINE static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  FA_INLINE static F add(F a, F b) { return _mm512_add_ps(a, b); }
  FA_INLINE static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  FA_INLINE static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  FA_INLINE static F max(F a, F b) { return _mm512_max_ps(a, b); }
  FA_INLINE static __m256 high_half(F v) { return _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xEE)); }
  FA_INLINE static float reduce_add(F v) {
    return avx2::Vec::reduce_add(_mm256_add_ps(_mm512_castps512_ps256(v), high_half(v)));
  }
  FA_INLINE static float reduce_max(F v) {
    return avx2::Vec::reduce_max(_mm256_max_ps(_mm512_castps512_ps256(v), high_half(v)));
  }
  FA_INLINE static F to_float(I a) { return _mm512_cvtepi32_ps(a); }

  FA_INLINE static I zeroi() { return _mm512_setzero_si512(); }
  FA_INLINE static I set1i(uint32_t x) { return _mm512_set1_epi32(int(x)); }
  FA_INLINE static I lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  FA_INLINE static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  FA_INLINE static I xori(I a, I b) { return _mm512_xor_si512(a, b); }
  FA_INLINE static I mul_epu32(I a, I b) { return _mm512_mul_epu32(a, b); }
  template <int N> FA_INLINE static I srli64(I a) { return _mm512_srli_epi64(a, N); }
  template <int N> FA_INLINE static I slli64(I a) { return _mm512_slli_epi64(a, N); }
  template <int N> FA_INLINE static I srai32(I a) { return _mm512_srai_epi32(a, N); }
  FA_INLINE static I blend_odd(I a, I b) { return _mm512_mask_blend_epi32(0xAAAA, a, b); }
  FA_INLINE static I ge01(F u, F p) {
    return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(u, p, _CMP_GE_OQ), _mm512_set1_epi32(1));
  }
  template <int N> FA_INLINE static I slli32(I a) { return _mm512_slli_epi32(a, N); }
  FA_INLINE static I ori(I a, I b) { return _mm512_or_si512(a, b); }
  FA_INLINE static void storei(void* p, I a) { _mm512_storeu_si512(p, a); }
};
FA_TARGET_END
}  // namespace avx512
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
