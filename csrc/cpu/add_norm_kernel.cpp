// CPU kernels of the fused residual-add + LayerNorm/RMSNorm ops.
//
// Every row goes through per-thread buffers in the compute type (float32, float64 for float64 x):
//   forward:  buf = round_s(x + r) (also stored as s)  ->  row sums from buf  ->  y = (buf - mean) * rstd * w + b
//   backward: xhat, g = dy * w (dweight/dbias partials accumulated on the way)  ->  row sums  ->  dx from xhat, g
//             (held in buffers by the portable passes, recomputed from s and dy by the AVX2 ones)
// so the (M, N) tensors are read and written once each. Each thread takes one block of rows, and in the forward row i's
// y pass also loads row i + 1 (fwd_store_load, rows up to kFuseMaxCols wide), so that reads from memory overlap the
// row's arithmetic (the backward's two passes fused the same way are slower). The row passes come in two sets with the
// same interface: Portable (plain loops; also the float64 path) and Avx2 (AVX2/FMA/F16C intrinsics, float32 compute
// only), chosen at run time. Row sums add float partials over blocks of kBlock columns, the blocks in double.
// A call that moves more bytes than the last-level cache holds writes its (M, N) outputs with non-temporal stores
// (Avx2T<true>): nothing of them would stay cached, and the stores skip reading each line first (below that size, where
// the outputs would stay cached, they are slower).
#include "add_norm_kernel.h"
#include "cpu_features.h"
#include "float_bits.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef FA_X86
#define FA_AVX2_INLINE FA_AVX2 __attribute__((always_inline)) inline  // constant k folds the tail checks away
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kBlock = 512;             // columns per float partial sum
constexpr int64_t kParallelMin = 1 << 15;   // elements below which one thread does the whole op
// Widest row whose forward fuses row i's store pass with row i + 1's load pass: the fused loop touches four float
// rows (two buffers, weight, bias), which must stay in L1.
constexpr int64_t kFuseMaxCols = 1024;

// ---------------------------------------------------------------------------------------------------------------
// Storage types: Half, BF16 and their conversions to_acc / from_acc in float_bits.h.
struct NoRes {};  // the residual type when there is none

template <class T> constexpr DType kDType = DType::kFloat32;
template <> constexpr DType kDType<Half> = DType::kFloat16;
template <> constexpr DType kDType<BF16> = DType::kBFloat16;
template <> constexpr DType kDType<double> = DType::kFloat64;

template <class T>
constexpr bool kHasRes = !std::is_same_v<T, NoRes>;

// ---------------------------------------------------------------------------------------------------------------
// Row passes, portable: plain branch-free loops (auto-vectorised by the compiler), any compute type Acc.
struct Portable {
  // buf = round_s(x + r); s = buf when s is non-null. Returns sum_j buf_j.
  template <class Acc, class TX, class TR, class TS>
  static double fwd_load(const TX* x, const TR* r, TS* s, Acc* buf, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      Acc v = to_acc(x[j]);
      if constexpr (kHasRes<TR>) v += to_acc(r[j]);
      buf[j] = to_acc(from_acc<TS>(v));
    }
    if (s)
      for (int64_t j = 0; j < n; ++j) s[j] = from_acc<TS>(buf[j]);  // exact: buf holds TS values
    return sum<Acc, false>(buf, n, Acc(0));
  }

  // sum_j (a_j - c), or sum_j (a_j - c)^2 when kSquare.
  template <class Acc, bool kSquare>
  static double sum(const Acc* a, int64_t n, Acc c) {
    double total = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      Acc acc[8] = {};
      int64_t j = j0;
      for (; j + 8 <= j1; j += 8)
        for (int k = 0; k < 8; ++k) {
          const Acc d = a[j + k] - c;
          acc[k] += kSquare ? d * d : d;
        }
      Acc t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; j < j1; ++j) {
        const Acc d = a[j] - c;
        t += kSquare ? d * d : d;
      }
      total += t;
    }
    return total;
  }

  // y = (buf - mean) * rstd * w + b
  template <class Acc, class TX>
  static void fwd_store(const Acc* buf, const Acc* w, const Acc* b, Acc mean, Acc rstd, TX* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) y[j] = from_acc<TX>((buf[j] - mean) * rstd * w[j] + b[j]);
  }

  // fwd_store of one row, then fwd_load of the next (into nbuf); returns the next row's sum.
  template <class Acc, class TX, class TR, class TS>
  static double fwd_store_load(const Acc* buf, const Acc* w, const Acc* b, Acc mean, Acc rstd, TX* y, const TX* x,
                               const TR* r, TS* s, Acc* nbuf, int64_t n) {
    fwd_store<Acc, TX>(buf, w, b, mean, rstd, y, n);
    return fwd_load<Acc, TX, TR, TS>(x, r, s, nbuf, n);
  }

  // xh = (s - mean) * rstd, g = dy * w; dw += dy * xh, db += dy; *sg = sum_j g_j, *sgx = sum_j g_j * xh_j.
  template <class Acc, class TS, class TD>
  static void bwd_load(const TS* s, const TD* dy, const Acc* w, Acc mean, Acc rstd, Acc* xh, Acc* g, Acc* dw,
                       Acc* db, int64_t n, double* sg, double* sgx) {
    for (int64_t j = 0; j < n; ++j) {
      const Acc x = (to_acc(s[j]) - mean) * rstd, d = to_acc(dy[j]);
      xh[j] = x;
      g[j] = d * w[j];
      dw[j] += d * x;
      db[j] += d;
    }
    sum_dot(xh, g, n, sg, sgx);
  }

  // sum_j g_j and sum_j g_j * xh_j
  template <class Acc>
  static void sum_dot(const Acc* xh, const Acc* g, int64_t n, double* sg, double* sgx) {
    double t1 = 0, t2 = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      Acc a1[4] = {}, a2[4] = {};
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4)
        for (int k = 0; k < 4; ++k) {
          a1[k] += g[j + k];
          a2[k] += g[j + k] * xh[j + k];
        }
      Acc u1 = (a1[0] + a1[1]) + (a1[2] + a1[3]), u2 = (a2[0] + a2[1]) + (a2[2] + a2[3]);
      for (; j < j1; ++j) {
        u1 += g[j];
        u2 += g[j] * xh[j];
      }
      t1 += u1;
      t2 += u2;
    }
    *sg = t1;
    *sgx = t2;
  }

  static constexpr bool kCanStream = false;  // no non-temporal variant (see Avx2T)
  static constexpr bool kBwdBuffers = true;  // bwd_load fills xh and g for bwd_store
  using Streaming = Portable;
  static void fence() {}

  // dx = rstd * (g - c1 - xh * c2) + ds; dres = the same in float32 when non-null. xh and g come from bwd_load's
  // buffers (the Avx2 passes recompute them from s, dy, w and mean instead).
  template <class Acc, class TD, class TS>
  static void bwd_store(const TS*, const TD*, const Acc*, Acc, const Acc* xh, const Acc* g, const TS* ds, Acc c1,
                        Acc c2, Acc rstd, TD* dx, float* dres, int64_t n) {
    auto dsum = [&](int64_t j) { return rstd * (g[j] - c1 - xh[j] * c2); };
    if (ds) {
      for (int64_t j = 0; j < n; ++j) dx[j] = from_acc<TD>(dsum(j) + to_acc(ds[j]));
      if (dres)
        for (int64_t j = 0; j < n; ++j) dres[j] = float(dsum(j) + to_acc(ds[j]));
    } else {
      for (int64_t j = 0; j < n; ++j) dx[j] = from_acc<TD>(dsum(j));
      if (dres)
        for (int64_t j = 0; j < n; ++j) dres[j] = float(dsum(j));
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Row passes, AVX2/FMA/F16C: 8 float lanes; tails go through zero-padded stack copies. float32 compute only.
#ifdef FA_X86
FA_AVX2 inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
FA_AVX2 inline __m256 ld8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
FA_AVX2 inline __m256 ld8(const BF16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
// bf16 bits (round-to-nearest-even, NaN -> 0x7FC0) in the low halves of the 32-bit lanes.
FA_AVX2 inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
FA_AVX2 inline __m128i half8(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
FA_AVX2 inline __m128i bf16x8(__m256 v) {
  const __m256i r = bf16_bits(v);                           // 16-bit values in 32-bit lanes
  const __m256i packed = _mm256_packus_epi32(r, r);         // per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
FA_AVX2 inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FA_AVX2 inline void st8(Half* p, __m256 v) { _mm_storeu_si128((__m128i*)p, half8(v)); }
FA_AVX2 inline void st8(BF16* p, __m256 v) { _mm_storeu_si128((__m128i*)p, bf16x8(v)); }
// Non-temporal stores of whole vectors; p is aligned to the vector's size.
FA_AVX2 inline void nt8(float* p, __m256 v) { _mm256_stream_ps(p, v); }
FA_AVX2 inline void nt8(Half* p, __m256 v) { _mm_stream_si128((__m128i*)p, half8(v)); }
FA_AVX2 inline void nt8(BF16* p, __m256 v) { _mm_stream_si128((__m128i*)p, bf16x8(v)); }
// Round to T and back.
template <class T>
FA_AVX2 inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, Half>)
    return _mm256_cvtph_ps(half8(v));
  else if constexpr (std::is_same_v<T, BF16>)
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
  else
    return v;
}
// k valid lanes (k >= 8: a full vector)
template <class T>
FA_AVX2_INLINE __m256 ld(const T* p, int64_t k) {
  if (k >= 8) return ld8(p);
  T t[8] = {};
  std::memcpy(t, p, k * sizeof(T));
  return ld8(t);
}
template <class T>
FA_AVX2_INLINE void st(T* p, __m256 v, int64_t k) {
  if (k >= 8) return st8(p, v);
  T t[8];
  st8(t, v);
  std::memcpy(p, t, k * sizeof(T));
}
// An output store: whole vectors bypass the caches when kStream.
template <bool kStream, class T>
FA_AVX2_INLINE void put(T* p, __m256 v, int64_t k) {
  if constexpr (kStream)
    if (k >= 8) return nt8(p, v);
  st(p, v, k);
}
FA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <bool kSquare>
FA_AVX2 inline __m256 accum(__m256 acc, __m256 d) {  // acc + d, or acc + d * d
  return kSquare ? _mm256_fmadd_ps(d, d, acc) : _mm256_add_ps(acc, d);
}

// The interface of Portable, for Acc = float. Main loops take whole vectors; the tail comes once. kStream: the
// outputs (s, y; dx, dres) are written with non-temporal stores; their rows must start on vector boundaries.
template <bool kStream>
struct Avx2T {
  struct NoStore {
    FA_AVX2_INLINE void operator()(int64_t, int64_t) const {}
  };
  static constexpr bool kCanStream = true;
  static constexpr bool kBwdBuffers = false;  // xh and g are recomputed in bwd_store
  using Streaming = Avx2T<true>;
  FA_AVX2 static void fence() {
    if constexpr (kStream) _mm_sfence();  // orders this thread's non-temporal stores before the join
  }

  template <class TX, class TR, class TS>
  FA_AVX2_INLINE static __m256 load_round(const TX* x, const TR* r, TS* s, float* buf, int64_t j, int64_t k) {
    __m256 v = ld(x + j, k);
    if constexpr (kHasRes<TR>) v = _mm256_add_ps(v, ld(r + j, k));
    v = round8<TS>(v);
    if (s) put<kStream>(s + j, v, k);
    st(buf + j, v, k);
    return v;  // zero past k: the padded loads read zeros
  }

  template <class Acc, class TX, class TR, class TS>
  FA_AVX2 static double fwd_load(const TX* x, const TR* r, TS* s, float* buf, int64_t n) {
    return fwd_load_with(x, r, s, buf, n, NoStore{});
  }

  // fwd_load, and per vector j (k lanes) also store(j, k): the previous row's stores, so that this row's loads from
  // memory overlap that row's work.
  template <class TX, class TR, class TS, class Store>
  FA_AVX2_INLINE static double fwd_load_with(const TX* x, const TR* r, TS* s, float* buf, int64_t n, Store store) {
    double total = 0;  // float partial sums over kBlock columns, as in sum()
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int64_t j = j0;
      for (; j + 16 <= j1; j += 16) {
        a0 = _mm256_add_ps(a0, load_round(x, r, s, buf, j, 8));
        a1 = _mm256_add_ps(a1, load_round(x, r, s, buf, j + 8, 8));
        store(j, 8);
        store(j + 8, 8);
      }
      for (; j < j1; j += 8) {
        a0 = _mm256_add_ps(a0, load_round(x, r, s, buf, j, j1 - j));
        store(j, j1 - j);
      }
      total += hsum(_mm256_add_ps(a0, a1));
    }
    return total;
  }

  template <class Acc, bool kSquare>
  FA_AVX2 static double sum(const float* a, int64_t n, float c) {
    const __m256 vc = _mm256_set1_ps(c);
    double total = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t j = j0;
      for (; j + 32 <= j1; j += 32) {
        a0 = accum<kSquare>(a0, _mm256_sub_ps(ld8(a + j), vc));
        a1 = accum<kSquare>(a1, _mm256_sub_ps(ld8(a + j + 8), vc));
        a2 = accum<kSquare>(a2, _mm256_sub_ps(ld8(a + j + 16), vc));
        a3 = accum<kSquare>(a3, _mm256_sub_ps(ld8(a + j + 24), vc));
      }
      for (; j + 8 <= j1; j += 8) a0 = accum<kSquare>(a0, _mm256_sub_ps(ld8(a + j), vc));
      float t = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; j < j1; ++j) {
        const float d = a[j] - c;
        t += kSquare ? d * d : d;
      }
      total += t;
    }
    return total;
  }

  template <class TX>
  FA_AVX2_INLINE static void norm_store(const float* buf, const float* w, const float* b, __m256 vm, __m256 vr,
                                        TX* y, int64_t j, int64_t k) {
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(ld(buf + j, k), vm), vr);
    put<kStream>(y + j, _mm256_fmadd_ps(xh, ld(w + j, k), ld(b + j, k)), k);
  }

  template <class Acc, class TX>
  FA_AVX2 static void fwd_store(const float* buf, const float* w, const float* b, float mean, float rstd, TX* y,
                                int64_t n) {
    const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      norm_store(buf, w, b, vm, vr, y, j, 8);
      norm_store(buf, w, b, vm, vr, y, j + 8, 8);
    }
    for (; j < n; j += 8) norm_store(buf, w, b, vm, vr, y, j, n - j);
  }

  template <class TX>
  struct NormStore {  // norm_store as a fwd_load_with store
    const float *buf, *w, *b;
    __m256 vm, vr;
    TX* y;
    FA_AVX2_INLINE void operator()(int64_t j, int64_t k) const { norm_store(buf, w, b, vm, vr, y, j, k); }
  };

  template <class Acc, class TX, class TR, class TS>
  FA_AVX2 static double fwd_store_load(const float* buf, const float* w, const float* b, float mean, float rstd,
                                       TX* y, const TX* x, const TR* r, TS* s, float* nbuf, int64_t n) {
    const NormStore<TX> store{buf, w, b, _mm256_set1_ps(mean), _mm256_set1_ps(rstd), y};
    return fwd_load_with(x, r, s, nbuf, n, store);
  }

  // One vector of bwd_load; returns g, and xh in *xh_out.
  template <class TS, class TD>
  FA_AVX2_INLINE static __m256 grad_in(const TS* s, const TD* dy, const float* w, __m256 vm, __m256 vr, float* dw,
                                       float* db, int64_t j, int64_t k, __m256* xh_out) {
    const __m256 x = _mm256_mul_ps(_mm256_sub_ps(ld(s + j, k), vm), vr), d = ld(dy + j, k);
    const __m256 gv = _mm256_mul_ps(d, ld(w + j, k));
    st(dw + j, _mm256_fmadd_ps(d, x, ld(dw + j, k)), k);
    st(db + j, _mm256_add_ps(d, ld(db + j, k)), k);
    *xh_out = x;
    return gv;  // zero past k (dy and w read as zeros there)
  }

  // bwd_load without the xh / g buffers: bwd_store recomputes both from s and dy (still in L1/L2), so wide rows keep
  // only w, dw, db in L1.
  template <class Acc, class TS, class TD>
  FA_AVX2 static void bwd_load(const TS* s, const TD* dy, const float* w, float mean, float rstd, float*, float*,
                               float* dw, float* db, int64_t n, double* sg, double* sgx) {
    const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
    double t1 = 0, t2 = 0;  // float partial sums over kBlock columns
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, d0 = s0, d1 = s0, x0, x1;
      int64_t j = j0;
      for (; j + 16 <= j1; j += 16) {
        const __m256 g0 = grad_in(s, dy, w, vm, vr, dw, db, j, 8, &x0);
        const __m256 g1 = grad_in(s, dy, w, vm, vr, dw, db, j + 8, 8, &x1);
        s0 = _mm256_add_ps(s0, g0);
        s1 = _mm256_add_ps(s1, g1);
        d0 = _mm256_fmadd_ps(g0, x0, d0);
        d1 = _mm256_fmadd_ps(g1, x1, d1);
      }
      for (; j < j1; j += 8) {
        const __m256 g0 = grad_in(s, dy, w, vm, vr, dw, db, j, j1 - j, &x0);
        s0 = _mm256_add_ps(s0, g0);
        d0 = _mm256_fmadd_ps(g0, x0, d0);
      }
      t1 += hsum(_mm256_add_ps(s0, s1));
      t2 += hsum(_mm256_add_ps(d0, d1));
    }
    *sg = t1;
    *sgx = t2;
  }

  template <class TD, class TS>
  FA_AVX2_INLINE static void grad_out(const TS* s, const TD* dy, const float* w, __m256 vm, const TS* ds, __m256 v1,
                                      __m256 v2, __m256 vr, TD* dx, float* dres, int64_t j, int64_t k) {
    const __m256 x = _mm256_mul_ps(_mm256_sub_ps(ld(s + j, k), vm), vr);
    __m256 v = _mm256_sub_ps(_mm256_mul_ps(ld(dy + j, k), ld(w + j, k)), v1);
    v = _mm256_mul_ps(vr, _mm256_fnmadd_ps(x, v2, v));
    if (ds) v = _mm256_add_ps(v, ld(ds + j, k));
    put<kStream>(dx + j, v, k);
    if (dres) put<kStream>(dres + j, v, k);
  }

  template <class Acc, class TD, class TS>
  FA_AVX2 static void bwd_store(const TS* s, const TD* dy, const float* w, float mean, const float*, const float*,
                                const TS* ds, float c1, float c2, float rstd, TD* dx, float* dres, int64_t n) {
    const __m256 v1 = _mm256_set1_ps(c1), v2 = _mm256_set1_ps(c2), vr = _mm256_set1_ps(rstd);
    const __m256 vm = _mm256_set1_ps(mean);  // xh = (s - mean) * rstd and g = dy * w again, as in grad_in
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) grad_out(s, dy, w, vm, ds, v1, v2, vr, dx, dres, j, 8);
    if (j < n) grad_out(s, dy, w, vm, ds, v1, v2, vr, dx, dres, j, n - j);
  }
};
using Avx2 = Avx2T<false>;
#endif  // FA_X86

// ---------------------------------------------------------------------------------------------------------------
// Row loops (OpenMP over rows) and dtype dispatch.
inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int num_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}
// This thread's rows [i0, i1) of M, in contiguous blocks (like schedule(static)).
inline std::pair<int64_t, int64_t> thread_rows(int64_t M) {
  const int64_t t = thread_num(), nt = num_threads();
  return {M * t / nt, M * (t + 1) / nt};
}

template <class Ops, class Acc, class TX, class TR, class TS>
void fwd_rows(const AddNormFwdParams& p, const Acc* w, const Acc* b) {
  const int64_t M = p.rows, N = p.cols;
  const auto* x = static_cast<const TX*>(p.x);
  const auto* r = static_cast<const TR*>(p.residual);
  auto* s = static_cast<TS*>(p.s);
  auto* y = static_cast<TX*>(p.y);
  auto* mean_out = static_cast<Acc*>(p.mean);
  auto* rstd_out = static_cast<Acc*>(p.rstd);
  const Acc eps = static_cast<Acc>(p.eps);
#pragma omp parallel num_threads(p.num_threads) if (M > 1 && M * N >= kParallelMin)
  {
    // Each thread takes a contiguous block of rows; row i's store pass also loads row i + 1 (fwd_store_load).
    std::vector<Acc> bufs(N <= kFuseMaxCols ? 2 * N : N);  // the second row only when fused
    Acc* buf = bufs.data();
    Acc* next = buf + N;
    const auto [i0, i1] = thread_rows(M);
    double total = 0;
    if (i0 < i1) {
      const int64_t o = i0 * N;
      total = Ops::template fwd_load<Acc, TX, TR, TS>(x + o, r ? r + o : r, s ? s + o : s, buf, N);
    }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = i * N;
      Acc mean = 0;
      if (!p.is_rms) {
        mean = Acc(total / N);
        mean_out[i] = mean;
      }
      const Acc var = Acc(Ops::template sum<Acc, true>(buf, N, mean) / N);  // mean square for RMS
      const Acc rstd = Acc(1) / std::sqrt(var + eps);
      rstd_out[i] = rstd;
      const int64_t on = o + N;
      if (i + 1 < i1 && N <= kFuseMaxCols) {
        total = Ops::template fwd_store_load<Acc, TX, TR, TS>(buf, w, b, mean, rstd, y + o, x + on, r ? r + on : r,
                                                             s ? s + on : s, next, N);
        std::swap(buf, next);
      } else {
        Ops::template fwd_store<Acc, TX>(buf, w, b, mean, rstd, y + o, N);
        if (i + 1 < i1)
          total = Ops::template fwd_load<Acc, TX, TR, TS>(x + on, r ? r + on : r, s ? s + on : s, buf, N);
      }
    }
    Ops::fence();
  }
}

template <class Ops, class Acc, class TD, class TS>
void bwd_rows(const AddNormBwdParams& p, const Acc* w) {
  const int64_t M = p.rows, N = p.cols;
  const auto* dy = static_cast<const TD*>(p.dy);
  const auto* s = static_cast<const TS*>(p.s);
  const auto* ds = static_cast<const TS*>(p.ds);
  const auto* mean = static_cast<const Acc*>(p.mean);
  const auto* rstd = static_cast<const Acc*>(p.rstd);
  auto* dx = static_cast<TD*>(p.dx);
  auto* dres = static_cast<float*>(p.dres);
  // Per-thread [dweight | dbias] partial sums, rows padded to whole cache lines; reduced below in thread order.
  const int nt = std::max(1, p.num_threads);
  const int64_t stride = (2 * N + 15) / 16 * 16;
  std::vector<Acc> part(nt * stride, Acc(0));
#pragma omp parallel num_threads(nt) if (M > 1 && M * N >= kParallelMin)
  {
    Acc* dw = part.data() + thread_num() * stride;
    Acc* db = dw + N;
    std::vector<Acc> xh(Ops::kBwdBuffers ? N : 0), g(Ops::kBwdBuffers ? N : 0);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < M; ++i) {
      const int64_t o = i * N;
      const Acc mu = p.is_rms ? Acc(0) : mean[i], rs = rstd[i];
      double sg, sgx;
      Ops::template bwd_load<Acc, TS, TD>(s + o, dy + o, w, mu, rs, xh.data(), g.data(), dw, db, N, &sg, &sgx);
      const Acc c1 = p.is_rms ? Acc(0) : Acc(sg / N), c2 = Acc(sgx / N);
      Ops::template bwd_store<Acc, TD, TS>(s + o, dy + o, w, mu, xh.data(), g.data(), ds ? ds + o : ds, c1, c2, rs,
                                           dx + o, dres ? dres + o : dres, N);
    }
    Ops::fence();
  }
  auto* dw_out = static_cast<Acc*>(p.dweight);
  auto* db_out = static_cast<Acc*>(p.dbias);
  if (!dw_out && !db_out) return;
#pragma omp parallel for num_threads(nt) schedule(static) if (N * nt >= kParallelMin)
  for (int64_t j = 0; j < N; ++j) {
    Acc a = 0, c = 0;
    for (int t = 0; t < nt; ++t) {
      a += part[t * stride + j];
      c += part[t * stride + N + j];
    }
    if (dw_out) dw_out[j] = a;
    if (db_out) db_out[j] = c;
  }
}

// Calls f(T{}) for the storage type T of dtype t.
template <class F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(Half{});
    case DType::kBFloat16: return f(BF16{});
    case DType::kFloat64: return f(double{});
  }
}
// x types of compute type Acc: float64 alone, or the three 32/16-bit types.
template <class Acc, class F>
void with_x_type(DType t, F&& f) {
  if constexpr (std::is_same_v<Acc, double>) f(double{});
  else if (t == DType::kFloat16) f(Half{});
  else if (t == DType::kBFloat16) f(BF16{});
  else f(float{});
}
// The two dtypes an auxiliary tensor may have: the x type A or float32.
template <class A, class F>
void with_a_or_float(DType t, F&& f) {
  if (t == kDType<A>) f(A{});
  else f(float{});
}

template <class Acc>
std::vector<Acc> param_vector(const void* p, DType t, int64_t n, Acc fill) {  // weight/bias in Acc (fill if absent)
  std::vector<Acc> v(n, fill);
  if (p) with_type(t, [&](auto tag) {
      const auto* q = static_cast<const decltype(tag)*>(p);
      for (int64_t j = 0; j < n; ++j) v[j] = Acc(to_acc(q[j]));
    });
  return v;
}

// Whether a call moving `bytes` writes its outputs non-temporally (Ops::Streaming): large enough, and every output
// (T, at p, nullptr when absent) has its rows of n elements start on 8-element vector boundaries.
template <class T>
bool rows_aligned(const void* p, int64_t n) {
  return !p || (reinterpret_cast<uintptr_t>(p) % (8 * sizeof(T)) == 0 && n % 8 == 0);
}
template <class Ops>
bool streams(int64_t bytes, bool aligned) {
  return Ops::kCanStream && aligned && bytes >= cpu_stream_min_bytes();
}

template <class Ops, class Acc>
constexpr bool kOpsFits = std::is_same_v<Ops, Portable> || std::is_same_v<Acc, float>;

template <class Ops, class Acc>
void fwd_typed(const AddNormFwdParams& p) {
  if constexpr (kOpsFits<Ops, Acc>) {
    const std::vector<Acc> w = param_vector<Acc>(p.weight, p.weight_dtype, p.cols, Acc(1));
    const std::vector<Acc> b = param_vector<Acc>(p.bias, p.bias_dtype, p.cols, Acc(0));
    with_x_type<Acc>(p.x_dtype, [&](auto tx) {
      using TX = decltype(tx);
      with_a_or_float<TX>(p.s_dtype, [&](auto ts) {
        using TS = decltype(ts);
        auto run = [&](auto tr) {
          using TR = decltype(tr);
          const int64_t row_bytes = 2 * sizeof(TX) + (kHasRes<TR> ? sizeof(TR) : 0) + (p.s ? sizeof(TS) : 0);
          if (streams<Ops>(p.rows * p.cols * row_bytes, rows_aligned<TX>(p.y, p.cols) && rows_aligned<TS>(p.s, p.cols)))
            fwd_rows<typename Ops::Streaming, Acc, TX, TR, TS>(p, w.data(), b.data());
          else
            fwd_rows<Ops, Acc, TX, TR, TS>(p, w.data(), b.data());
        };
        if (p.residual) with_a_or_float<TX>(p.residual_dtype, run);
        else run(NoRes{});
      });
    });
  }
}

template <class Ops, class Acc>
void bwd_typed(const AddNormBwdParams& p) {
  if constexpr (kOpsFits<Ops, Acc>) {
    const std::vector<Acc> w = param_vector<Acc>(p.weight, p.weight_dtype, p.cols, Acc(1));
    with_x_type<Acc>(p.dy_dtype, [&](auto td) {
      using TD = decltype(td);
      with_a_or_float<TD>(p.s_dtype, [&](auto ts) {
        using TS = decltype(ts);
        const int64_t row_bytes = 2 * sizeof(TD) + sizeof(TS) * (p.ds ? 2 : 1) + (p.dres ? sizeof(float) : 0);
        if (streams<Ops>(p.rows * p.cols * row_bytes, rows_aligned<TD>(p.dx, p.cols) &&
                                                        rows_aligned<float>(p.dres, p.cols)))
          bwd_rows<typename Ops::Streaming, Acc, TD, TS>(p, w.data());
        else
          bwd_rows<Ops, Acc, TD, TS>(p, w.data());
      });
    });
  }
}

}  // namespace

void add_norm_fwd(const AddNormFwdParams& p) {
  if (p.rows == 0) return;
  if (p.x_dtype == DType::kFloat64) return fwd_typed<Portable, double>(p);
#ifdef FA_X86
  if (cpu_use_avx2()) return fwd_typed<Avx2, float>(p);
#endif
  fwd_typed<Portable, float>(p);
}

void add_norm_bwd(const AddNormBwdParams& p) {  // also for M == 0: dweight/dbias are then zeros
  if (p.dy_dtype == DType::kFloat64) return bwd_typed<Portable, double>(p);
#ifdef FA_X86
  if (cpu_use_avx2()) return bwd_typed<Avx2, float>(p);
#endif
  bwd_typed<Portable, float>(p);
}

}  // namespace cpu
}  // namespace fastattn
