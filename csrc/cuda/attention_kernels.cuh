// Flash attention kernels (FlashAttention-2 style, mma.sync m16n8k16 on tensor cores, sm80+ PTX), shared by
// attention_fwd.cu and attention_bwd.cu. Torch-free. Included by exactly those translation units (and by the host
// emulation test, which defines FASTATTN_ATTN_HOST_EMULATION and provides the warp primitives).
//
// Every CTA has 4 warps (128 threads); each warp owns 16 rows of the CTA's tile and never shares them, so all
// softmax statistics and accumulators stay inside one warp (reductions: 2 shuffles over the 4 lanes of a row).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16; g = lane / 4, t = lane % 4):
//   A (16x16, row):  reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8, col):   reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8, f32):   c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// so the C fragments of two adjacent 8-column tiles, rounded to 16 bits, are exactly the A fragment of the
// 16-column chunk they form (P and dS are fed back into the next mma without going through shared memory).
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; lane l receives M_i[l/4][2(l%4)..+1] in
// reg i (.trans: M_i[2(l%4)..+1][l/4]). Address patterns used here (r8 = lane % 8):
//   "A pattern": row = r8 + 8 * ((lane >> 3) & 1), col = 8 * (lane >> 4)
//      non-trans on a row-major [m][k] tile -> A fragment; .trans on a row-major [k][n] tile -> B fragments of
//      n-tiles n0 (regs 0, 1) and n0 + 8 (regs 2, 3)
//   "B pattern": row = r8 + 8 * (lane >> 4), col = 8 * ((lane >> 3) & 1)
//      non-trans on a row-major [n][k] tile (B^T) -> B fragments of n-tiles n0 (regs 0, 1) and n0 + 8 (regs 2, 3)
//
// Shared memory tiles are row-major with rows padded by 8 elements (16 bytes): the 8 row addresses of every
// ldmatrix phase then fall in 8 distinct 16-byte bank groups for D = 32, 64, 128 (row pitch 80, 144, 272 bytes).
// Global -> shared copies are 16-byte cp.async (rows past the end are zero-filled, never read).
//
// Configurations (all 128 threads, fp32 accumulation, P / dS rounded to the input dtype for the second mma):
//   forward   CTA = 64 queries x one head; key blocks of 64, K/V double-buffered; Q fragments in registers;
//             online softmax in exp2 units; smem (64 + 4 * 64) rows: 25 / 46 / 87 KB for D = 32 / 64 / 128
//   dK/dV     CTA = 64 keys x one K/V head; loops over the GQA group's heads x query blocks of 64 (32 for
//             D = 128), Q / dO / lse / delta double-buffered; dK, dV accumulate in registers
//   dQ        CTA = 64 queries x one head; key blocks of 64 (32 for D = 128); Q, dO fragments in registers
//   delta     rowsum(dout * out) in fp32, D / 8 threads per row
// Causal: key blocks past the diagonal are skipped, element masks run only on blocks that need them (diagonal,
// tails, bool mask). Forward and dQ CTAs run in reverse query-block order (the longest causal rows first).
#pragma once

#include "attention.h"

#ifndef FASTATTN_ATTN_HOST_EMULATION
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastattn {
namespace attention_cuda {
namespace detail {

constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;        // smem row padding (elements)
constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Cfg {
  static_assert(D == 32 || D == 64 || D == 128, "head dim");
  static constexpr int kRow = D + kPad;  // smem row pitch (elements)
  static constexpr int kFwdBM = 64;      // queries per forward CTA (16 per warp)
  static constexpr int kFwdBN = 64;      // keys per forward step
  static constexpr int kBwdBlock = 64;   // keys per dK/dV CTA, queries per dQ CTA (16 per warp)
  // queries per step of the dK/dV loop and keys per step of the dQ loop: 32 for D = 128 keeps the two fp32
  // accumulators (dK and dV, 2 x 64 registers per thread) plus the step's S / dP tiles under 255 registers
  static constexpr int kBwdInner = D == 128 ? 32 : 64;
};

// ------------------------------------------------------------------------------------------------ primitives
#ifdef FASTATTN_ATTN_HOST_EMULATION
// The emulator (included first) defines emu_* with the semantics of the PTX instructions below.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gsrc, bool pred) {
  emu_cp_async_16(smem_dst, gsrc, pred);
}
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { emu_cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { emu_ldmatrix_x4(r, p, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { emu_ldmatrix_x4(r, p, true); }
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma16816(d, a, b0, b1, sizeof(T) == 2 && !std::is_same<T, __half>::value);
}
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
  } else {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronously; pred false zero-fills the 16 bytes without reading gsrc.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gsrc, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gsrc),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
// d += A (16x16) * B (16x8), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
// Two floats -> a 32-bit register of two 16-bit values (lo in the low half), round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}
#endif

template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t bits16) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16 & 0xFFFFu)));
  } else {
    return __uint_as_float((bits16 & 0xFFFFu) << 16);
  }
}

// ldmatrix lane addresses (see the header comment) into a padded row-major tile of pitch RS elements.
template <int RS, typename T>
__device__ __forceinline__ const T* addr_a(const T* tile, int row0, int col0, int lane) {
  return tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * RS + col0 + (lane >> 4) * 8;
}
template <int RS, typename T>
__device__ __forceinline__ const T* addr_b(const T* tile, int row0, int col0, int lane) {
  return tile + (row0 + (lane & 7) + (lane >> 4) * 8) * RS + col0 + ((lane >> 3) & 1) * 8;
}

// Copy rows [0, ROWS) of a (rows x D) global tile (row pitch gstride elements) into shared memory (pitch D + kPad),
// zero-filling rows >= rows_valid. `safe` is any valid global address (passed instead of out-of-range rows).
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t gstride, int64_t rows_valid, const T* safe,
                                          int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks split evenly over the CTA");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int c = it * kThreads + tid;
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < rows_valid;
    cp_async_16(s + r * (D + kPad) + ch * 8, ok ? g + r * gstride + ch * 8 : safe, ok);
  }
}

// Whether key j takes part in query row i (j < S is checked by the callers' tail logic too; the mask is only read
// for i < L, j < S).
template <bool kCausal, bool kHasMask>
__device__ __forceinline__ bool visible(const AttnMask& mk, int L, int S, int64_t diag, int b, int h, int i, int j) {
  if (j >= S) return false;
  if (kCausal && static_cast<int64_t>(j) > static_cast<int64_t>(i) + diag) return false;
  if (kHasMask) {
    if (i >= L) return false;
    return mk.ptr[b * mk.sb + h * mk.sh + static_cast<int64_t>(i) * mk.sl + static_cast<int64_t>(j) * mk.ss] != 0;
  }
  return true;
}

// Number of key blocks of size BN that query rows [row0, row_end) need (causal: up to the last row's diagonal).
template <bool kCausal, int BN>
__device__ __forceinline__ int key_blocks(int row0, int row_end, int S, int64_t diag) {
  int n = (S + BN - 1) / BN;
  if (kCausal) {
    const int64_t last_key = static_cast<int64_t>(row_end) - 1 + diag;
    if (last_key < 0) return 0;
    const int64_t lim = last_key / BN + 1;
    if (lim < n) n = static_cast<int>(lim);
  }
  return n;
}

__device__ __forceinline__ float fix_lse_log2(float lse) {
  // +inf (and -inf, the public convention) mark rows with no key: P = exp2(x - inf) = 0 for them
  return (lse == -kInf) ? kInf : lse * kLog2e;
}

// ================================================================================================ forward
template <typename T, int D>
constexpr int fwd_smem_bytes() {
  return (Cfg<D>::kFwdBM + 4 * Cfg<D>::kFwdBN) * Cfg<D>::kRow * static_cast<int>(sizeof(T));
}

// grid (ceil(L / 64), H, B), 128 threads. smem: Q [64][RS], K [2][64][RS], V [2][64][RS].
template <typename T, int D, bool kCausal, bool kHasMask>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnFwdParams p) {
  using C = Cfg<D>;
  constexpr int BM = C::kFwdBM, BN = C::kFwdBN, RS = C::kRow;
#ifdef FASTATTN_ATTN_HOST_EMULATION
  unsigned char* smem = emu_dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * RS;
  T* sV = sK + 2 * BN * RS;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);  // heavy (causal) first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.H / p.Hk);
  const int row0 = m_block * BM;
  const int L = p.L, S = p.S;

  const T* qg = static_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh;
  const T* kg = static_cast<const T*>(p.k.ptr) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.ptr) + b * p.v.sb + hk * p.v.sh;
  T* og = static_cast<T*>(p.out.ptr) + b * p.out.sb + h * p.out.sh;
  float* lseg = p.lse + (static_cast<int64_t>(b) * p.H + h) * L;

  const int row_end = row0 + BM < L ? row0 + BM : L;
  const int n_blocks = key_blocks<kCausal, BN>(row0, row_end, S, p.diag_offset);

  load_tile<T, BM, D>(sQ, qg + static_cast<int64_t>(row0) * p.q.sr, p.q.sr, L - row0, qg, tid);
  if (n_blocks > 0) {
    load_tile<T, BN, D>(sK, kg, p.k.sr, S, kg, tid);
    load_tile<T, BN, D>(sV, vg, p.v.sr, S, vg, tid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], addr_a<RS>(sQ, warp * 16, kk * 16, lane));

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-kInf, -kInf};
  float l_run[2] = {0.f, 0.f};  // this lane's partial row sums
  const float sl2 = p.scale * kLog2e;

  for (int n = 0; n < n_blocks; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_blocks) {
      const int64_t k1 = static_cast<int64_t>(n + 1) * BN;
      load_tile<T, BN, D>(sK + (buf ^ 1) * BN * RS, kg + k1 * p.k.sr, p.k.sr, S - k1, kg, tid);
      load_tile<T, BN, D>(sV + (buf ^ 1) * BN * RS, vg + k1 * p.v.sr, p.v.sr, S - k1, vg, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // block n's tiles have landed (block n + 1's may still be in flight)
    __syncthreads();
    const T* sKb = sK + buf * BN * RS;
    const T* sVb = sV + buf * BN * RS;

    // S = Q K^T (16 x 64 per warp)
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int pp = 0; pp < BN / 16; ++pp) {
        uint32_t bb[4];
        ldsm_x4(bb, addr_b<RS>(sKb, pp * 16, kk * 16, lane));
        mma16816<T>(s[2 * pp], qf[kk], bb[0], bb[1]);
        mma16816<T>(s[2 * pp + 1], qf[kk], bb[2], bb[3]);
      }
    }

    // scale (log2 units) and mask
    const int key0 = n * BN;
    const bool need_mask = kHasMask || key0 + BN > S ||
                           (kCausal && static_cast<int64_t>(key0) + BN - 1 > static_cast<int64_t>(row0) + p.diag_offset);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= sl2;
    if (need_mask) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + warp * 16 + g + (e >> 1) * 8;
          const int j = key0 + nt * 8 + 2 * t + (e & 1);
          if (!visible<kCausal, kHasMask>(p.mask, L, S, p.diag_offset, b, h, i, j)) s[nt][e] = -kInf;
        }
    }

    // online softmax (rows g and g + 8 of the warp's 16)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -kInf ? 0.f : m_new;  // a row with no key yet: exp2(-inf - 0) = 0
      const float corr = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= corr;
        o[dt][2 * r + 1] *= corr;
      }
    }

    // O += P V (P straight from the S fragments)
#pragma unroll
    for (int kq = 0; kq < BN / 16; ++kq) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kq][0], s[2 * kq][1]);
      a[1] = pack2<T>(s[2 * kq][2], s[2 * kq][3]);
      a[2] = pack2<T>(s[2 * kq + 1][0], s[2 * kq + 1][1]);
      a[3] = pack2<T>(s[2 * kq + 1][2], s[2 * kq + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, addr_a<RS>(sVb, kq * 16, dp * 16, lane));
        mma16816<T>(o[2 * dp], a, bb[0], bb[1]);
        mma16816<T>(o[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with buffer `buf` before the next step refills it
  }

  // epilogue: normalise, store O and lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const float inv = l != 0.f ? 1.f / l : 0.f;  // a NaN sum (NaN scores) stays NaN, lse too
    const int i = row0 + warp * 16 + g + r * 8;
    if (i < L) {
      T* orow = og + static_cast<int64_t>(i) * p.out.sr;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      }
      if (t == 0) lseg[i] = l != 0.f ? m_run[r] * kLn2 + logf(l) : kInf;
    }
  }
}

// ================================================================================================ backward
// delta[b, h, i] = sum_d dout[i, d] * out[i, d] (fp32). grid (ceil(L / rows per block), H, B), 256 threads:
// D / 8 threads per row, 16 bytes each.
constexpr int kDeltaThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kDeltaThreads) attn_bwd_delta_kernel(const AttnBwdParams p) {
  constexpr int TPR = D / 8;
  constexpr int RPB = kDeltaThreads / TPR;
  const int tid = threadIdx.x;
  const int r = tid / TPR, c = tid % TPR;
  const int h = blockIdx.y, b = blockIdx.z;
  const int i = blockIdx.x * RPB + r;
  float acc = 0.f;
  if (i < p.L) {
    const T* dor = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + h * p.dout.sh +
                   static_cast<int64_t>(i) * p.dout.sr + c * 8;
    const T* orow = static_cast<const T*>(p.out.ptr) + b * p.out.sb + h * p.out.sh +
                    static_cast<int64_t>(i) * p.out.sr + c * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(dor);
    const uint4 y = *reinterpret_cast<const uint4*>(orow);
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
    const uint32_t ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      acc += bits_to_float<T>(xs[w]) * bits_to_float<T>(ys[w]);
      acc += bits_to_float<T>(xs[w] >> 16) * bits_to_float<T>(ys[w] >> 16);
    }
  }
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) acc += shfl_xor(acc, off);
  if (c == 0 && i < p.L) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.L + i] = acc;
}

template <typename T, int D>
constexpr int bwd_dkdv_smem_bytes() {
  using C = Cfg<D>;
  return (2 * C::kBwdBlock + 4 * C::kBwdInner) * C::kRow * static_cast<int>(sizeof(T)) +
         4 * C::kBwdInner * static_cast<int>(sizeof(float));
}

// dK, dV for 64 keys of one K/V head: grid (ceil(S / 64), Hk, B), 128 threads; warp w owns keys 16w .. 16w + 15.
// Loops over the group's query heads and their query blocks of BQ rows (double-buffered Q, dO, lse, delta),
// recomputing P^T = exp2(scale * log2e * K Q^T - lse * log2e) and dS^T = P^T * (V dO^T - delta):
//   dV += P^T dO,  dK += dS^T Q   (summed over the group in registers: deterministic, no atomics).
// smem: K [64][RS], V [64][RS], Q [2][BQ][RS], dO [2][BQ][RS], lse*log2e [2][BQ], delta [2][BQ] (floats).
template <typename T, int D, bool kCausal, bool kHasMask>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const AttnBwdParams p) {
  using C = Cfg<D>;
  constexpr int BK = C::kBwdBlock, BQ = C::kBwdInner, RS = C::kRow;
#ifdef FASTATTN_ATTN_HOST_EMULATION
  unsigned char* smem = emu_dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BK * RS;
  T* sQ = sV + BK * RS;       // [2][BQ][RS]
  T* sdO = sQ + 2 * BQ * RS;  // [2][BQ][RS]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BQ * RS);  // [2][BQ]
  float* sDelta = sLse + 2 * BQ;                              // [2][BQ]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n_block = blockIdx.x;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int G = p.H / p.Hk;
  const int L = p.L, S = p.S;
  const int key0 = n_block * BK;

  const T* kg = static_cast<const T*>(p.k.ptr) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.ptr) + b * p.v.sb + hk * p.v.sh;

  // query blocks that see a key of this block: i >= key0 - diag (causal)
  int m_begin = 0;
  if (kCausal) {
    const int64_t first_q = static_cast<int64_t>(key0) - p.diag_offset;
    if (first_q > 0) m_begin = first_q >= L ? (L + BQ - 1) / BQ : static_cast<int>(first_q / BQ);
  }
  const int m_end = (L + BQ - 1) / BQ;
  const int n_m = m_end > m_begin ? m_end - m_begin : 0;
  const int total = G * n_m;

  auto load_item = [&](int it, int buf) {
    const int h = hk * G + it / n_m;
    const int q0 = (m_begin + it % n_m) * BQ;
    const T* qg = static_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh;
    const T* dog = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + h * p.dout.sh;
    load_tile<T, BQ, D>(sQ + buf * BQ * RS, qg + static_cast<int64_t>(q0) * p.q.sr, p.q.sr, L - q0, qg, tid);
    load_tile<T, BQ, D>(sdO + buf * BQ * RS, dog + static_cast<int64_t>(q0) * p.dout.sr, p.dout.sr, L - q0, dog,
                        tid);
    if (tid < BQ) {
      const int i = q0 + tid;
      const int64_t row = (static_cast<int64_t>(b) * p.H + h) * L + i;
      sLse[buf * BQ + tid] = i < L ? fix_lse_log2(p.lse[row]) : kInf;
      sDelta[buf * BQ + tid] = i < L ? p.delta[row] : 0.f;
    }
  };

  load_tile<T, BK, D>(sK, kg + static_cast<int64_t>(key0) * p.k.sr, p.k.sr, S - key0, kg, tid);
  load_tile<T, BK, D>(sV, vg + static_cast<int64_t>(key0) * p.v.sr, p.v.sr, S - key0, vg, tid);
  if (total > 0) load_item(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  const float sl2 = p.scale * kLog2e;

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) load_item(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int h = hk * G + it / n_m;
    const int q0 = (m_begin + it % n_m) * BQ;
    const T* sQb = sQ + buf * BQ * RS;
    const T* sdOb = sdO + buf * BQ * RS;
    const float* lseb = sLse + buf * BQ;
    const float* deltab = sDelta + buf * BQ;

    // S^T = K Q^T and dP^T = V dO^T (16 keys x BQ queries per warp)
    float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
    for (int i = 0; i < BQ / 8; ++i) {
      st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
      dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      ldsm_x4(ka, addr_a<RS>(static_cast<const T*>(sK), warp * 16, kk * 16, lane));
      ldsm_x4(va, addr_a<RS>(static_cast<const T*>(sV), warp * 16, kk * 16, lane));
#pragma unroll
      for (int pp = 0; pp < BQ / 16; ++pp) {
        uint32_t bq[4], bd[4];
        ldsm_x4(bq, addr_b<RS>(sQb, pp * 16, kk * 16, lane));
        mma16816<T>(st[2 * pp], ka, bq[0], bq[1]);
        mma16816<T>(st[2 * pp + 1], ka, bq[2], bq[3]);
        ldsm_x4(bd, addr_b<RS>(sdOb, pp * 16, kk * 16, lane));
        mma16816<T>(dpt[2 * pp], va, bd[0], bd[1]);
        mma16816<T>(dpt[2 * pp + 1], va, bd[2], bd[3]);
      }
    }

    // P^T, dS^T
    const bool need_mask = kHasMask || key0 + BK > S ||
                           (kCausal && static_cast<int64_t>(key0) + BK - 1 > static_cast<int64_t>(q0) + p.diag_offset);
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * t + (e & 1);  // query within the block
        float x = st[nt][e] * sl2;
        if (need_mask) {
          const int j = key0 + warp * 16 + g + (e >> 1) * 8;
          if (!visible<kCausal, kHasMask>(p.mask, L, S, p.diag_offset, b, h, q0 + c, j)) x = -kInf;
        }
        const float pv = exp2f(x - lseb[c]);
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - deltab[c]);
      }

    // dV += P^T dO, dK += dS^T Q
#pragma unroll
    for (int kq = 0; kq < BQ / 16; ++kq) {
      uint32_t pa[4], da[4];
      pa[0] = pack2<T>(st[2 * kq][0], st[2 * kq][1]);
      pa[1] = pack2<T>(st[2 * kq][2], st[2 * kq][3]);
      pa[2] = pack2<T>(st[2 * kq + 1][0], st[2 * kq + 1][1]);
      pa[3] = pack2<T>(st[2 * kq + 1][2], st[2 * kq + 1][3]);
      da[0] = pack2<T>(dpt[2 * kq][0], dpt[2 * kq][1]);
      da[1] = pack2<T>(dpt[2 * kq][2], dpt[2 * kq][3]);
      da[2] = pack2<T>(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
      da[3] = pack2<T>(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, addr_a<RS>(sdOb, kq * 16, dp * 16, lane));
        mma16816<T>(dv[2 * dp], pa, bo[0], bo[1]);
        mma16816<T>(dv[2 * dp + 1], pa, bo[2], bo[3]);
        ldsm_x4_t(bq, addr_a<RS>(sQb, kq * 16, dp * 16, lane));
        mma16816<T>(dk[2 * dp], da, bq[0], bq[1]);
        mma16816<T>(dk[2 * dp + 1], da, bq[2], bq[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // nothing is left in flight when the CTA exits (total == 0 still committed K / V)

  T* dkg = static_cast<T*>(p.dk.ptr) + b * p.dk.sb + hk * p.dk.sh;
  T* dvg = static_cast<T*>(p.dv.ptr) + b * p.dv.sb + hk * p.dv.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + warp * 16 + g + r * 8;
    if (j < S) {
      T* dkr = dkg + static_cast<int64_t>(j) * p.dk.sr;
      T* dvr = dvg + static_cast<int64_t>(j) * p.dv.sr;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(dkr + dt * 8 + 2 * t) =
            pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + dt * 8 + 2 * t) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
  }
}

template <typename T, int D>
constexpr int bwd_dq_smem_bytes() {
  using C = Cfg<D>;
  return (2 * C::kBwdBlock + 4 * C::kBwdInner) * C::kRow * static_cast<int>(sizeof(T));
}

// dQ for 64 query rows of one head: grid (ceil(L / 64), H, B), 128 threads; warp w owns rows 16w .. 16w + 15.
// Loops over key blocks of BN (double-buffered K, V): P = exp2(scale * log2e * Q K^T - lse * log2e),
// dS = P * (dO V^T - delta), dQ += dS K.   smem: Q [64][RS], dO [64][RS], K [2][BN][RS], V [2][BN][RS].
template <typename T, int D, bool kCausal, bool kHasMask>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const AttnBwdParams p) {
  using C = Cfg<D>;
  constexpr int BM = C::kBwdBlock, BN = C::kBwdInner, RS = C::kRow;
#ifdef FASTATTN_ATTN_HOST_EMULATION
  unsigned char* smem = emu_dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * RS;
  T* sK = sdO + BM * RS;     // [2][BN][RS]
  T* sV = sK + 2 * BN * RS;  // [2][BN][RS]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.H / p.Hk);
  const int L = p.L, S = p.S;
  const int row0 = m_block * BM;

  const T* qg = static_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh;
  const T* dog = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + h * p.dout.sh;
  const T* kg = static_cast<const T*>(p.k.ptr) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.ptr) + b * p.v.sb + hk * p.v.sh;

  const int row_end = row0 + BM < L ? row0 + BM : L;
  const int n_blocks = key_blocks<kCausal, BN>(row0, row_end, S, p.diag_offset);

  load_tile<T, BM, D>(sQ, qg + static_cast<int64_t>(row0) * p.q.sr, p.q.sr, L - row0, qg, tid);
  load_tile<T, BM, D>(sdO, dog + static_cast<int64_t>(row0) * p.dout.sr, p.dout.sr, L - row0, dog, tid);
  if (n_blocks > 0) {
    load_tile<T, BN, D>(sK, kg, p.k.sr, S, kg, tid);
    load_tile<T, BN, D>(sV, vg, p.v.sr, S, vg, tid);
  }
  cp_async_commit();

  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + warp * 16 + g + r * 8;
    const int64_t row = (static_cast<int64_t>(b) * p.H + h) * L + i;
    lse2[r] = i < L ? fix_lse_log2(p.lse[row]) : kInf;
    dlt[r] = i < L ? p.delta[row] : 0.f;
  }

  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4], df[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldsm_x4(qf[kk], addr_a<RS>(static_cast<const T*>(sQ), warp * 16, kk * 16, lane));
    ldsm_x4(df[kk], addr_a<RS>(static_cast<const T*>(sdO), warp * 16, kk * 16, lane));
  }

  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float sl2 = p.scale * kLog2e;

  for (int n = 0; n < n_blocks; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_blocks) {
      const int64_t k1 = static_cast<int64_t>(n + 1) * BN;
      load_tile<T, BN, D>(sK + (buf ^ 1) * BN * RS, kg + k1 * p.k.sr, p.k.sr, S - k1, kg, tid);
      load_tile<T, BN, D>(sV + (buf ^ 1) * BN * RS, vg + k1 * p.v.sr, p.v.sr, S - k1, vg, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sKb = sK + buf * BN * RS;
    const T* sVb = sV + buf * BN * RS;

    // S = Q K^T, dP = dO V^T (16 x BN per warp)
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int pp = 0; pp < BN / 16; ++pp) {
        uint32_t bk[4], bv[4];
        ldsm_x4(bk, addr_b<RS>(sKb, pp * 16, kk * 16, lane));
        mma16816<T>(s[2 * pp], qf[kk], bk[0], bk[1]);
        mma16816<T>(s[2 * pp + 1], qf[kk], bk[2], bk[3]);
        ldsm_x4(bv, addr_b<RS>(sVb, pp * 16, kk * 16, lane));
        mma16816<T>(dp[2 * pp], df[kk], bv[0], bv[1]);
        mma16816<T>(dp[2 * pp + 1], df[kk], bv[2], bv[3]);
      }
    }

    const int key0 = n * BN;
    const bool need_mask = kHasMask || key0 + BN > S ||
                           (kCausal && static_cast<int64_t>(key0) + BN - 1 > static_cast<int64_t>(row0) + p.diag_offset);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float x = s[nt][e] * sl2;
        if (need_mask) {
          const int i = row0 + warp * 16 + g + r * 8;
          const int j = key0 + nt * 8 + 2 * t + (e & 1);
          if (!visible<kCausal, kHasMask>(p.mask, L, S, p.diag_offset, b, h, i, j)) x = -kInf;
        }
        const float pv = exp2f(x - lse2[r]);
        s[nt][e] = pv * (dp[nt][e] - dlt[r]);  // dS
      }

    // dQ += dS K
#pragma unroll
    for (int kq = 0; kq < BN / 16; ++kq) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kq][0], s[2 * kq][1]);
      a[1] = pack2<T>(s[2 * kq][2], s[2 * kq][3]);
      a[2] = pack2<T>(s[2 * kq + 1][0], s[2 * kq + 1][1]);
      a[3] = pack2<T>(s[2 * kq + 1][2], s[2 * kq + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bk[4];
        ldsm_x4_t(bk, addr_a<RS>(sKb, kq * 16, dd * 16, lane));
        mma16816<T>(dq[2 * dd], a, bk[0], bk[1]);
        mma16816<T>(dq[2 * dd + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();
  }

  T* dqg = static_cast<T*>(p.dq.ptr) + b * p.dq.sb + h * p.dq.sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + warp * 16 + g + r * 8;
    if (i < L) {
      T* dqr = dqg + static_cast<int64_t>(i) * p.dq.sr;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(dqr + dt * 8 + 2 * t) =
            pack2<T>(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
      }
    }
  }
}

// ================================================================================================ host helpers
// Launch a kernel with `smem` bytes of dynamic shared memory (opting in above the 48 KiB default).
#ifndef FASTATTN_ATTN_HOST_EMULATION
#define FA_ATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

template <typename Kernel>
inline const char* prepare_smem(Kernel kernel, int smem) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

inline const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// What the kernels rely on for a (B, heads, rows, D) tensor: 16-byte aligned rows (cp.async / vector loads).
inline bool tensor_ok(const AttnTensor& t) {
  return t.ptr != nullptr && aligned16(t.ptr) && t.sb % 8 == 0 && t.sh % 8 == 0 && t.sr % 8 == 0;
}

// Sizes shared by the forward and the backward; nullptr when fine.
inline const char* check_sizes(int B, int H, int Hk, int L, int S, int D) {
  if (B < 0 || H < 0 || Hk < 0 || L < 0 || S < 0) return "attention (CUDA): negative size";
  if (D != 32 && D != 64 && D != 128) return "attention (CUDA): head dim must be 32, 64 or 128";
  if (H > 0 && (Hk <= 0 || H % Hk != 0)) return "attention (CUDA): query heads must be a multiple of key heads";
  if (B > 65535 || H > 65535) return "attention (CUDA): batch and head counts must be at most 65535";
  return nullptr;
}

}  // namespace detail
}  // namespace attention_cuda
}  // namespace fastattn
