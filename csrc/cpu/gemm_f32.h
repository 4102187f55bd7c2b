// The matrix product of the attention kernels: C (M x N) {= alpha * A B | += A B | = C * rs[m] + A B} with
// A(m, k) = A[m * sam + k * sak] (sak == 1 or sam == 1) and B(k, n) = B[k * sbk + n], per ISA: gemm_portable
// (plain loops, any T), avx2::gemm and avx512::gemm (float32 register tiles; they need N % 8 == 0: every B operand
// is a padded buffer of ours).
#pragma once

#include "kernel_util.h"
#include "simd.h"
#include "vec_traits.h"

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

// Register tiles of 6 rows x 2 or 1 vectors: 16 / 8 columns (AVX2/FMA); x 4, 2 or 1: 64 / 32 / 16 (AVX-512F).
#define FA_ISA_INCLUDE "gemm_f32_tiles-inl.h"
#include "foreach_isa.h"

}  // namespace
}  // namespace cpu
}  // namespace fastattn
