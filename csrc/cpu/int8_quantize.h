// Row-wise symmetric int8 quantization of the CPU int8 ops: the scalar steps, the portable row and the AVX2 row
// (quantize_row_avx2), the same float32 operations either way.
#pragma once

#include "float_bits.h"
#include "int8_kernel.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastattn {
namespace cpu {
namespace {

// The scalar steps of every quantization path (the portable rows, the AVX2 tails): the same float32 operations.
// Pass 1, one element: v / smooth[k] into buf, running absmax and NaN flag.
inline void absmax_step(float v, const float* smooth, int64_t k, float* buf, float& amax, bool& nan) {
  if (smooth) v = v / smooth[k];
  buf[k] = v;
  const float a = std::fabs(v);
  nan |= a != a;
  amax = a > amax ? a : amax;
}
inline float row_scale(float amax, bool nan) { return nan ? std::nanf("") : amax / 127.0f; }
// Pass 2, one element: round half to even (the default rounding mode), clamp to [-127, 127], NaN -> 0.
inline int8_t quantize_step(float v, float inv) {
  const float r = std::nearbyint(v * inv);
  return int8_t(r != r ? 0.f : std::min(127.f, std::max(-127.f, r)));
}

// Portable quantization of one row (xf in buf).
template <class LoadF>
void quantize_row_portable(LoadF load, const float* smooth, int64_t K, float* buf, int8_t* q, float* scale) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) absmax_step(load(k), smooth, k, buf, amax, nan);
  const float s = row_scale(amax, nan);
  const float inv = s > 0.f ? 1.0f / s : 0.f;
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_step(buf[k], inv);
  *scale = s;
}

#ifdef FA_X86
// ---------------------------------------------------------------------------------------------------------------
// AVX2 quantization.
FA_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
FA_AVX2 inline __m256 load8(const uint16_t* x, Int8InType t) {
  const __m128i h = _mm_loadu_si128((const __m128i*)x);
  if (t == Int8InType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FA_AVX2 void quantize_row_avx2(const void* xrow, Int8InType t, const float* smooth, int64_t K, float* buf, int8_t* q,
                               float* scale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 mx = _mm256_setzero_ps(), unord = _mm256_setzero_ps();
  const int64_t K8 = (K / 8) * 8;
  auto step = [&](int64_t k, __m256 v) FA_AVX2 {
    if (smooth) v = _mm256_div_ps(v, _mm256_loadu_ps(smooth + k));
    _mm256_storeu_ps(buf + k, v);
    const __m256 a = _mm256_and_ps(v, absmask);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, a);
  };
  if (t == Int8InType::kFloat32) {
    const float* x = static_cast<const float*>(xrow);
    for (int64_t k = 0; k < K8; k += 8) step(k, load8(x + k));
  } else {
    const uint16_t* x = static_cast<const uint16_t*>(xrow);
    for (int64_t k = 0; k < K8; k += 8) step(k, load8(x + k, t));
  }
  float amax;
  {
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    amax = _mm_cvtss_f32(m4);
  }
  bool nan = _mm256_movemask_ps(unord) != 0;
  for (int64_t k = K8; k < K; ++k) {  // tail: the same float32 operations, one at a time
    float v;
    if (t == Int8InType::kFloat32) v = static_cast<const float*>(xrow)[k];
    else if (t == Int8InType::kFloat16) v = bits::half_to_float(static_cast<const uint16_t*>(xrow)[k]);
    else v = bits::bf16_to_float(static_cast<const uint16_t*>(xrow)[k]);
    absmax_step(v, smooth, k, buf, amax, nan);
  }
  const float s = row_scale(amax, nan);
  const float inv = s > 0.f ? 1.0f / s : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  auto quant = [&](int64_t k) FA_AVX2 {  // 8 int32 in [-127, 127] (NaN -> 0)
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(buf + k), vinv);
    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    r = _mm256_and_ps(r, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
    return _mm256_cvtps_epi32(r);
  };
  int64_t k = 0;
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; k + 32 <= K8; k += 32) {
    const __m256i p01 = _mm256_packs_epi32(quant(k), quant(k + 8));
    const __m256i p23 = _mm256_packs_epi32(quant(k + 16), quant(k + 24));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
    _mm256_storeu_si256((__m256i*)(q + k), b);
  }
  for (; k < K; ++k) q[k] = quantize_step(buf[k], inv);
  *scale = s;
}
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
