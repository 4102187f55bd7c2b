// Vector math of the attention kernels: 2^x and tanh on 8 lanes (AVX2/FMA), 2^x on 16 lanes (AVX-512F), and the
// maximum and the dot product of rows at both widths.
#pragma once

#include "simd.h"
#include "vec_traits.h"

#include <cstdint>
#include <limits>

#ifdef FA_X86
namespace fastattn {
namespace cpu {
namespace {

// 2^f for f in [-0.5, 0.5] to about 1 ulp: the polynomial's coefficients, highest degree first (Horner).
constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

// 2^x to about 1 ulp for x <= 127; NaN stays NaN. EXACT: 0 for x < -125 (and -inf); else 2^-125 there (for tiles
// without masked entries, where that is below every rounding step of the sums).
template <bool EXACT = true>
FA_AVX2 inline __m256 exp2_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-125.0f), magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  __m256 xc = _mm256_max_ps(lo, x);  // the second operand is returned for NaN: NaN propagates
  if constexpr (EXACT) xc = _mm256_min_ps(_mm256_set1_ps(127.0f), xc);
  const __m256 t = _mm256_add_ps(xc, magic);  // round to nearest: the low mantissa bits of t hold n
  const __m256 f = _mm256_sub_ps(xc, _mm256_sub_ps(t, magic));  // [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);  // n << 23
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  if constexpr (EXACT) return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), r);
  return r;
}

// tanh to about 1.5 ulp: odd polynomial below 0.625, 1 - 2 / (e^{2|x|} + 1) above.
FA_AVX2 inline __m256 tanh_ps(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp2_ps(_mm256_min_ps(_mm256_mul_ps(ax, _mm256_set1_ps(2.0f * 1.44269504088896341f)),
                                         _mm256_set1_ps(64.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  const __m256 use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm256_blendv_ps(big, small, use_small);
}

// 2^x to about 1 ulp; 0 for x < -125 (and -inf), as exp2_ps<true>; NaN stays NaN. Those lanes are zeroed by the
// mask, never computed: a scalef that underflows (every masked score of a causal tile) costs a microcode assist of
// ~100 cycles on Intel cores without flush-to-zero, which made causal attention at L <= 128 slower than full.
FA_AVX512 inline __m512 exp2_512(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  // NaN (second operand) propagates
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);  // x >= -125 or NaN
  return _mm512_maskz_scalef_ps(normal, p, n);  // p * 2^n (overflow to inf)
}

#define FA_ISA_INCLUDE "vec_math-inl.h"  // avx2::row_max, avx512::row_max
#include "foreach_isa.h"

}  // namespace
}  // namespace cpu
}  // namespace fastattn
#endif  // FA_X86
