// CPU kernels of the INT8 ops: W8A8 matmul with an exact int32 accumulator and a fused float32 dequant epilogue,
// and row-wise symmetric int8 quantization.
//
// Matmul paths, chosen at run time (int8_matmul at the bottom):
//   AVX-512 VNNI (CPU has avx512f/bw/vl/vnni; FASTATTN_CPU_NO_AVX512=1 turns it off): vpdpbusd on b + 128 (u8)
//     and a (s8), non-saturating, minus 128 * rowsum(a) in the epilogue; 12 x 32 micro-kernel on zmm;
//     small M (<= kSmallM rows): no packing, each b row streams once against the few a rows, 8 columns at a time
//     (4 for 4 rows), each thread on its own contiguous range of columns (for_owned).
//   AVX-VNNI (no AVX-512, CPU has avxvnni; FASTATTN_CPU_NO_AVXVNNI=1 turns it off): the same scheme with the VEX
//     vpdpbusd on ymm, 6 x 16 micro-kernel; small M takes the AVX2 path.
//   AVX2 (no VNNI, no saturating vpmaddubsw: exact for any int8 input):
//     1. a (M, K) int8 is sign-extended to int16 rows Aw (M, Kp), Kp = K rounded up to even (zero pad);
//     2. b (N, K) int8 is packed into int16 panels of kNR = 16 columns: panel j holds, for every k-pair p, the 16
//        int32 words (b[n][2p], b[n][2p+1]) of n = 16j .. 16j+15 (two ymm; zero pad past N and K);
//     3. a 6 x 16 register-blocked micro-kernel: per k-pair, two panel loads, six vpbroadcastd of the int16 pair
//        (a[m][2p], a[m][2p+1]) and twelve vpmaddwd (exact: each lane sums two products of magnitude <= 2**14) +
//        vpaddd into twelve int32 accumulators, over the whole K (no C round trips), then the fused epilogue;
//     4. the parallel schedule of run_packed, shared with the VNNI paths.
//   AVX2, small M (<= kSmallM rows): no packing: dot products of int16 A rows against b rows
//     sign-extended on the fly, 4 columns at a time, reduced horizontally; column ranges per thread as above.
//   Portable (no AVX2, or FASTATTN_CPU_NO_AVX2=1, which also turns the VNNI paths off): plain loops.
// The int32 sums wrap modulo 2**32 exactly like int64 -> int32 (the reference), exact for K < 2**17.
// Epilogue (float32, in the reference's order, never contracted into FMAs): c = float(acc); c *= a_scale[m];
//   c *= b_scale[n]; c += bias[n]; rounded to nearest-even into float16 / bfloat16 / float32.
// Quantization: per row, pass 1 converts (and divides by smooth) into a float row buffer and takes the absmax;
//   pass 2 rounds buf * inv half-to-even (vroundps / nearbyint), clamps to [-127, 127] and packs to int8 (AVX2 or
//   portable; the same float32 operations either way, so both are bit-exact with quantize_rows_ref).
// Files: int8_schedule.h (scratch memory, run_packed, for_owned), int8_epilogue.h, int8_avx2.h, int8_vnni.h (both
//   VNNI paths), int8_quantize.h; this file: the portable matmul, the path choice and the entry points.
#include "int8_kernel.h"
#include "cpu_features.h"
#include "float_bits.h"
#include "kernel_util.h"
#include "simd.h"
// the parts, in the order they build on each other
#include "int8_schedule.h"
#include "int8_epilogue.h"
#include "int8_avx2.h"
#include "int8_vnni.h"
#include "int8_quantize.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 15; // quantize: elements below which one thread does it all

// ---------------------------------------------------------------------------------------------------------------
// Portable matmul: 4 x 4 blocks of wrapping int32 dot products straight from the int8 rows (auto-vectorised).
void matmul_portable(const Int8MatmulParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t TM = cdiv(M, 4), TN = cdiv(N, 4);
  const bool par = M * N * K >= kParallelMinMacs && p.num_threads > 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(p.num_threads) if (par)
  for (int64_t t = 0; t < TM * TN; ++t) {
    const int64_t m0 = (t / TN) * 4, n0 = (t % TN) * 4;
    const int64_t mr = std::min<int64_t>(4, M - m0), nr = std::min<int64_t>(4, N - n0);
    for (int64_t i = 0; i < mr; ++i) {
      const int8_t* a = p.a + (m0 + i) * K;
      for (int64_t j = 0; j < nr; ++j) {
        const int8_t* b = p.b + (n0 + j) * K;
        uint32_t s = 0;  // wraps modulo 2**32 like int64 -> int32; exact for K < 2**17
        for (int64_t k = 0; k < K; ++k) s += uint32_t(int32_t(a[k]) * int32_t(b[k]));
        store_scalar(p, m0 + i, n0 + j, int32_t(s));
      }
    }
  }
}

// The matmul's code path, from what the CPU has and the FASTATTN_CPU_NO_* switches.
enum class Path { kAvx512Vnni, kAvxVnni, kAvx2, kPortable };

Path matmul_path() {
#ifdef FA_X86
  if (cpu_use_avx512_vnni()) return Path::kAvx512Vnni;
  if (cpu_use_avx_vnni()) return Path::kAvxVnni;
  if (cpu_use_avx2()) return Path::kAvx2;
#endif
  return Path::kPortable;
}

}  // namespace

void int8_matmul(const Int8MatmulParams& p) {
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {  // acc = 0 everywhere
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = 0; n < p.N; ++n) store_scalar(p, m, n, 0);
    return;
  }
#ifdef FA_X86
  switch (matmul_path()) {
    case Path::kAvx512Vnni: return p.M <= kSmallM ? matmul_vnni_small_m(p) : matmul_vnni_packed(p);
    case Path::kAvxVnni: return p.M <= kSmallM ? matmul_avx2_small_m(p) : matmul_avxvnni_packed(p);
    case Path::kAvx2: return p.M <= kSmallM ? matmul_avx2_small_m(p) : matmul_avx2_packed(p);
    default: break;
  }
#endif
  matmul_portable(p);
}

const char* int8_matmul_path() {
  switch (matmul_path()) {
    case Path::kAvx512Vnni: return "avx512-vnni";
    case Path::kAvxVnni: return "avx-vnni";
    case Path::kAvx2: return "avx2";
    default: return "portable";
  }
}

void quantize_rows(const QuantizeRowsParams& p) {
  const int64_t M = p.M, K = p.K;
  if (M == 0) return;
  const bool par = M > 1 && M * K >= kParallelMinElems && p.num_threads > 1;
#ifdef FA_X86
  const bool avx2 = cpu_use_avx2();
#else
  [[maybe_unused]] const bool avx2 = false;
#endif
  const int64_t esize = p.x_type == Int8InType::kFloat32 ? 4 : 2;
#pragma omp parallel num_threads(p.num_threads) if (par)
  {
    std::vector<float> buf(size_t(std::max<int64_t>(K, 1)));
#pragma omp for schedule(dynamic, 4)
    for (int64_t m = 0; m < M; ++m) {
      const char* xrow = static_cast<const char*>(p.x) + m * K * esize;
      int8_t* q = p.q + m * K;
      float* s = p.scale + m;
#ifdef FA_X86
      if (avx2) {
        quantize_row_avx2(xrow, p.x_type, p.smooth, K, buf.data(), q, s);
        continue;
      }
#endif
      switch (p.x_type) {
        case Int8InType::kFloat32: {
          const float* x = reinterpret_cast<const float*>(xrow);
          quantize_row_portable([&](int64_t k) { return x[k]; }, p.smooth, K, buf.data(), q, s);
          break;
        }
        case Int8InType::kFloat16: {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(xrow);
          quantize_row_portable([&](int64_t k) { return bits::half_to_float(x[k]); }, p.smooth, K, buf.data(), q, s);
          break;
        }
        case Int8InType::kBFloat16: {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(xrow);
          quantize_row_portable([&](int64_t k) { return bits::bf16_to_float(x[k]); }, p.smooth, K, buf.data(), q, s);
          break;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
