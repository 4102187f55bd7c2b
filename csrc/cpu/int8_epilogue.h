// The epilogue of the CPU int8 matmul (int32 accumulator -> float32 * a_scale * b_scale + bias -> output dtype) in
// the reference's float32 order: store_scalar (one element) and EpiCols / epi_store (8 columns on AVX2).
#pragma once

#include "float_bits.h"
#include "int8_kernel.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastattn {
namespace cpu {
namespace {

// A compiler barrier that keeps c * s and c + bias separate float32 operations (no FMA contraction, so the epilogue
// rounds exactly like the reference); conversions round to nearest even like torch (float_bits.h).
inline float opaque(float v) {
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}

// The scalar epilogue of one accumulator (also the AVX2 path's reference semantics).
inline void store_scalar(const Int8MatmulParams& p, int64_t m, int64_t n, int32_t acc) {
  const int64_t o = m * p.N + n;
  if (p.out_type == Int8OutType::kInt32) {
    static_cast<int32_t*>(p.out)[o] = acc;
    return;
  }
  float c = float(acc);
  if (p.a_scale) c = opaque(c * p.a_scale[m]);
  if (p.b_scale) c = opaque(c * p.b_scale[n]);
  if (p.bias) c = opaque(c + p.bias[n]);
  switch (p.out_type) {
    case Int8OutType::kFloat32: static_cast<float*>(p.out)[o] = c; break;
    case Int8OutType::kFloat16: static_cast<uint16_t*>(p.out)[o] = bits::float_to_half(c); break;
    case Int8OutType::kBFloat16: static_cast<uint16_t*>(p.out)[o] = bits::float_to_bf16(c); break;
    default: break;
  }
}

#ifdef FA_X86
// ---------------------------------------------------------------------------------------------------------------
// AVX2 epilogue.
FA_AVX2 inline __m256 opaque(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

FA_AVX2 inline __m256i mask_first(int64_t n) {  // lanes < n all ones (n in [0, 8])
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// bf16 bits (round-to-nearest-even, NaN -> 0x7FC0) in the low halves of the 32-bit lanes.
FA_AVX2 inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i ord = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0x7FC0), r, ord);
}

// The epilogue of an 8-column slice: per-column factors loaded once per panel, applied per row.
struct EpiCols {
  __m256 bs, bias;  // b_scale and bias of the 8 columns (when present)
  __m256i mask;     // valid columns
  int64_t n, cnt;   // first column, number of valid columns (<= 0: none)
};

FA_AVX2 inline EpiCols epi_cols(const Int8MatmulParams& p, int64_t n) {
  EpiCols e;
  e.n = n;
  e.cnt = std::min<int64_t>(8, p.N - n);
  e.mask = mask_first(std::max<int64_t>(0, e.cnt));
  e.bs = e.bias = _mm256_setzero_ps();
  if (e.cnt > 0 && p.out_type != Int8OutType::kInt32) {
    if (p.b_scale) e.bs = _mm256_maskload_ps(p.b_scale + n, e.mask);
    if (p.bias) e.bias = _mm256_maskload_ps(p.bias + n, e.mask);
  }
  return e;
}

FA_AVX2 inline void epi_store(const Int8MatmulParams& p, const EpiCols& e, int64_t m, __m256i acc) {
  if (e.cnt <= 0) return;
  const int64_t o = m * p.N + e.n;
  const bool full = e.cnt == 8;
  if (p.out_type == Int8OutType::kInt32) {
    int32_t* dst = static_cast<int32_t*>(p.out) + o;
    if (full) _mm256_storeu_si256((__m256i*)dst, acc);
    else _mm256_maskstore_epi32((int*)dst, e.mask, acc);
    return;
  }
  __m256 c = _mm256_cvtepi32_ps(acc);
  if (p.a_scale) c = opaque(_mm256_mul_ps(c, _mm256_set1_ps(p.a_scale[m])));
  if (p.b_scale) c = opaque(_mm256_mul_ps(c, e.bs));
  if (p.bias) c = opaque(_mm256_add_ps(c, e.bias));
  if (p.out_type == Int8OutType::kFloat32) {
    float* dst = static_cast<float*>(p.out) + o;
    if (full) _mm256_storeu_ps(dst, c);
    else _mm256_maskstore_ps(dst, e.mask, c);
    return;
  }
  __m128i h;
  if (p.out_type == Int8OutType::kFloat16) {
    h = _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i b = bf16_bits(c);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08));
  }
  uint16_t* dst = static_cast<uint16_t*>(p.out) + o;
  if (full) {
    _mm_storeu_si128((__m128i*)dst, h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128((__m128i*)tmp, h);
    std::memcpy(dst, tmp, size_t(e.cnt) * 2);
  }
}
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
