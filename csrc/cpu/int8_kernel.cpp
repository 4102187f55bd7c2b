// CPU kernels of the INT8 ops: W8A8 matmul with an exact int32 accumulator and a fused float32 dequant epilogue,
// and row-wise symmetric int8 quantization.
//
// Matmul paths, chosen at run time (int8_matmul at the bottom):
//   AVX-512 VNNI (CPU has avx512f/bw/vl/vnni; FASTATTN_CPU_NO_AVX512=1 turns it off): vpdpbusd on b + 128 (u8)
//     and a (s8), non-saturating, minus 128 * rowsum(a) in the epilogue; 12 x 32 micro-kernel on zmm (see below);
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
//     4. the parallel schedule of run_packed (below), shared with the VNNI paths.
//   AVX2, small M (<= kSmallM rows): no packing: dot products of int16 A rows against b rows
//     sign-extended on the fly, 4 columns at a time, reduced horizontally; column ranges per thread as above.
//   Portable (no AVX2, or FASTATTN_CPU_NO_AVX2=1, which also turns the VNNI paths off): plain loops.
// The int32 sums wrap modulo 2**32 exactly like int64 -> int32 (the reference), exact for K < 2**17.
// Epilogue (float32, in the reference's order, never contracted into FMAs): c = float(acc); c *= a_scale[m];
//   c *= b_scale[n]; c += bias[n]; rounded to nearest-even into float16 / bfloat16 / float32.
// Quantization: per row, pass 1 converts (and divides by smooth) into a float row buffer and takes the absmax;
//   pass 2 rounds buf * inv half-to-even (vroundps / nearbyint), clamps to [-127, 127] and packs to int8 (AVX2 or
//   portable; the same float32 operations either way, so both are bit-exact with quantize_rows_ref).
#include "int8_kernel.h"
#include "cpu_features.h"
#include "float_bits.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <array>
#include <atomic>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastattn {
namespace cpu {
namespace {

constexpr int kMR = 6;                   // micro-kernel rows (A)
constexpr int kNR = 16;                  // micro-kernel columns (B panel width)
constexpr int64_t kMC = 16 * kMR;        // rows per work item
constexpr int64_t kSmallM = 4;           // up to this many rows: no packing (GEMV-like path)
constexpr int64_t kParallelMinMacs = 1 << 18;  // below this many multiply-adds one thread does the whole matmul
constexpr int64_t kParallelMinElems = 1 << 15; // quantize: elements below which one thread does it all

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr size_t align64(size_t n) { return (n + 63) / 64 * 64; }

// 64-byte aligned, uninitialised scratch memory for one call, carved into parts of the given sizes. Up to
// kCachedScratch bytes come from a grow-only buffer kept per calling thread (released when the thread exits), so
// repeated calls neither allocate nor page-fault (fresh pages cost ~5% of a 1024^3 matmul); larger requests are
// allocated and freed per call. One Scratch per thread at a time.
constexpr size_t kCachedScratch = size_t(64) << 20;

class Scratch {
  static constexpr size_t kMaxParts = 4;

 public:
  template <size_t N>
  explicit Scratch(const size_t (&sizes)[N]) {
    static_assert(N <= kMaxParts, "too many parts");
    size_t total = 0;
    for (size_t i = 0; i < N; ++i) total += align64(std::max<size_t>(sizes[i], 1));
    if (total <= kCachedScratch) {
      Cache& cache = thread_cache();
      if (cache.bytes < total) {
        std::free(cache.p);
        cache.bytes = 0;
        cache.p = std::aligned_alloc(64, total);
        if (!cache.p) throw std::bad_alloc();
        cache.bytes = total;
      }
      base_ = static_cast<char*>(cache.p);
    } else {
      base_ = static_cast<char*>(std::aligned_alloc(64, total));
      if (!base_) throw std::bad_alloc();
      owned_ = true;
    }
    size_t off = 0;
    for (size_t i = 0; i < N; ++i) {
      offsets_[i] = off;
      off += align64(std::max<size_t>(sizes[i], 1));
    }
  }
  ~Scratch() {
    if (owned_) std::free(base_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* part(size_t i) const { return reinterpret_cast<T*>(base_ + offsets_[i]); }

 private:
  struct Cache {
    void* p = nullptr;
    size_t bytes = 0;
    ~Cache() { std::free(p); }
  };
  static Cache& thread_cache() {
    thread_local Cache cache;
    return cache;
  }
  char* base_ = nullptr;
  bool owned_ = false;
  size_t offsets_[kMaxParts] = {};
};

// ---------------------------------------------------------------------------------------------------------------
// The parallel schedule of the packed matmuls (AVX2 and VNNI). B is packed into PN panels of panel_bytes each. The
// panels are split into one contiguous group per thread, which that thread packs (so they land in its own caches);
// a group's work items are (block of its panels small enough to stay in L2, chunk of MC rows), blocks outer, so a
// block stays in the core's L2 while A's row chunks stream past it. (Re-reading B from L3 for every row tile made
// 1024^3 1.2-1.3x slower whenever another tenant of the host was using the L3.) A thread done with its group takes the
// remaining items of the others (one atomic counter per group), so one descheduled thread does not hold a call up.
//   pack(j): packs panel j;  prep(m0, m1): per-row work on rows m0 .. m1-1, done before any tile;
//   tile(m0, m1, j0, j1): rows m0 .. m1-1 against panels j0 .. j1-1.
constexpr size_t kBlockBytes = size_t(512) << 10;

struct alignas(64) WorkCounter {  // one cache line each
  std::atomic<int64_t> next{0};
};

// Work stealing over G groups of items (group g holds items(g), taken in order through counters[g]): thread t works
// through group t % G first, then takes what is left of the others.
template <class Items, class F>
void take_items(WorkCounter* counters, int G, int t, Items items, F f) {
  for (int k = 0; k < G; ++k) {
    const int g = (t + k) % G;
    const int64_t n = items(g);
    for (int64_t it; (it = counters[g].next.fetch_add(1, std::memory_order_relaxed)) < n;) f(g, it);
  }
}

// Items 0 .. n-1 in one contiguous range per thread, with take_items: repeated calls on the same operands find each
// thread's share in its own caches (unlike a dynamic schedule), and a descheduled thread does not hold a call up.
template <class F>
void for_owned(int64_t n, int num_threads, bool par, F f) {
  std::vector<WorkCounter> counters(size_t(std::max(1, num_threads)));
#pragma omp parallel num_threads(num_threads) if (par)
  {
    int T = 1, t = 0;
#ifdef _OPENMP
    T = omp_get_num_threads();
    t = omp_get_thread_num();
#endif
    auto first = [&](int g) { return n * g / T; };
    take_items(counters.data(), T, t, [&](int g) { return first(g + 1) - first(g); },
               [&](int g, int64_t i) { f(first(g) + i); });
  }
}

template <class Pack, class Prep, class Tile>
void run_packed(const Int8MatmulParams& p, int64_t PN, size_t panel_bytes, int64_t MC, Pack pack, Prep prep,
                Tile tile) {
  const int64_t M = p.M;
  const int64_t block = std::max<int64_t>(1, int64_t(kBlockBytes / panel_bytes));  // panels per work item
  const int64_t chunks = ceil_div(M, MC);
  const bool par = M * p.N * p.K >= kParallelMinMacs && p.num_threads > 1;
  std::vector<WorkCounter> counters(size_t(std::max(1, p.num_threads)));
#pragma omp parallel num_threads(p.num_threads) if (par)
  {
    int T = 1, t = 0;
#ifdef _OPENMP
    T = omp_get_num_threads();
    t = omp_get_thread_num();
#endif
    const int G = int(std::min<int64_t>(T, PN));
    auto first = [&](int g) { return PN * g / G; };  // group g: panels first(g) .. first(g + 1) - 1
    if (t < G)
      for (int64_t j = first(t); j < first(t + 1); ++j) pack(j);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) prep(c * MC, std::min(M, (c + 1) * MC));
    // (the implicit barrier above: every panel packed, every row prepared)
    take_items(counters.data(), G, t, [&](int g) { return ceil_div(first(g + 1) - first(g), block) * chunks; },
               [&](int g, int64_t it) {
                 const int64_t j0 = first(g) + (it / chunks) * block, m0 = (it % chunks) * MC;
                 tile(m0, std::min(M, m0 + MC), j0, std::min(first(g + 1), j0 + block));
               });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar conversions (round-to-nearest-even, like torch) and a compiler barrier that keeps c * s and c + bias
// separate float32 operations (no FMA contraction, so the epilogue rounds exactly like the reference).
using namespace bits;  // float_from_bits, bits_of, select, half/bf16 <-> float (float_bits.h)

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
    case Int8OutType::kFloat16: static_cast<uint16_t*>(p.out)[o] = float_to_half(c); break;
    case Int8OutType::kBFloat16: static_cast<uint16_t*>(p.out)[o] = float_to_bf16(c); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Portable matmul: 4 x 4 blocks of wrapping int32 dot products straight from the int8 rows (auto-vectorised).
void matmul_portable(const Int8MatmulParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t TM = ceil_div(M, 4), TN = ceil_div(N, 4);
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
// AVX2 matmul.
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

// Packs the 16-column panel starting at column n0 (see the header comment); kp = Kp / 2 k-pairs.
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

// Asks for the cache lines of the output block rows m0 .. m0 + rows - 1, columns n0 .. n0 + cols - 1 in writable
// state, ahead of a micro-kernel's epilogue (call it before the K loop). Each epilogue writes a few lines in each of
// its rows, so the hardware prefetchers do not see them coming and every store would wait for its line to be read
// first: when other tenants of the host use the L3, that was ~10% of a 1024^3 matmul (A/B, same minutes). Unlike
// non-temporal stores, this leaves the output in cache for the next op. always_inline: GCC deems a function of
// prefetches alone free of side effects and deletes calls to it; inlined, they are prefetchw where the caller's
// target has prfchw (the VNNI micro-kernel), else prefetcht0 (the AVX2 one: PREFETCHW is not an AVX2-era given).
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
  const int64_t PN = ceil_div(N, kNR);
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
  for_owned(ceil_div(N, chunk), p.num_threads, par, [&](int64_t c) FA_AVX2 {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    switch (M) {
      case 1: small_m_cols<1>(p, Aw, Kp, n0, n1); break;
      case 2: small_m_cols<2>(p, Aw, Kp, n0, n1); break;
      case 3: small_m_cols<3>(p, Aw, Kp, n0, n1); break;
      default: small_m_cols<4>(p, Aw, Kp, n0, n1); break;
    }
  });
}

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
  const int64_t PN = ceil_div(N, NR);
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
  // streaming; 8 while the MR x NB accumulators leave room in the 32 zmm (1x4096x4096 0.17 -> 0.13 ms).
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
  for_owned(ceil_div(p.N, chunk), p.num_threads, par, [&](int64_t c) FA_VNNI {
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
    else if (t == Int8InType::kFloat16) v = half_to_float(static_cast<const uint16_t*>(xrow)[k]);
    else v = bf16_to_float(static_cast<const uint16_t*>(xrow)[k]);
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
          quantize_row_portable([&](int64_t k) { return half_to_float(x[k]); }, p.smooth, K, buf.data(), q, s);
          break;
        }
        case Int8InType::kBFloat16: {
          const uint16_t* x = reinterpret_cast<const uint16_t*>(xrow);
          quantize_row_portable([&](int64_t k) { return bf16_to_float(x[k]); }, p.smooth, K, buf.data(), q, s);
          break;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastattn
