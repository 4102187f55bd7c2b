// The attention's kernel sets, one per ISA, chosen once at run time: Portable<T> (plain loops; also the float64
// path), Avx2 (AVX2/FMA register tiles of 6 rows x 16 or 8 columns, 8-lane exp / tanh / Philox) and Avx512
// (AVX-512F register tiles of 6 rows x 32 or 16 columns and 16-lane exp, max, sum and Philox; the rest is Avx2's).
// Each has the same static members: gemm, pack_t, the row passes of the softmax and its backward (row_max,
// exp2_sum, exp2_sub, softcap_row, ds_row, row_dot), dot_scores and the dropout rows (keep_row, dropout_fwd_row,
// dropout_bwd_row). Also the tile sizes they share with the schedule (attention_kernel.cpp) and the packing helpers.
#pragma once

#include "float_bits.h"
#include "gemm_f32.h"
#include "kernel_util.h"
#include "philox.h"
#include "simd.h"
#include "vec_math.h"
#include "vec_traits.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace {

constexpr int kBM = 64;   // queries per block
constexpr int kBN = 128;  // keys per block
constexpr int kMR = 6;    // query rows per stripe (the rows of the register tiles)

// ---------------------------------------------------------------------------------------------------------------
// Element-wise row operations shared by both paths (inlined into the AVX2 wrappers, where they vectorise).
template <class T>
FA_INLINE void ds_row_impl(T* __restrict dp, const T* __restrict p, const T* __restrict t, int64_t n, T delta) {
  if (t) {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * (T(1) - t[j] * t[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
  }
}

// Dropout in the backward: pd = P * keep * ks, dp = dP * keep * ks.
template <class T>
FA_INLINE void dropout_bwd_row_impl(const T* __restrict p, T* __restrict pd, T* __restrict dp,
                                    const uint8_t* __restrict keep, int64_t n, T ks) {
  for (int64_t j = 0; j < n; ++j) {
    const T s = keep[j] ? ks : T(0);
    pd[j] = p[j] * s;
    dp[j] = dp[j] * s;
  }
}

template <class T>
FA_INLINE void dropout_fwd_row_impl(T* __restrict p, const uint8_t* __restrict keep, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = keep[j] ? p[j] : T(0);
}

// ---------------------------------------------------------------------------------------------------------------
// Packing: inputs (storage type In, strided rows) -> compute-type buffers.
template <class In, class T>
void pack_rows(const In* src, int64_t sstride, int64_t rows, int64_t cols, T* dst, int64_t dstride) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* s = src + r * sstride;
    T* d = dst + r * dstride;
    for (int64_t c = 0; c < cols; ++c) d[c] = T(to_acc(s[c]));
    for (int64_t c = cols; c < dstride; ++c) d[c] = 0;
  }
}

// dst (cols x kBN): dst[c * kBN + r] = src[r][c] for r < rows, 0 for rows <= r < kBN
template <class In, class T>
void pack_transposed(const In* src, int64_t sstride, int64_t rows, int64_t cols, T* dst) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < kBN; ++r) dst[c * kBN + r] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const In* s = src + r * sstride;
    for (int64_t c = 0; c < cols; ++c) dst[c * kBN + r] = T(to_acc(s[c]));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Portable path (plain loops; also the float64 path).
template <class T>
struct Portable {
  static void gemm(const Gemm<T>& g) { gemm_portable(g); }
  template <class In>
  static void pack_t(const In* src, int64_t sstride, int64_t rows, int64_t cols, T* dst) {
    pack_transposed(src, sstride, rows, cols, dst);
  }
  static T row_max(const T* x, int64_t n) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  static T row_dot(const T* a, const T* b, int64_t n) {
    T s = 0;
    for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
    return s;
  }
  static T exp2_sum(T* x, int64_t n, T m, bool) {  // x = 2^(x - m); returns the sum
    T s = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[j] = std::exp2(x[j] - m);
      s += x[j];
    }
    return s;
  }
  static void exp2_sub(T* x, int64_t n, T m, bool) {  // x = 2^(x - m); m = +inf gives 0
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp2(x[j] - m);
  }
  static void softcap_row(T* x, T* t, int64_t n, T c) {  // t = tanh(x), x = c * t
    for (int64_t j = 0; j < n; ++j) {
      const T th = std::tanh(x[j]);
      if (t) t[j] = th;
      x[j] = c * th;
    }
  }
  static void ds_row(T* dp, const T* p, const T* t, int64_t n, T delta) { ds_row_impl(dp, p, t, n, delta); }
  // s[r * ss + j] = alpha * (q_r . k_j) for r < mr, j < n; 0 for n <= j < round_up(n, 8)
  static void dot_scores(const T* q, int64_t sq, int64_t mr, const T* k, int64_t sk, int64_t n, int64_t E, T alpha,
                         T* s, int64_t ss) {
    for (int64_t r = 0; r < mr; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        T acc = 0;
        for (int64_t e = 0; e < E; ++e) acc += q[r * sq + e] * k[j * sk + e];
        s[r * ss + j] = alpha * acc;
      }
      for (int64_t j = n; j < round_up(n, 8); ++j) s[r * ss + j] = 0;
    }
  }
  static void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
    keep_row_scalar(seed, ctr, n, p, keep);
  }
  static void dropout_bwd_row(const T* p, T* pd, T* dp, const uint8_t* keep, int64_t n, T ks) {
    dropout_bwd_row_impl(p, pd, dp, keep, n, ks);
  }
  static void dropout_fwd_row(T* p, const uint8_t* keep, int64_t n) { dropout_fwd_row_impl(p, keep, n); }
};

// ---------------------------------------------------------------------------------------------------------------
#ifdef FA_X86
// AVX2/FMA path (float32 compute).
struct Avx2 {
  FA_AVX2 static void gemm(const Gemm<float>& g) { avx2::gemm(g); }
  // pack_transposed, by 8 x 8 register transposes for float32 inputs
  template <class In>
  FA_AVX2 static void pack_t(const In* src, int64_t sstride, int64_t rows, int64_t cols, float* dst) {
    if constexpr (!std::is_same_v<In, float>) {
      pack_transposed(src, sstride, rows, cols, dst);
    } else {
      const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
      for (int64_t r = 0; r < r8; r += 8)
        for (int64_t c = 0; c < c8; c += 8) {
          const float* sp = src + r * sstride + c;
          __m256 x[8];
          for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(sp + i * sstride);
          const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
          const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
          const __m256 t4 = _mm256_unpacklo_ps(x[4], x[5]), t5 = _mm256_unpackhi_ps(x[4], x[5]);
          const __m256 t6 = _mm256_unpacklo_ps(x[6], x[7]), t7 = _mm256_unpackhi_ps(x[6], x[7]);
          const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
          const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
          const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
          const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
          float* dp = dst + c * kBN + r;
          _mm256_storeu_ps(dp + 0 * kBN, _mm256_permute2f128_ps(u0, u4, 0x20));
          _mm256_storeu_ps(dp + 1 * kBN, _mm256_permute2f128_ps(u1, u5, 0x20));
          _mm256_storeu_ps(dp + 2 * kBN, _mm256_permute2f128_ps(u2, u6, 0x20));
          _mm256_storeu_ps(dp + 3 * kBN, _mm256_permute2f128_ps(u3, u7, 0x20));
          _mm256_storeu_ps(dp + 4 * kBN, _mm256_permute2f128_ps(u0, u4, 0x31));
          _mm256_storeu_ps(dp + 5 * kBN, _mm256_permute2f128_ps(u1, u5, 0x31));
          _mm256_storeu_ps(dp + 6 * kBN, _mm256_permute2f128_ps(u2, u6, 0x31));
          _mm256_storeu_ps(dp + 7 * kBN, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
      for (int64_t r = 0; r < rows; ++r)  // the columns past c8 (all rows), the rows past r8 (first c8 columns)
        for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * kBN + r] = src[r * sstride + c];
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = rows; r < kBN; ++r) dst[c * kBN + r] = 0;
    }
  }
  FA_AVX2 static float row_max(const float* x, int64_t n) { return avx2::row_max(x, n); }
  FA_AVX2 static float row_dot(const float* a, const float* b, int64_t n) { return avx2::row_dot(a, b, n); }
  FA_AVX2 static float exp2_sum(float* x, int64_t n, float m, bool exact) {
    return exact ? exp2_sum_impl<true>(x, n, m) : exp2_sum_impl<false>(x, n, m);
  }
  template <bool EXACT>
  FA_AVX2 static float exp2_sum_impl(float* x, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp2_ps<EXACT>(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
      _mm256_storeu_ps(x + j, e);
      s = _mm256_add_ps(s, e);
    }
    float r = avx2::Vec::reduce_add(s);
    for (; j < n; ++j) {
      x[j] = std::exp2(x[j] - m);
      r += x[j];
    }
    return r;
  }
  FA_AVX2 static void exp2_sub(float* x, int64_t n, float m, bool exact) {
    if (exact) return exp2_sub_impl<true>(x, n, m);
    exp2_sub_impl<false>(x, n, m);
  }
  template <bool EXACT>
  FA_AVX2 static void exp2_sub_impl(float* x, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp2_ps<EXACT>(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
    for (; j < n; ++j) x[j] = std::exp2(x[j] - m);
  }
  FA_AVX2 static void softcap_row(float* x, float* t, int64_t n, float c) {
    const __m256 vc = _mm256_set1_ps(c);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 th = tanh_ps(_mm256_loadu_ps(x + j));
      if (t) _mm256_storeu_ps(t + j, th);
      _mm256_storeu_ps(x + j, _mm256_mul_ps(vc, th));
    }
    for (; j < n; ++j) {
      const float th = std::tanh(x[j]);
      if (t) t[j] = th;
      x[j] = c * th;
    }
  }
  FA_AVX2 static void ds_row(float* dp, const float* p, const float* t, int64_t n, float delta) {
    ds_row_impl(dp, p, t, n, delta);
  }
  // s[r * ss + j] = alpha * (q_r . k_j) for r < mr, j < n; 0 for n <= j < round_up(n, 8). 8 keys at a time.
  FA_AVX2 static void dot_scores(const float* q, int64_t sq, int64_t mr, const float* k, int64_t sk, int64_t n,
                                 int64_t E, float alpha, float* s, int64_t ss) {
    const int64_t E8 = E / 8 * 8;
    alignas(32) int32_t tail_bits[8];
    for (int i = 0; i < 8; ++i) tail_bits[i] = i < E - E8 ? -1 : 0;
    const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail_bits));
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t r = 0; r < mr; ++r) {
      const float* qr = q + r * sq;
      float* sr = s + r * ss;
      int64_t j = 0;
      for (; j < n; j += 8) {
        const int64_t nk = std::min<int64_t>(8, n - j);
        const float* kr[8];
        for (int i = 0; i < 8; ++i) kr[i] = k + (j + (i < nk ? i : 0)) * sk;  // past n: a valid row, result dropped
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t e = 0; e < E8; e += 8) {
          const __m256 qv = _mm256_loadu_ps(qr + e);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[i] + e), a[i]);
        }
        if (E8 < E) {
          const __m256 qv = _mm256_maskload_ps(qr + E8, tail);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(kr[i] + E8, tail), a[i]);
        }
        const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        __m256 d = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
        d = _mm256_mul_ps(d, va);
        if (nk < 8) {  // zero the lanes past n
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, d);
          for (int i = 0; i < 8; ++i) sr[j + i] = i < nk ? tmp[i] : 0.0f;
        } else {
          _mm256_storeu_ps(sr + j, d);
        }
      }
    }
  }
  FA_AVX2 static void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
    avx2::keep_row(seed, ctr, n, p, keep);
  }
  FA_AVX2 static void dropout_bwd_row(const float* p, float* pd, float* dp, const uint8_t* keep, int64_t n,
                                      float ks) {
    dropout_bwd_row_impl(p, pd, dp, keep, n, ks);
  }
  FA_AVX2 static void dropout_fwd_row(float* p, const uint8_t* keep, int64_t n) { dropout_fwd_row_impl(p, keep, n); }
};

// ---------------------------------------------------------------------------------------------------------------
// AVX-512F path (float32 compute): the register tiles, Philox and the exp / max / sum row passes on 16 lanes;
// everything else is the AVX2 path's.
struct Avx512 : Avx2 {
  FA_AVX512 static void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
    avx512::keep_row(seed, ctr, n, p, keep);
  }
  FA_AVX512 static void gemm(const Gemm<float>& g) { avx512::gemm(g); }
  FA_AVX512 static float row_max(const float* x, int64_t n) { return avx512::row_max(x, n); }
  FA_AVX512 static float row_dot(const float* a, const float* b, int64_t n) { return avx512::row_dot(a, b, n); }
  FA_AVX512 static float exp2_sum(float* x, int64_t n, float m, bool) {
    const __m512 vm = _mm512_set1_ps(m);
    __m512 s = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 e = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm));
      _mm512_storeu_ps(x + j, e);
      s = _mm512_add_ps(s, e);
    }
    if (j < n) {  // masked tail
      const __mmask16 k = __mmask16((1u << (n - j)) - 1);
      const __m512 e = exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vm));
      _mm512_mask_storeu_ps(x + j, k, e);
      s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, e));
    }
    return avx512::Vec::reduce_add(s);
  }
  FA_AVX512 static void exp2_sub(float* x, int64_t n, float m, bool) {
    const __m512 vm = _mm512_set1_ps(m);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, exp2_512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm)));
    if (j < n) {
      const __mmask16 k = __mmask16((1u << (n - j)) - 1);
      _mm512_mask_storeu_ps(x + j, k, exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vm)));
    }
  }
};
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
