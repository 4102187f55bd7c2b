// CPU weight-only int8 matmul (w8a16): out = (x @ float(w)^T) * w_scale[n] (+ bias[n]), float32 sums; and its
// GEMV body on a float32 weight (gemv_f32: out = x @ w^T (+ bias[n]) for M <= kGemvMaxM float32 rows of x).
//
// x (float32, or bfloat16 / float16 widened to float32) against the int8 weight (N, K), read where it lies:
//   M <= kGemvMaxM (decode): GEMV-like; the weight streams once (once per 8 rows of x), one weight row at a time
//     (a single sequential stream), each 8/16-lane chunk widened int8 -> int32 -> float once and FMA'd into every
//     row of x, one horizontal sum per (row, weight row) at the end (w8a16_rows-inl.h). Threads own contiguous
//     ranges of weight rows (for_owned).
//   larger M: GEMM; per work item a panel of kNC weight rows, widened to float32 kKC columns at a time (L2-sized),
//     is the A operand of gemm_f32.h's register tiles against x transposed once per pass of kMC rows (B, K x kMC);
//     C (weight rows x rows of x) goes through the epilogue transposed.
// Epilogue (float32, in the reference's order, never contracted into an FMA): c *= w_scale[n]; c += bias[n];
//   rounded to nearest even into x's type.
// Kernel sets (chosen once at run time): AVX-512F, AVX2/FMA, portable (one lane, gemm_portable), the same bodies;
//   FASTATTN_CPU_NO_AVX512=1 / FASTATTN_CPU_NO_AVX2=1 force the lower ones.
#include "int8_kernel.h"

#include "cpu_features.h"
#include "float_bits.h"
#include "gemm_f32.h"
#include "int8_epilogue.h"
#include "int8_schedule.h"
#include "kernel_util.h"
#include "simd.h"
#include "vec_traits.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace {

// Rows of x up to which the GEMV path runs. Measured on a 2-core Zen 3, one thread, 3072 x 768 and 768 x 3072
// weights: the GEMM path takes 1.3-4x the GEMV's time at M = 1-8, 1.2x at M = 12, about the same at M = 16; at
// M = 128 it takes 0.7-0.85x the reference's (weight dequantized, then torch's matmul), so it serves all M > 16.
constexpr int64_t kGemvMaxM = 16;
constexpr int64_t kGemvRows = 8;               // rows of x per pass of the GEMV body (gemv)
constexpr int64_t kGemvChunk = 96;             // weight rows per GEMV work item
// Bytes of weight the GEMV body prefetches ahead of its loads: FASTATTN_CPU_GEMV_PREFETCH (read once; 0: none),
// default 2048. On a 2-core Xeon VM (AVX-512, weights streamed from memory) a GPT-2-small decode step took 15.6 ms
// with w8a16 weights and 35.6 with float32 ones without it, 12.1 and 30.2 with 2048 (1024: 13.1 / 30.5; 4096 as
// 2048): the hardware prefetchers alone did not keep two cores' loads fed.
inline int64_t gemv_prefetch() {
  static const int64_t n = [] {
    const char* v = std::getenv("FASTATTN_CPU_GEMV_PREFETCH");
    return v && *v ? std::max<int64_t>(0, std::atoll(v)) : int64_t(2048);
  }();
  return n;
}
constexpr int64_t kNC = 96;                    // GEMM path: weight rows per work item (panel),
constexpr int64_t kKC = 256;                   //   widened KC columns at a time (96 KB: stays in L2),
constexpr int64_t kMC = 256;                   //   against x^T for up to kMC rows of x

namespace portable {
#include "w8a16_rows-inl.h"
inline void gemm(const Gemm<float>& g) { gemm_portable(g); }
}  // namespace portable

#ifdef FA_X86
#define FA_ISA_INCLUDE "w8a16_rows-inl.h"  // avx2::gemv, avx2::widen_i8, avx512::...
#include "foreach_isa.h"
#endif

struct KernelSet {
  void (*gemv)(const float*, int64_t, int64_t, const int8_t*, int64_t, float*, int64_t);
  void (*gemv_f32)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
  void (*widen)(const int8_t*, int64_t, float*);
  void (*gemm)(const Gemm<float>&);
  const char* name;
};

#define FA_KERNEL_SET(ns, name) \
  KernelSet { &ns::gemv<int8_t>, &ns::gemv<float>, &ns::widen_i8, &ns::gemm, name }

const KernelSet& kernels() {
  static const KernelSet port = FA_KERNEL_SET(portable, "portable");
#ifdef FA_X86
  static const KernelSet k2 = FA_KERNEL_SET(avx2, "avx2");
  static const KernelSet k512 = FA_KERNEL_SET(avx512, "avx512");
  if (cpu_use_avx512()) return k512;
  if (cpu_use_avx2()) return k2;
#endif
  return port;
}

// out[0] = c (* scale) (+ bias) rounded into In, the float32 operations kept apart
template <class In>
inline void store_out(In* out, float c, const float* scale, const float* bias) {
  if (scale) c = opaque(c * *scale);
  if (bias) c = opaque(c + *bias);
  *out = from_acc<In>(c);
}

// The GEMV path: out (M, N) from float32 x (M, K) and the weight w (N, K) of T, with w_scale (N,) or nullptr.
template <class In, class T>
void run_gemv(int64_t M, int64_t N, int64_t K, const float* x, const T* w, const float* w_scale, const float* bias,
              In* out, int num_threads,
              void (*gemv)(const float*, int64_t, int64_t, const T*, int64_t, float*, int64_t)) {
  const bool par = M * N * K >= kParallelMinMacs && num_threads > 1;
  for_owned(cdiv(N, kGemvChunk), num_threads, par, [&](int64_t c) {
    const int64_t n0 = c * kGemvChunk, rows = std::min(kGemvChunk, N - n0);
    float s[kGemvMaxM * kGemvChunk];
    for (int64_t m0 = 0; m0 < M; m0 += kGemvRows)  // groups of rows against the chunk (in L2 after the first)
      gemv(x + m0 * K, std::min(kGemvRows, M - m0), K, w + n0 * K, rows, s + m0 * kGemvChunk, kGemvChunk);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < rows; ++j)
        store_out(out + m * N + n0 + j, s[m * kGemvChunk + j], w_scale ? w_scale + n0 + j : nullptr,
                  bias ? bias + n0 + j : nullptr);
  });
}

template <class In>
void run_panels(const W8A16Params& p, const KernelSet& ks) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t MC = std::min(kMC, round_up(M, 8));  // a multiple of 8, as the GEMM's B width must be
  const int64_t KC = std::min(kKC, K);
  const int nt = std::max(1, p.num_threads);
  const bool par = M * N * K >= kParallelMinMacs && nt > 1;
  const int64_t per = round_up(kNC * KC + kNC * MC, 16);
  const Scratch scratch({size_t(K * MC) * sizeof(float), size_t(nt * per) * sizeof(float)});
  float* bufs = scratch.part<float>(1);
  const In* x = static_cast<const In*>(p.x);
  In* out = static_cast<In*>(p.out);
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = std::min(MC, M - m0), mcp = round_up(mc, 8);
    float* t = scratch.part<float>(0);  // t[k * mcp + i] = x[m0 + i][k], zero for i >= mc
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t k1 = std::min(K, k0 + 64);
      for (int64_t i = 0; i < mcp; ++i) {
        const In* xr = x + (m0 + std::min(i, mc - 1)) * K;
        for (int64_t k = k0; k < k1; ++k) t[k * mcp + i] = i < mc ? to_acc(xr[k]) : 0.0f;
      }
    }
    for_owned(cdiv(N, kNC), nt, par, [&](int64_t j) {
      float* panel = bufs + thread_id() * per;
      float* c = panel + kNC * KC;
      const int64_t n0 = j * kNC, rows = std::min(kNC, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {  // c (+)= the panel's rows x t, KC columns of K at a time
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t r = 0; r < rows; ++r) ks.widen(p.w + (n0 + r) * K + k0, kc, panel + r * kc);
        Gemm<float> g;
        g.M = rows; g.N = mcp; g.K = kc;
        g.A = panel; g.sam = kc; g.sak = 1;
        g.B = t + k0 * mcp; g.sbk = mcp;
        g.C = c; g.scm = mcp;
        g.mode = k0 == 0 ? kStore : kAccum;
        ks.gemm(g);
      }
      for (int64_t i = 0; i < mc; ++i) {
        In* o = out + (m0 + i) * N + n0;
        for (int64_t r = 0; r < rows; ++r)
          store_out(o + r, c[r * mcp + i], p.w_scale + n0 + r, p.bias ? p.bias + n0 + r : nullptr);
      }
    });
  }
}

template <class In>
void run(const W8A16Params& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  In* out = static_cast<In*>(p.out);
  if (K == 0) {  // empty sums
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) store_out(out + m * N + n, 0.0f, p.w_scale + n, p.bias ? p.bias + n : nullptr);
    return;
  }
  const KernelSet& ks = kernels();
  if (M > kGemvMaxM) return run_panels<In>(p, ks);
  if constexpr (std::is_same_v<In, float>) {
    run_gemv(M, N, K, static_cast<const float*>(p.x), p.w, p.w_scale, p.bias, out, p.num_threads, ks.gemv);
  } else {  // the few rows of x widened to float32 once
    const Scratch scratch({size_t(M * K) * sizeof(float)});
    float* xf = scratch.part<float>(0);
    const In* x = static_cast<const In*>(p.x);
    for (int64_t e = 0; e < M * K; ++e) xf[e] = to_acc(x[e]);
    run_gemv(M, N, K, xf, p.w, p.w_scale, p.bias, out, p.num_threads, ks.gemv);
  }
}

}  // namespace

void w8a16_matmul(const W8A16Params& p) {
  if (p.M == 0 || p.N == 0) return;
  switch (p.x_type) {
    case Int8InType::kFloat32: return run<float>(p);
    case Int8InType::kFloat16: return run<Half>(p);
    case Int8InType::kBFloat16: return run<BF16>(p);
  }
}

void gemv_f32(const GemvF32Params& p) {
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = 0; n < p.N; ++n) p.out[m * p.N + n] = p.bias ? p.bias[n] : 0.0f;
    return;
  }
  const KernelSet& ks = kernels();
  run_gemv(p.M, p.N, p.K, p.x, p.w, nullptr, p.bias, p.out, p.num_threads, ks.gemv_f32);
}

int64_t gemv_max_rows() { return kGemvMaxM; }

const char* w8a16_matmul_path() { return kernels().name; }

}  // namespace cpu
}  // namespace fastattn
