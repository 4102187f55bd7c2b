// The AVX2 int8 matmul (no VNNI): int16 panels and a 6 x 16 vpmaddwd micro-kernel (matmul_avx2_packed), the
// small-M path without packing (matmul_avx2_small_m), and prefetch_out (also used by the VNNI micro-kernels).
#pragma once

#include "int8_epilogue.h"
#include "int8_kernel.h"
#include "int8_schedule.h"
#include "kernel_util.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>

#ifdef FA_X86
namespace fastattn {
namespace cpu {
namespace {

constexpr int kMR = 6;                   // micro-kernel rows (A)
constexpr int kNR = 16;                  // micro-kernel columns (B panel width)
constexpr int64_t kMC = 16 * kMR;        // rows per work item

// Aw row m = int16(a row m), zero-padded to Kp.
FA_AVX2 void widen_row(const int8_t* a, int64_t K, int64_t Kp, int16_t* w) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm256_storeu_si256((__m256i*)(w + k), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + k))));
  for (; k < K; ++k) w[k] = a[k];
  for (; k < Kp; ++k) w[k] = 0;
}

// In-place 8 x 8 transpose of 32-bit words: afterwards r[q] word i = (before) r[i] word q.
FA_AVX2 inline void transpose8x8_epi32(__m256i* r) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Packs the 16-column panel starting at column n0 (int8_kernel.cpp's header comment); kp = Kp / 2 k-pairs.
FA_AVX2 void pack_panel(const int8_t* b, int64_t N, int64_t K, int64_t kp, int64_t n0, int16_t* dst) {
  const int64_t K16 = (K / 16) * 16;
  for (int half = 0; half < 2; ++half) {
    const int64_t c0 = n0 + 8 * half;
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(8, N - c0));
    const int8_t* rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = i < valid ? b + (c0 + i) * K : nullptr;
    int16_t* out = dst + 16 * half;
    for (int64_t k0 = 0; k0 < K16; k0 += 16) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = rows[i] ? _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(rows[i] + k0))) : _mm256_setzero_si256();
      // 8 x 8 transpose of 32-bit words (k-pairs): r[i] word q = pair k0/2 + q of column c0 + i.
      transpose8x8_epi32(r);
      int16_t* o = out + (k0 / 2) * 32;
      for (int q = 0; q < 8; ++q) _mm256_store_si256((__m256i*)(o + q * 32), r[q]);
    }
    for (int64_t k = K16; k < 2 * kp; ++k)  // K tail and the zero pad of an odd K
      for (int i = 0; i < 8; ++i) out[(k / 2) * 32 + 2 * i + (k & 1)] = (rows[i] && k < K) ? rows[i][k] : 0;
  }
}

// Asks for the cache lines of the output block rows m0 .. m0 + rows - 1, columns n0 .. n0 + cols - 1 in writable state,
// ahead of a micro-kernel's epilogue (call it before the K loop). Each epilogue writes a few lines in each of its rows,
// so the hardware prefetchers do not see them coming and every store would wait for its line to be read first (slow
// when other tenants of the host use the L3). Unlike non-temporal stores, this leaves the output in cache for the next
// op. always_inline: GCC deems a function of prefetches alone free of side effects and deletes calls to it; inlined,
// they are prefetchw where the caller's target has prfchw (the VNNI micro-kernel), else prefetcht0 (the AVX2 one:
// PREFETCHW is not an AVX2-era given).
__attribute__((always_inline)) inline void prefetch_out(const Int8MatmulParams& p, int64_t m0, int rows, int64_t n0,
                                                        int64_t cols) {
  if (cols <= 0) return;
  const int64_t es = p.out_type == Int8OutType::kFloat16 || p.out_type == Int8OutType::kBFloat16 ? 2 : 4;
  const int64_t bytes = cols * es;
  const char* o = static_cast<const char*>(p.out) + (m0 * p.N + n0) * es;
  for (int r = 0; r < rows; ++r, o += p.N * es) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(o + b, 1, 3);
    __builtin_prefetch(o + bytes - 1, 1, 3);  // the last line when the block does not start on a line
  }
}

// MR x 16 micro-kernel over all kp k-pairs, then the epilogue of rows m0 .. m0+MR-1. Twelve named accumulators
// (plus two B vectors and one broadcast: 15 of the 16 ymm registers), so nothing spills in the loop.
template <int MR>
FA_AVX2 void micro(const Int8MatmulParams& p, const int16_t* A, int64_t lda, const int16_t* B, int64_t kp,
                   int64_t m0, const EpiCols& e0, const EpiCols& e1) {
  prefetch_out(p, m0, MR, e0.n, std::min<int64_t>(kNR, p.N - e0.n));
  const __m256i z = _mm256_setzero_si256();
  __m256i c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  const int32_t* a0 = reinterpret_cast<const int32_t*>(A);  // int16 pairs (4-byte aligned: lda is even)
  const int64_t ld = lda / 2;
  const __m256i* b = reinterpret_cast<const __m256i*>(B);
#define FA_ROW(r, ca, cb)                                                \
  if constexpr (MR > r) {                                                \
    const __m256i a = _mm256_set1_epi32(a0[r * ld + q]);                 \
    ca = _mm256_add_epi32(ca, _mm256_madd_epi16(a, b0));                 \
    cb = _mm256_add_epi32(cb, _mm256_madd_epi16(a, b1));                 \
  }
  for (int64_t q = 0; q < kp; ++q) {
    const __m256i b0 = _mm256_load_si256(b + 2 * q), b1 = _mm256_load_si256(b + 2 * q + 1);
    FA_ROW(0, c00, c01)
    FA_ROW(1, c10, c11)
    FA_ROW(2, c20, c21)
    FA_ROW(3, c30, c31)
    FA_ROW(4, c40, c41)
    FA_ROW(5, c50, c51)
  }
#undef FA_ROW
  epi_store(p, e0, m0, c00);
  epi_store(p, e1, m0, c01);
  if constexpr (MR > 1) { epi_store(p, e0, m0 + 1, c10); epi_store(p, e1, m0 + 1, c11); }
  if constexpr (MR > 2) { epi_store(p, e0, m0 + 2, c20); epi_store(p, e1, m0 + 2, c21); }
  if constexpr (MR > 3) { epi_store(p, e0, m0 + 3, c30); epi_store(p, e1, m0 + 3, c31); }
  if constexpr (MR > 4) { epi_store(p, e0, m0 + 4, c40); epi_store(p, e1, m0 + 4, c41); }
  if constexpr (MR > 5) { epi_store(p, e0, m0 + 5, c50); epi_store(p, e1, m0 + 5, c51); }
}

FA_AVX2 void micro_rows(int rows, const Int8MatmulParams& p, const int16_t* A, int64_t lda, const int16_t* B,
                        int64_t kp, int64_t m0, const EpiCols& e0, const EpiCols& e1) {
  switch (rows) {
    case 6: return micro<6>(p, A, lda, B, kp, m0, e0, e1);
    case 5: return micro<5>(p, A, lda, B, kp, m0, e0, e1);
    case 4: return micro<4>(p, A, lda, B, kp, m0, e0, e1);
    case 3: return micro<3>(p, A, lda, B, kp, m0, e0, e1);
    case 2: return micro<2>(p, A, lda, B, kp, m0, e0, e1);
    default: return micro<1>(p, A, lda, B, kp, m0, e0, e1);
  }
}

FA_AVX2 void matmul_avx2_packed(const Int8MatmulParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t Kp = K + (K & 1), kp = Kp / 2;
  const int64_t PN = cdiv(N, kNR);
  const size_t panel = size_t(kp) * 32;  // int16 elements per packed panel
  const Scratch scratch({size_t(M * Kp) * 2, PN * panel * 2});
  int16_t* Aw = scratch.part<int16_t>(0);
  int16_t* Bp = scratch.part<int16_t>(1);
  run_packed(
      p, PN, panel * 2, kMC, [&](int64_t j) { pack_panel(p.b, N, K, kp, j * kNR, Bp + j * panel); },
      [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) widen_row(p.a + m * K, K, Kp, Aw + m * Kp);
      },
      [&](int64_t m_beg, int64_t m_end, int64_t j0, int64_t j1) FA_AVX2 {
        for (int64_t m0 = m_beg; m0 < m_end; m0 += kMR)
          for (int64_t j = j0; j < j1; ++j) {
            const EpiCols e0 = epi_cols(p, j * kNR), e1 = epi_cols(p, j * kNR + 8);
            micro_rows(int(std::min<int64_t>(kMR, m_end - m0)), p, Aw + m0 * Kp, Kp, Bp + j * panel, kp, m0, e0, e1);
          }
      });
}

// Horizontal sums of 4 vectors of 8 int32: lane i of the result = sum of v[i] (i < 4).
FA_AVX2 inline __m128i hsum4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i s01 = _mm256_hadd_epi32(v0, v1), s23 = _mm256_hadd_epi32(v2, v3);
  const __m256i s = _mm256_hadd_epi32(s01, s23);  // per 128-bit lane: v0, v1, v2, v3 partials
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// Small M: rows of A widened to int16 once; every column n of b is sign-extended on the fly (NC columns at a time:
// 4 for up to 2 rows, else 2, so the MRS x NC accumulators stay in registers) and dotted with all the rows.
template <int MRS>
FA_AVX2 void small_m_cols(const Int8MatmulParams& p, const int16_t* Aw, int64_t Kp, int64_t n0, int64_t n1) {
  constexpr int NC = MRS <= 2 ? 4 : 2;
  const int64_t K = p.K, K16 = (K / 16) * 16;
  for (int64_t n = n0; n < n1; n += NC) {
    const int64_t cnt = std::min<int64_t>(NC, n1 - n);
    const int8_t* br[NC];
    for (int j = 0; j < NC; ++j) br[j] = p.b + (n + (j < cnt ? j : 0)) * K;  // (duplicates past cnt: not stored)
    __m256i acc[MRS][NC];
    for (int r = 0; r < MRS; ++r)
      for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K16; k += 16) {
      __m256i bv[NC];
      for (int j = 0; j < NC; ++j) bv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(br[j] + k)));
      for (int r = 0; r < MRS; ++r) {
        const __m256i av = _mm256_loadu_si256((const __m256i*)(Aw + r * Kp + k));
        for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(av, bv[j]));
      }
    }
    for (int r = 0; r < MRS; ++r) {
      alignas(16) int32_t s[4];
      if constexpr (NC == 4)
        _mm_store_si128((__m128i*)s, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      else
        _mm_store_si128((__m128i*)s, hsum4(acc[r][0], acc[r][1], acc[r][0], acc[r][1]));
      for (int j = 0; j < cnt; ++j) {
        uint32_t t = uint32_t(s[j]);
        for (int64_t k = K16; k < K; ++k) t += uint32_t(int32_t(Aw[r * Kp + k]) * int32_t(br[j][k]));
        store_scalar(p, r, n + j, int32_t(t));
      }
    }
  }
}

FA_AVX2 void matmul_avx2_small_m(const Int8MatmulParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K, Kp = K;
  const Scratch scratch({size_t(M * Kp) * 2});
  int16_t* Aw = scratch.part<int16_t>(0);
  for (int64_t m = 0; m < M; ++m) widen_row(p.a + m * K, K, Kp, Aw + m * Kp);
  const int64_t chunk = 64;  // columns per work item
  const bool par = M * N * K >= kParallelMinMacs && p.num_threads > 1;
  for_owned(cdiv(N, chunk), p.num_threads, par, [&](int64_t c) FA_AVX2 {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    switch (M) {
      case 1: small_m_cols<1>(p, Aw, Kp, n0, n1); break;
      case 2: small_m_cols<2>(p, Aw, Kp, n0, n1); break;
      case 3: small_m_cols<3>(p, Aw, Kp, n0, n1); break;
      default: small_m_cols<4>(p, Aw, Kp, n0, n1); break;
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn
#endif  // FA_X86
