// CPU split-KV decode attention (flash-decoding): a few query rows per sequence against a long KV cache.
//
// Work items: (batch, kv head, split of the sequence's keys), OpenMP dynamic schedule. An item holds the
//   M = G * L query rows of its kv head's GQA group (G query heads x L queries) in float32, pre-scaled to base 2,
//   and walks its keys in blocks of kDecodeBlock: scores by dot products with the K rows (one pass over K and V for
//   the whole group: no repeated K/V), softcap, key mask and bottom-right causal bound, then an online softmax
//   (running max and sum in base 2) and O += P V. K / V rows are read in place when they are float32 with a head dim
//   that is a multiple of the vector width, else widened block by block into small buffers. Keys past a
//   sequence's length are never read; a block whose keys are all masked is skipped (a static cache's unwritten
//   slots cost nothing), and the V rows of masked keys are never read into the result.
// Splits: only when the (batch, kv head) groups are too few to keep the threads busy (< 4 per thread); each split
//   writes its normalised partial output and base-2 logsumexp, and a second pass combines the splits of each row
//   by their logsumexps. With one split the items write the output directly.
// Kernel sets (chosen once at run time, as the attention's): AVX-512F (16 lanes), AVX2/FMA/F16C (8 lanes), portable
//   (one lane): the same body, decode_keys-inl.h, compiled for each. FASTATTN_CPU_NO_AVX512=1 and
//   FASTATTN_CPU_NO_AVX2=1 force the lower ones.
#include "decode_kernel.h"

#include "cpu_features.h"
#include "float_bits.h"
#include "kernel_util.h"
#include "simd.h"
#include "vec_math.h"
#include "vec_traits.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kDecodeBlock = 128;    // keys per block (their K and V rows stay in L1)
constexpr int64_t kMinSplitKeys = 256;   // keys per split, at least
constexpr double kLog2e = 1.44269504088896340736;
constexpr double kLn2 = 0.69314718055994530942;

// One work item's keys: [j0, j1) of a sequence of len keys, for the M rows of one (batch, kv head).
struct DecodeJob {
  int64_t M = 0, L = 0, E = 0, Ev = 0, j0 = 0, j1 = 0, len = 0;
  const void* k = nullptr;  // this (batch, kv head)'s K rows (key 0), row stride sk
  const void* v = nullptr;
  int64_t sk = 0, sv = 0;
  const uint8_t* keep = nullptr;  // this sequence's key mask (key 0), stride keep_stride, or nullptr
  int64_t keep_stride = 0;
  bool causal = false;
  float cap2 = 0.0f;  // softcap * log2(e) when capping (the scores are then tanh of the pre-scaled dot products)
};

// ---- the portable kernel set: one lane ------------------------------------------------------------------------
namespace portable {
inline float vexp2(float x) { return std::exp2(x); }
inline float vtanh(float x) { return std::tanh(x); }
inline void reduce8(const float* a, float* dst) { std::copy(a, a + 8, dst); }
template <class In>
inline void widen(const In* src, int64_t n, float* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = to_acc(src[e]);
}
#include "decode_keys-inl.h"
}  // namespace portable

#ifdef FA_X86
// ---- the x86 kernel sets: the helpers decode_keys-inl.h needs, then the body once per ISA ----------------------
namespace avx2 {
FA_AVX2_BEGIN
FA_INLINE Vec::F vexp2(Vec::F x) { return exp2_ps<true>(x); }
FA_INLINE Vec::F vtanh(Vec::F x) { return tanh_ps(x); }
// dst[t] = the sum of a[t]'s lanes, t < 8
FA_INLINE void reduce8(const __m256* a, float* dst) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31)));
}
template <class In>
FA_INLINE void widen(const In* src, int64_t n, float* dst) {
  int64_t e = 0;
  if constexpr (std::is_same_v<In, Half>) {
    for (; e + 8 <= n; e += 8)
      _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e))));
  } else if constexpr (std::is_same_v<In, BF16>) {
    for (; e + 8 <= n; e += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e)));
      _mm256_storeu_ps(dst + e, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
  for (; e < n; ++e) dst[e] = to_acc(src[e]);
}
FA_TARGET_END
}  // namespace avx2

namespace avx512 {
FA_AVX512_BEGIN
FA_INLINE Vec::F vexp2(Vec::F x) { return exp2_512(x); }
FA_INLINE Vec::F vtanh(Vec::F x) {  // the 8-lane tanh on each half
  const __m256 lo = tanh_ps(_mm512_castps512_ps256(x));
  const __m256 hi = tanh_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
FA_INLINE void reduce8(const __m512* a, float* dst) {  // halves added, then the 8-lane tree
  __m256 h[8];
  for (int t = 0; t < 8; ++t) h[t] = _mm256_add_ps(_mm512_castps512_ps256(a[t]), Vec::high_half(a[t]));
  avx2::reduce8(h, dst);
}
template <class In>
FA_INLINE void widen(const In* src, int64_t n, float* dst) {
  int64_t e = 0;
  if constexpr (std::is_same_v<In, Half>) {
    for (; e + 16 <= n; e += 16)
      _mm512_storeu_ps(dst + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + e))));
  } else if constexpr (std::is_same_v<In, BF16>) {
    for (; e + 16 <= n; e += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + e)));
      _mm512_storeu_ps(dst + e, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  }
  for (; e < n; ++e) dst[e] = to_acc(src[e]);
}
FA_TARGET_END
}  // namespace avx512

#define FA_ISA_INCLUDE "decode_keys-inl.h"  // avx2::decode_keys, avx512::decode_keys
#include "foreach_isa.h"
#endif  // FA_X86

using KeysFn = void (*)(const DecodeJob&, const float*, float*, float*, float*, float*, float*, float*, uint8_t*);

// The schedule, for input storage type In and one kernel set (keys, of vector width W).
template <class In>
void run(const DecodeArgs& a, KeysFn keys, int64_t W) {
  const int64_t B = a.B, H = a.H, Hk = a.Hk, L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  if (B == 0 || H == 0 || L == 0) return;
  const int64_t G = H / Hk, M = G * L, Dp = round_up(E, W), Dvp = round_up(Ev, W);
  const int nt = std::max(1, a.num_threads);
  std::vector<int64_t> len(size_t(B), S);
  if (a.seqlens)
    for (int64_t b = 0; b < B; ++b) len[b] = std::min<int64_t>(S, std::max<int64_t>(0, a.seqlens[b]));
  const int64_t max_len = *std::max_element(len.begin(), len.end());
  const int64_t groups = B * Hk;
  int64_t nsplit = 1;
  if (groups < 4 * nt) nsplit = std::max<int64_t>(1, std::min(cdiv(4 * nt, groups), cdiv(max_len, kMinSplitKeys)));
  const int64_t items = groups * nsplit;
  const bool cap = a.softcap > 0;
  const float alpha_s = float(cap ? a.scale / a.softcap : a.scale * kLog2e);
  const float cap2 = cap ? float(a.softcap * kLog2e) : 0.0f;
  const int64_t per = round_up(M * Dp + M * Dvp + 2 * M + M * kDecodeBlock + kDecodeBlock * (Dp + Dvp), 16);
  ABuf<float> scratch(nt * per);
  ABuf<uint8_t> masks(nt * kDecodeBlock);
  ABuf<float> part_o(nsplit > 1 ? items * M * Ev : 0), part_lse(nsplit > 1 ? items * M : 0);
  In* out = static_cast<In*>(a.out);
#pragma omp parallel num_threads(nt) if (nt > 1 && items * M > 1)
  {
    const int tid = thread_id();
    float* q = scratch.get() + tid * per;
    float* o = q + M * Dp;
    float* m = o + M * Dvp;
    float* l = m + M;
    float* s = l + M;
    float* kbuf = s + M * kDecodeBlock;
    float* vbuf = kbuf + kDecodeBlock * Dp;
    uint8_t* km = masks.get() + tid * kDecodeBlock;
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < items; ++idx) {
      const int64_t grp = idx / nsplit, sp = idx % nsplit, b = grp / Hk, kvh = grp % Hk;
      const int64_t chunk = round_up(cdiv(len[b], nsplit), kDecodeBlock);
      const int64_t j0 = std::min(len[b], sp * chunk), j1 = std::min(len[b], j0 + chunk);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < L; ++i) {
          const In* src = static_cast<const In*>(a.q.data) + b * a.q.stride[0] + (kvh * G + g) * a.q.stride[1] +
                          i * a.q.stride[2];
          float* dst = q + (g * L + i) * Dp;
          for (int64_t e = 0; e < E; ++e) dst[e] = to_acc(src[e]) * alpha_s;
          std::fill(dst + E, dst + Dp, 0.0f);
        }
      std::fill(o, o + M * Dvp, 0.0f);
      std::fill(m, m + M, -std::numeric_limits<float>::infinity());
      std::fill(l, l + M, 0.0f);
      if (j0 < j1) {
        DecodeJob J;
        J.M = M; J.L = L; J.E = E; J.Ev = Ev; J.j0 = j0; J.j1 = j1; J.len = len[b];
        J.k = static_cast<const In*>(a.k.data) + b * a.k.stride[0] + kvh * a.k.stride[1];
        J.v = static_cast<const In*>(a.v.data) + b * a.v.stride[0] + kvh * a.v.stride[1];
        J.sk = a.k.stride[2];
        J.sv = a.v.stride[2];
        if (a.keep) {
          J.keep = a.keep + b * a.keep_stride[0];
          J.keep_stride = a.keep_stride[1];
        }
        J.causal = a.causal;
        J.cap2 = cap2;
        keys(J, q, o, m, l, s, kbuf, vbuf, km);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t h = kvh * G + r / L, i = r % L;
        const bool empty = l[r] == 0;  // (a NaN sum is no empty row: NaN out and lse)
        const float inv = empty ? 0.0f : 1.0f / l[r];
        const float* orow = o + r * Dvp;
        if (nsplit == 1) {
          In* dst = out + ((b * H + h) * L + i) * Ev;
          for (int64_t e = 0; e < Ev; ++e) dst[e] = from_acc<In>(orow[e] * inv);
          a.lse[(b * H + h) * L + i] = empty ? std::numeric_limits<float>::infinity()
                                             : float((double(m[r]) + std::log2(double(l[r]))) * kLn2);
        } else {
          float* dst = part_o.get() + (idx * M + r) * Ev;
          for (int64_t e = 0; e < Ev; ++e) dst[e] = orow[e] * inv;
          part_lse.get()[idx * M + r] = empty ? -std::numeric_limits<float>::infinity()
                                              : float(double(m[r]) + std::log2(double(l[r])));
        }
      }
    }
    if (nsplit > 1) {  // combine the splits of each row by their (base-2) logsumexps
#pragma omp for schedule(static)
      for (int64_t row = 0; row < groups * M; ++row) {
        const int64_t grp = row / M, r = row % M, b = grp / Hk, kvh = grp % Hk;
        const int64_t h = kvh * G + r / L, i = r % L;
        const float* pl = part_lse.get() + grp * nsplit * M + r;  // split sp at pl[sp * M]
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t sp = 0; sp < nsplit; ++sp)  // (a NaN split makes the row NaN)
          mx = pl[sp * M] != pl[sp * M] ? pl[sp * M] : std::max(mx, pl[sp * M]);
        In* dst = out + ((b * H + h) * L + i) * Ev;
        float* lse = a.lse + (b * H + h) * L + i;
        if (mx == -std::numeric_limits<float>::infinity()) {
          for (int64_t e = 0; e < Ev; ++e) dst[e] = from_acc<In>(0.0f);
          *lse = std::numeric_limits<float>::infinity();
          continue;
        }
        float* acc = o;  // this thread's buffer, free now
        std::fill(acc, acc + Ev, 0.0f);
        double wsum = 0;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          if (pl[sp * M] == -std::numeric_limits<float>::infinity()) continue;  // an empty split: never read
          const float w = std::exp2(pl[sp * M] - mx);
          wsum += w;
          const float* po = part_o.get() + ((grp * nsplit + sp) * M + r) * Ev;
          for (int64_t e = 0; e < Ev; ++e) acc[e] += w * po[e];
        }
        const float inv = float(1.0 / wsum);
        for (int64_t e = 0; e < Ev; ++e) dst[e] = from_acc<In>(acc[e] * inv);
        *lse = float((double(mx) + std::log2(wsum)) * kLn2);
      }
    }
  }
}

template <class In>
void dispatch(const DecodeArgs& a) {
#ifdef FA_X86
  if (cpu_use_avx512()) return run<In>(a, &avx512::decode_keys<In>, avx512::Vec::W);
  if (cpu_use_avx2()) return run<In>(a, &avx2::decode_keys<In>, avx2::Vec::W);
#endif
  run<In>(a, &portable::decode_keys<In>, portable::Vec::W);
}

}  // namespace

void decode_attention(const DecodeArgs& a) {
  switch (a.dtype) {
    case AttnDType::kFloat32: return dispatch<float>(a);
    case AttnDType::kFloat16: return dispatch<Half>(a);
    case AttnDType::kBFloat16: return dispatch<BF16>(a);
    default: return;  // refused by the binding
  }
}

}  // namespace cpu
}  // namespace fastattn
