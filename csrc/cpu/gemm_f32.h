// The matrix product of the attention kernels: C (M x N) {= alpha * A B | += A B | = C * rs[m] + A B} with
// A(m, k) = A[m * sam + k * sak] (sak == 1 or sam == 1) and B(k, n) = B[k * sbk + n], per ISA: gemm_portable
// (plain loops, any T), gemm_f32_avx2 and gemm_f32_avx512 (float32 register tiles; they need N % 8 == 0: every B operand
// is a padded buffer of ours).
#pragma once

#include "kernel_util.h"
#include "simd.h"

#include <cstdint>

namespace fastattn {
namespace cpu {
namespace {

enum GemmMode : int { kStore = 0, kAccum = 1, kRescale = 2 };

template <class T>
struct Gemm {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  int64_t sam = 0, sak = 1;
  const T* B = nullptr;
  int64_t sbk = 0;
  T* C = nullptr;
  int64_t scm = 0;
  int mode = kStore;
  T alpha = 1;
  const T* rs = nullptr;
};

template <class T>
FA_INLINE void gemm_portable(const Gemm<T>& g) {
  for (int64_t m = 0; m < g.M; ++m) {
    T* __restrict c = g.C + m * g.scm;
    if (g.mode == kStore) {
      for (int64_t n = 0; n < g.N; ++n) c[n] = 0;
    } else if (g.mode == kRescale) {
      const T r = g.rs[m];
      for (int64_t n = 0; n < g.N; ++n) c[n] *= r;
    }
    const T* a = g.A + m * g.sam;
    for (int64_t k = 0; k < g.K; ++k) {
      const T x = a[k * g.sak];
      const T* __restrict b = g.B + k * g.sbk;
      for (int64_t n = 0; n < g.N; ++n) c[n] += x * b[n];
    }
    if (g.mode == kStore && g.alpha != T(1))
      for (int64_t n = 0; n < g.N; ++n) c[n] *= g.alpha;
  }
}

#ifdef FA_X86
// Register tile: MR rows x (8 * NV) columns, accumulated over K in MR * NV ymm registers.
template <int MR, int NV, bool AT, int MODE>
FA_AVX2 inline void micro_f32(int64_t K, const float* A, int64_t sa, const float* B, int64_t sbk, float* C,
                              int64_t scm, float alpha, const float* rs) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm256_setzero_ps();
  if constexpr (AT) {  // A(m, k) = A[k * sa + m]
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      const float* ak = A + k * sa;
      __m256 b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(bk + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 x = _mm256_broadcast_ss(ak + r);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(x, b[v], c[r][v]);
      }
    }
  } else {  // A(m, k) = A[m * sa + k]
    const float* ar[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) ar[r] = A + r * sa;
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      __m256 b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(bk + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 x = _mm256_broadcast_ss(ar[r] + k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(x, b[v], c[r][v]);
      }
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * scm;
    const __m256 vr = MODE == kRescale ? _mm256_set1_ps(rs[r]) : va;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (MODE == kStore) {
        _mm256_storeu_ps(cr + 8 * v, _mm256_mul_ps(c[r][v], va));
      } else if constexpr (MODE == kAccum) {
        _mm256_storeu_ps(cr + 8 * v, _mm256_add_ps(_mm256_loadu_ps(cr + 8 * v), c[r][v]));
      } else {
        _mm256_storeu_ps(cr + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(cr + 8 * v), vr, c[r][v]));
      }
    }
  }
}

template <int NV, bool AT, int MODE>
FA_AVX2 inline void gemm_cols_f32(const Gemm<float>& g, int64_t n) {
  const int64_t sa = AT ? g.sak : g.sam, ma = AT ? 1 : g.sam;
  const float* B = g.B + n;
  float* C = g.C + n;
  int64_t m = 0;
  for (; m + 6 <= g.M; m += 6)
    micro_f32<6, NV, AT, MODE>(g.K, g.A + m * ma, sa, B, g.sbk, C + m * g.scm, g.scm, g.alpha, g.rs + (g.rs ? m : 0));
  const float* A = g.A + m * ma;
  const float* rs = g.rs ? g.rs + m : nullptr;
  C += m * g.scm;
  switch (g.M - m) {
    case 5: micro_f32<5, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 4: micro_f32<4, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 3: micro_f32<3, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 2: micro_f32<2, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 1: micro_f32<1, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    default: break;
  }
}

template <bool AT, int MODE>
FA_AVX2 void gemm_f32_avx2(const Gemm<float>& g) {
  int64_t n = 0;
  for (; n + 16 <= g.N; n += 16) gemm_cols_f32<2, AT, MODE>(g, n);
  if (n < g.N) gemm_cols_f32<1, AT, MODE>(g, n);  // N % 8 == 0
}

template <int MR, int NV, bool AT, int MODE>
FA_AVX512 inline void micro_f32_512(int64_t K, const float* A, int64_t sa, const float* B, int64_t sbk, float* C,
                                    int64_t scm, float alpha, const float* rs) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  if constexpr (AT) {  // A(m, k) = A[k * sa + m]
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      const float* ak = A + k * sa;
      __m512 b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 x = _mm512_set1_ps(ak[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(x, b[v], c[r][v]);
      }
    }
  } else {  // A(m, k) = A[m * sa + k]
    const float* ar[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) ar[r] = A + r * sa;
    for (int64_t k = 0; k < K; ++k) {
      const float* bk = B + k * sbk;
      __m512 b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 x = _mm512_set1_ps(ar[r][k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(x, b[v], c[r][v]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * scm;
    const __m512 vr = MODE == kRescale ? _mm512_set1_ps(rs[r]) : va;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (MODE == kStore) {
        _mm512_storeu_ps(cr + 16 * v, _mm512_mul_ps(c[r][v], va));
      } else if constexpr (MODE == kAccum) {
        _mm512_storeu_ps(cr + 16 * v, _mm512_add_ps(_mm512_loadu_ps(cr + 16 * v), c[r][v]));
      } else {
        _mm512_storeu_ps(cr + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(cr + 16 * v), vr, c[r][v]));
      }
    }
  }
}

template <int NV, bool AT, int MODE>
FA_AVX512 inline void gemm_cols_f32_512(const Gemm<float>& g, int64_t n) {
  const int64_t sa = AT ? g.sak : g.sam, ma = AT ? 1 : g.sam;
  const float* B = g.B + n;
  float* C = g.C + n;
  int64_t m = 0;
  for (; m + 6 <= g.M; m += 6)
    micro_f32_512<6, NV, AT, MODE>(g.K, g.A + m * ma, sa, B, g.sbk, C + m * g.scm, g.scm, g.alpha,
                                   g.rs + (g.rs ? m : 0));
  const float* A = g.A + m * ma;
  const float* rs = g.rs ? g.rs + m : nullptr;
  C += m * g.scm;
  switch (g.M - m) {
    case 5: micro_f32_512<5, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 4: micro_f32_512<4, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 3: micro_f32_512<3, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 2: micro_f32_512<2, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    case 1: micro_f32_512<1, NV, AT, MODE>(g.K, A, sa, B, g.sbk, C, g.scm, g.alpha, rs); break;
    default: break;
  }
}

template <bool AT, int MODE>
FA_AVX512 void gemm_f32_avx512(const Gemm<float>& g) {
  int64_t n = 0;
  for (; n + 32 <= g.N; n += 32) gemm_cols_f32_512<2, AT, MODE>(g, n);
  if (n + 16 <= g.N) {
    gemm_cols_f32_512<1, AT, MODE>(g, n);
    n += 16;
  }
  if (n < g.N) gemm_cols_f32<1, AT, MODE>(g, n);  // the last 8 columns (N % 8 == 0)
}
#endif  // FA_X86

}  // namespace
}  // namespace cpu
}  // namespace fastattn
