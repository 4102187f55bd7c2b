// The VNNI int8 matmuls: the u8 x s8 scheme both share (row_sum, pack_panel_u8, run_u8_packed), the AVX-512 VNNI
// path (12 x 32 micro-kernel on zmm, and a small-M path) and the AVX-VNNI path (6 x 16 on ymm).
#pragma once

#include "int8_avx2.h"
#include "int8_epilogue.h"
#include "int8_kernel.h"
#include "int8_schedule.h"
#include "kernel_util.h"
#include "simd.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#ifdef FA_X86
namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// The u8 x s8 packed paths (AVX-512 VNNI on zmm, AVX-VNNI on ymm): vpdpbusd sums four u8 x s8 products into each
// int32 lane WITHOUT saturation (unlike vpmaddubsw / vpdpbusds), so with b' = b + 128 (unsigned) the sum is
// sum_k b'[n][k] a[m][k] = acc[m][n] + 128 * rowsum_a[m] exactly modulo 2**32, and the accumulators start at
// -128 * rowsum_a[m]. B is packed into panels of NR columns (pack_panel_u8); A rows are broadcast 4 bytes at a
// time straight from a, or from a copy zero-padded to a multiple of 4 when K is not one.

// sum_k a[k] (exact: |sum| <= 128 K), via vpsadbw on a + 128.
FA_AVX2 int32_t row_sum(const int8_t* a, int64_t K) {
  const __m256i flip = _mm256_set1_epi8(char(0x80)), z = _mm256_setzero_si256();
  __m256i s = z;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    s = _mm256_add_epi64(s, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(a + k)), flip), z));
  alignas(32) int64_t t[4];
  _mm256_store_si256((__m256i*)t, s);
  int64_t total = t[0] + t[1] + t[2] + t[3] - 128 * k;
  for (; k < K; ++k) total += a[k];
  return int32_t(total);
}

// Packs the NR-column panel starting at column n0 as b + 128: per k-quad q, the NR words (b'[n][4q .. 4q+3]);
// kq = K4 / 4 k-quads; zero past N and K (a zero b' contributes nothing).
template <int NR>
FA_AVX2 void pack_panel_u8(const int8_t* b, int64_t N, int64_t K, int64_t kq, int64_t n0, uint8_t* dst) {
  const int64_t K32 = (K / 32) * 32;
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  for (int g = 0; g < NR / 8; ++g) {
    const int64_t c0 = n0 + 8 * g;
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(8, N - c0));
    const int8_t* rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = i < valid ? b + (c0 + i) * K : nullptr;
    uint8_t* out = dst + 32 * g;
    for (int64_t k0 = 0; k0 < K32; k0 += 32) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = rows[i] ? _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(rows[i] + k0)), flip)
                       : _mm256_setzero_si256();
      transpose8x8_epi32(r);  // r[q] word i = quad k0/4 + q of column c0 + i
      uint8_t* o = out + (k0 / 4) * (4 * NR);
      for (int q = 0; q < 8; ++q) _mm256_store_si256((__m256i*)(o + q * (4 * NR)), r[q]);
    }
    for (int64_t k = K32; k < 4 * kq; ++k)  // K tail and the zero pad to a multiple of 4
      for (int i = 0; i < 8; ++i)
        out[(k / 4) * (4 * NR) + 4 * i + (k & 3)] = (rows[i] && k < K) ? uint8_t(rows[i][k] ^ 0x80) : uint8_t(0);
  }
}

// Packs B, prepares A (row sums; the zero-padded copy when K % 4 != 0) and runs the schedule of run_packed with
// tile(A, lda, Bp, panel_bytes, kq, rowsum, m_beg, m_end, j0, j1): A's rows m_beg .. m_end-1 against panels j0 .. j1-1.
template <int NR, class Tile>
void run_u8_packed(const Int8MatmulParams& p, int64_t MC, Tile tile) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t K4 = (K + 3) / 4 * 4, kq = K4 / 4;
  const int64_t PN = cdiv(N, NR);
  const size_t panel = size_t(kq) * 4 * NR;  // bytes per packed panel
  const bool pad_a = K4 != K;
  const Scratch scratch({PN * panel, size_t(M) * 4, pad_a ? size_t(M * K4) : 0});
  uint8_t* Bp = scratch.part<uint8_t>(0);
  int32_t* rowsum = scratch.part<int32_t>(1);
  int8_t* Ap = scratch.part<int8_t>(2);
  const int8_t* A = pad_a ? Ap : p.a;
  run_packed(
      p, PN, panel, MC, [&](int64_t j) { pack_panel_u8<NR>(p.b, N, K, kq, j * NR, Bp + j * panel); },
      [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          rowsum[m] = row_sum(p.a + m * K, K);
          if (pad_a) {
            std::memcpy(Ap + m * K4, p.a + m * K, size_t(K));
            std::memset(Ap + m * K4 + K, 0, size_t(K4 - K));
          }
        }
      },
      [&](int64_t m_beg, int64_t m_end, int64_t j0, int64_t j1) {
        tile(A, K4, Bp, panel, kq, rowsum, m_beg, m_end, j0, j1);
      });
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 VNNI matmul: the u8 x s8 scheme above on zmm: panels of kNRv = 32 columns (two zmm per k-quad) and a
// 12 x 32 micro-kernel (24 zmm accumulators).
#pragma GCC diagnostic push
// GCC 12 warns falsely about the _mm512_undefined_* passthroughs inside avx512fintrin.h under -Wall.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FA_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,prfchw")))

constexpr int kMRv = 12;               // micro-kernel rows
constexpr int kNRv = 32;               // micro-kernel columns (kNRv / 16 zmm per row)
constexpr int64_t kMCv = 8 * kMRv;     // rows per work item

// The epilogue's per-column constants of a 16-column slice on zmm registers: absent terms are exact identities
// (b_scale 1, bias -0: x * 1 = x and x + -0 = x for every float x, zeros' signs included), so the float path has
// no per-vector branches; columns past N are masked off (a zero mask stores nothing).
struct EpiCols16 {
  __m512 bs, bias;
  __mmask16 mask;
  int64_t n;
};

FA_VNNI inline EpiCols16 epi_cols16(const Int8MatmulParams& p, int64_t n) {
  EpiCols16 e;
  e.n = n;
  const int64_t cnt = std::max<int64_t>(0, std::min<int64_t>(16, p.N - n));
  e.mask = __mmask16((1u << cnt) - 1u);
  e.bs = p.b_scale ? _mm512_maskz_loadu_ps(e.mask, p.b_scale + n) : _mm512_set1_ps(1.f);
  e.bias = p.bias ? _mm512_maskz_loadu_ps(e.mask, p.bias + n) : _mm512_set1_ps(-0.f);
  return e;
}

FA_VNNI inline __m512 opaque(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

// Rows m0 .. m0 + MR - 1 of the output from the MR x NV accumulators (the same float32 operations as store_scalar).
template <Int8OutType T, int MR, int NV>
FA_VNNI inline void epi_tile(const Int8MatmulParams& p, const EpiCols16* e, int64_t m0, const __m512i (&c)[MR][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const int64_t row = (m0 + r) * p.N;
    if constexpr (T == Int8OutType::kInt32) {
      int32_t* out = static_cast<int32_t*>(p.out) + row;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_mask_storeu_epi32(out + e[v].n, e[v].mask, c[r][v]);
    } else {
      const __m512 as = _mm512_set1_ps(p.a_scale ? p.a_scale[m0 + r] : 1.f);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        __m512 x = opaque(_mm512_mul_ps(_mm512_cvtepi32_ps(c[r][v]), as));
        x = _mm512_add_ps(opaque(_mm512_mul_ps(x, e[v].bs)), e[v].bias);
        if constexpr (T == Int8OutType::kFloat32) {
          _mm512_mask_storeu_ps(static_cast<float*>(p.out) + row + e[v].n, e[v].mask, x);
        } else {
          __m256i h;
          if constexpr (T == Int8OutType::kFloat16) {
            h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          } else {  // bfloat16: round to nearest even, NaN -> 0x7FC0
            const __m512i u = _mm512_castps_si512(x);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            __m512i b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
            b = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), b, _mm512_set1_epi32(0x7FC0));
            h = _mm512_cvtepi32_epi16(b);
          }
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + row + e[v].n, e[v].mask, h);
        }
      }
    }
  }
}

// acc += the four u8 x s8 products of each 32-bit lane of b (unsigned) and a (signed). Inline asm: with the
// _mm512_dpbusd_epi32 intrinsic GCC 12 copies and spills the 24 accumulators in every iteration.
FA_VNNI inline void dpbusd(__m512i& acc, __m512i b, __m512i a) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(a));
}

template <int MR>
FA_VNNI void micro_vnni(const Int8MatmulParams& p, const int8_t* A, int64_t lda, const uint8_t* B, int64_t kq,
                        int64_t m0, const int32_t* rowsum, const EpiCols16* e) {
  constexpr int NV = kNRv / 16;
  prefetch_out(p, m0, MR, e[0].n, std::min<int64_t>(kNRv, p.N - e[0].n));
  __m512i c[MR][NV];  // start at -128 * rowsum_a[m] (mod 2**32): the b + 128 compensation
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_set1_epi32(int32_t(0u - uint32_t(rowsum[m0 + r]) * 128u));
  const __m512i* b = reinterpret_cast<const __m512i*>(B);
  for (int64_t q = 0; q < kq; ++q) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_si512(b + NV * q + v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      std::memcpy(&w, A + r * lda + 4 * q, 4);
      const __m512i a = _mm512_set1_epi32(w);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) dpbusd(c[r][v], bv[v], a);
    }
  }
  switch (p.out_type) {
    case Int8OutType::kInt32: return epi_tile<Int8OutType::kInt32>(p, e, m0, c);
    case Int8OutType::kFloat32: return epi_tile<Int8OutType::kFloat32>(p, e, m0, c);
    case Int8OutType::kFloat16: return epi_tile<Int8OutType::kFloat16>(p, e, m0, c);
    default: return epi_tile<Int8OutType::kBFloat16>(p, e, m0, c);
  }
}

template <int... I>
constexpr auto make_micro_table(std::integer_sequence<int, I...>) {
  using F = void (*)(const Int8MatmulParams&, const int8_t*, int64_t, const uint8_t*, int64_t, int64_t,
                     const int32_t*, const EpiCols16*);
  return std::array<F, sizeof...(I)>{micro_vnni<I + 1>...};
}
constexpr auto kMicroVnni = make_micro_table(std::make_integer_sequence<int, kMRv>{});

// Small M (<= kSmallM rows, decoding): no packing. Each b row (column n) streams once, as u8 (b XOR 0x80 = b + 128),
// against the M rows of a as s8: vpdpbusd over 64-byte chunks, the K tail read through a zeroing mask (a zero a
// byte contributes nothing whatever b' holds), and 128 * rowsum_a[m] taken off after the horizontal sum.
template <int MR>
FA_VNNI void small_m_vnni_cols(const Int8MatmulParams& p, const int32_t* rowsum, int64_t n0, int64_t n1) {
  // Columns at a time: NB independent accumulator chains per row hide vpdpbusd's latency and keep NB rows of b
  // streaming; 8 while the MR x NB accumulators leave room in the 32 zmm.
  constexpr int NB = MR <= 3 ? 8 : 4;
  const int64_t K = p.K;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __mmask64 tail = K % 64 ? (~__mmask64(0)) >> (64 - K % 64) : ~__mmask64(0);
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = int(std::min<int64_t>(NB, n1 - n));
    const int8_t* b[NB];
    for (int j = 0; j < NB; ++j) b[j] = p.b + (n + std::min(j, nb - 1)) * K;  // past n1: repeat the last column
    __m512i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 m = k + 64 <= K ? ~__mmask64(0) : tail;
      __m512i av[MR];
      for (int r = 0; r < MR; ++r) av[r] = _mm512_maskz_loadu_epi8(m, p.a + r * K + k);
      for (int j = 0; j < NB; ++j) {
        const __m512i bv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, b[j] + k), flip);
        for (int r = 0; r < MR; ++r) dpbusd(acc[r][j], bv, av[r]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < nb; ++j)
        store_scalar(p, r, n + j, int32_t(uint32_t(_mm512_reduce_add_epi32(acc[r][j])) - uint32_t(rowsum[r]) * 128u));
  }
}

FA_VNNI void matmul_vnni_small_m(const Int8MatmulParams& p) {
  int32_t rowsum[kSmallM];
  for (int64_t m = 0; m < p.M; ++m) rowsum[m] = row_sum(p.a + m * p.K, p.K);
  const int64_t chunk = 64;  // columns per work item
  const bool par = p.M * p.N * p.K >= kParallelMinMacs && p.num_threads > 1;
  for_owned(cdiv(p.N, chunk), p.num_threads, par, [&](int64_t c) FA_VNNI {
    const int64_t n0 = c * chunk, n1 = std::min(p.N, n0 + chunk);
    switch (p.M) {
      case 1: small_m_vnni_cols<1>(p, rowsum, n0, n1); break;
      case 2: small_m_vnni_cols<2>(p, rowsum, n0, n1); break;
      case 3: small_m_vnni_cols<3>(p, rowsum, n0, n1); break;
      default: small_m_vnni_cols<4>(p, rowsum, n0, n1); break;
    }
  });
}

FA_VNNI void matmul_vnni_packed(const Int8MatmulParams& p) {
  run_u8_packed<kNRv>(p, kMCv, [&](const int8_t* A, int64_t lda, const uint8_t* Bp, size_t panel, int64_t kq,
                                   const int32_t* rowsum, int64_t m_beg, int64_t m_end, int64_t j0, int64_t j1)
                                   FA_VNNI {
    for (int64_t m0 = m_beg; m0 < m_end; m0 += kMRv) {
      const auto micro = kMicroVnni[std::min<int64_t>(kMRv, m_end - m0) - 1];
      for (int64_t j = j0; j < j1; ++j) {
        EpiCols16 e[kNRv / 16];
        for (int v = 0; v < kNRv / 16; ++v) e[v] = epi_cols16(p, j * kNRv + 16 * v);
        micro(p, A + m0 * lda, lda, Bp + j * panel, kq, m0, rowsum, e);
      }
    }
  });
}

#pragma GCC diagnostic pop

// ---------------------------------------------------------------------------------------------------------------
// AVX-VNNI matmul, for CPUs with the VEX-encoded 256-bit vpdpbusd but no AVX-512 (Intel's client cores from Alder
// Lake on, among others; FASTATTN_CPU_NO_AVXVNNI=1 turns it off): the u8 x s8 scheme above on ymm, panels of
// kNRa = 16 columns (two ymm per k-quad) and a 6 x 16 micro-kernel (12 accumulators, two B vectors and a broadcast:
// 15 of the 16 ymm registers), with the AVX2 path's epilogue. Small M runs the AVX2 path.
#define FA_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni,prfchw")))

constexpr int kMRa = 6;
constexpr int kNRa = 16;
constexpr int64_t kMCa = 16 * kMRa;  // rows per work item

// acc += the four u8 x s8 products of each 32-bit lane of u (unsigned) and s (signed); inline asm as for zmm.
FA_AVXVNNI inline void dpbusd_vex(__m256i& acc, __m256i u, __m256i s) {
  __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
}

// MR x 16 micro-kernel over all kq k-quads, then the epilogue of rows m0 .. m0+MR-1. noinline: inlined into the
// tile, GCC 12 kept the accumulators on the stack.
template <int MR>
FA_AVXVNNI __attribute__((noinline)) void micro_avxvnni(const Int8MatmulParams& p, const int8_t* A, int64_t lda,
                                                        const uint8_t* B, int64_t kq, int64_t m0,
                                                        const int32_t* rowsum, const EpiCols& e0, const EpiCols& e1) {
  prefetch_out(p, m0, MR, e0.n, std::min<int64_t>(kNRa, p.N - e0.n));
  __m256i c[MR][2];  // start at -128 * rowsum_a[m] (mod 2**32): the b + 128 compensation
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_set1_epi32(int32_t(0u - uint32_t(rowsum[m0 + r]) * 128u));
  const __m256i* b = reinterpret_cast<const __m256i*>(B);
  for (int64_t q = 0; q < kq; ++q) {
    const __m256i b0 = _mm256_load_si256(b + 2 * q), b1 = _mm256_load_si256(b + 2 * q + 1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      std::memcpy(&w, A + r * lda + 4 * q, 4);
      const __m256i a = _mm256_set1_epi32(w);
      dpbusd_vex(c[r][0], b0, a);
      dpbusd_vex(c[r][1], b1, a);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    epi_store(p, e0, m0 + r, c[r][0]);
    epi_store(p, e1, m0 + r, c[r][1]);
  }
}

FA_AVXVNNI void matmul_avxvnni_packed(const Int8MatmulParams& p) {
  run_u8_packed<kNRa>(p, kMCa, [&](const int8_t* A, int64_t lda, const uint8_t* Bp, size_t panel, int64_t kq,
                                   const int32_t* rowsum, int64_t m_beg, int64_t m_end, int64_t j0, int64_t j1)
                                   FA_AVXVNNI {
    for (int64_t m0 = m_beg; m0 < m_end; m0 += kMRa) {
      const int rows = int(std::min<int64_t>(kMRa, m_end - m0));
      for (int64_t j = j0; j < j1; ++j) {
        const EpiCols e0 = epi_cols(p, j * kNRa), e1 = epi_cols(p, j * kNRa + 8);
        const int8_t* a = A + m0 * lda;
        const uint8_t* bp = Bp + j * panel;
        switch (rows) {
          case 6: micro_avxvnni<6>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
          case 5: micro_avxvnni<5>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
          case 4: micro_avxvnni<4>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
          case 3: micro_avxvnni<3>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
          case 2: micro_avxvnni<2>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
          default: micro_avxvnni<1>(p, a, lda, bp, kq, m0, rowsum, e0, e1); break;
        }
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn
#endif  // FA_X86
