// Fused residual-add + LayerNorm / RMSNorm CUDA kernels: the parts add_norm_fwd.cu and add_norm_bwd.cu share
// (tunables, conversions, masked vector loads / stores, row reductions, host-side helpers). Torch-free on purpose.
//
// Layout of a row among the threads that own it ("row-group": blockDim.x threads, a multiple of 32, <= 1024):
// thread t owns ELTS elements, as ELTS/VEC chunks of VEC consecutive columns; chunk c of thread t starts at
// column (c * blockDim.x + t) * VEC, so every chunk load of a warp is one contiguous, coalesced segment.
// VEC = 16 / sizeof(x dtype) (one 16-byte load per chunk of an x-dtype tensor, two for a float32 one) when the
// launcher found N % VEC == 0 and every pointer 16-byte aligned, else VEC = 1 (the scalar variant of the same
// kernel). Masked slots (column >= N, or a row >= M in a partly filled block) hold 0 and never contribute.
// All arithmetic is float32; s is rounded to its dtype before the statistics are taken (the contract).
#pragma once

#include "add_norm.h"

#ifndef FASTATTN_ADD_NORM_HOST_EMULATION
#include <cuda_runtime.h>
#define FA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace add_norm_cuda {
namespace {

// ------------------------------------------------------------------------------------------------ tunables
// Per (dtype, vectorised) choices, shared by the kernels (template arguments) and the host-side configuration.
// Row kernels are bounded to 512 threads (<= 128 registers per thread): with every load of a row hoisted ahead of
// its use, the 32-element variant needs ~90 registers, which a 1024-thread bound (64 registers) would spill.
constexpr int kFwdRowsMaxThreads = 512;
constexpr int kFwdSmallElts = 16;         // fwd_rows, N <= 32 * 16 (one warp per row)
// fwd_rows above 32 * 16 columns: 32 elements per thread when vectorised; the scalar variant stays at 16 (32 scalar
// loads per thread need more than 128 registers with all the dtype branches).
__host__ __device__ constexpr int fwd_elts(bool vec) { return vec ? 32 : kFwdSmallElts; }
// 16384 / 8192
__host__ __device__ constexpr int fwd_rows_max_n(bool vec) { return fwd_elts(vec) * kFwdRowsMaxThreads; }
constexpr int kBwdRowsMaxThreads = 512;   // launch bound of bwd_rows (<= 128 registers per thread)
// bwd_rows elements per thread; the scalar variant needs more registers (one address per element)
__host__ __device__ constexpr int bwd_elts(bool vec) { return vec ? 16 : 8; }
__host__ __device__ constexpr int bwd_rows_max_n(bool vec) { return bwd_elts(vec) * kBwdRowsMaxThreads; }
constexpr int kStreamThreads = 512;       // fwd_stream / bwd_stream block (one row per block)
// fwd_stream / bwd_stream elements per thread per tile
__host__ __device__ constexpr int stream_elts(bool vec) { return vec ? 16 : 4; }
constexpr int kTargetThreadsPerBlock = 256;  // rows per block = max(1, 256 / threads per row)
constexpr int kColThreadsX = 32;          // dwdb_cols / col_reduce block: 32 x 8
constexpr int kColThreadsY = 8;

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------ conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename U>
__device__ __forceinline__ U from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round a float to U's precision (round to nearest even) and back.
template <typename U>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<U>(v)); }

// 16-bit element <-> its bits (in the low half of a 32-bit word).
template <typename U>
__device__ __forceinline__ float bits16_to_float(uint32_t b);
template <>
__device__ __forceinline__ float bits16_to_float<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xFFFFu)));
}
template <>
__device__ __forceinline__ float bits16_to_float<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float((b & 0xFFFFu) << 16);  // exact: bf16 is the top half of a float
}
template <typename U>
__device__ __forceinline__ uint32_t float_to_bits16(float v);
template <>
__device__ __forceinline__ uint32_t float_to_bits16<__half>(float v) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v)));
}
template <>
__device__ __forceinline__ uint32_t float_to_bits16<__nv_bfloat16>(float v) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
}

template <typename T>
struct VecOf {
  static constexpr int value = static_cast<int>(16 / sizeof(T));  // elements of T in 16 bytes
};

// ------------------------------------------------------------------------------------------------ loads / stores
// Masked load: VEC consecutive elements of U at p -> out[0..VEC) when ok, zeros otherwise (p is not dereferenced).
// Only the raw loads sit under the condition, so the compiler predicates them instead of branching and can issue
// the loads of every chunk of a tile before their values are used. For VEC > 1, p is 16-byte aligned and
// VEC * sizeof(U) is a multiple of 16 (one or two 128-bit loads); element k sits in the low half of 32-bit word
// k/2 for 16-bit types (little endian).
template <typename U, int VEC>
__device__ __forceinline__ void load_vec_if(bool ok, const U* __restrict__ p, float* __restrict__ out) {
  if constexpr (VEC == 1) {
    float r = 0.f;
    if (ok) r = to_float(p[0]);
    out[0] = r;
  } else {
    static_assert((VEC * sizeof(U)) % 16 == 0, "vector accesses are whole 16-byte words");
    constexpr int kQ = static_cast<int>(VEC * sizeof(U) / 16);
    uint4 q[kQ];
#pragma unroll
    for (int j = 0; j < kQ; ++j) {
      q[j].x = 0u;
      q[j].y = 0u;
      q[j].z = 0u;
      q[j].w = 0u;
    }
    if (ok) {
#pragma unroll
      for (int j = 0; j < kQ; ++j) q[j] = reinterpret_cast<const uint4*>(p)[j];
    }
#pragma unroll
    for (int j = 0; j < kQ; ++j) {
      const uint32_t w[4] = {q[j].x, q[j].y, q[j].z, q[j].w};
      if constexpr (sizeof(U) == 4) {
#pragma unroll
        for (int t = 0; t < 4; ++t) out[4 * j + t] = __uint_as_float(w[t]);
      } else {
        static_assert(sizeof(U) == 2, "16-bit element expected");
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          out[8 * j + 2 * t] = bits16_to_float<U>(w[t]);  // zero bits -> 0.f for half and bfloat16
          out[8 * j + 2 * t + 1] = bits16_to_float<U>(w[t] >> 16);
        }
      }
    }
  }
}

// in[0..VEC) rounded to U -> VEC consecutive elements at p (same alignment rules as load_vec).
template <typename U, int VEC>
__device__ __forceinline__ void store_vec(U* __restrict__ p, const float* __restrict__ in) {
  if constexpr (VEC == 1) {
    p[0] = from_float<U>(in[0]);
  } else {
    static_assert((VEC * sizeof(U)) % 16 == 0, "vector accesses are whole 16-byte words");
    constexpr int kQ = static_cast<int>(VEC * sizeof(U) / 16);
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int j = 0; j < kQ; ++j) {
      uint32_t w[4];
      if constexpr (sizeof(U) == 4) {
#pragma unroll
        for (int t = 0; t < 4; ++t) w[t] = __float_as_uint(in[4 * j + t]);
      } else {
        static_assert(sizeof(U) == 2, "16-bit element expected");
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          w[t] = float_to_bits16<U>(in[8 * j + 2 * t]) | (float_to_bits16<U>(in[8 * j + 2 * t + 1]) << 16);
        }
      }
      uint4 u;
      u.x = w[0];
      u.y = w[1];
      u.z = w[2];
      u.w = w[3];
      q[j] = u;
    }
  }
}

// A tensor that is either float32 or the x dtype T (residual, weight, bias, s, ds): element offset i.
template <typename T, int VEC>
__device__ __forceinline__ void load_mixed_if(bool ok, const void* p, bool fp32, size_t i,
                                              float* __restrict__ out) {
  if (sizeof(T) == 4 || fp32) {
    load_vec_if<float, VEC>(ok, static_cast<const float*>(p) + i, out);
  } else {
    load_vec_if<T, VEC>(ok, static_cast<const T*>(p) + i, out);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_mixed(void* p, bool fp32, size_t i, const float* __restrict__ in) {
  if (sizeof(T) == 4 || fp32) {
    store_vec<float, VEC>(static_cast<float*>(p) + i, in);
  } else {
    store_vec<T, VEC>(static_cast<T*>(p) + i, in);
  }
}

// ------------------------------------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_allreduce_sum(float v) {
  // xor butterfly: every lane ends with the bitwise-same sum (float addition is commutative).
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Sums K values over the blockDim.x threads of each row-group (threadIdx.y picks the row-group). Every thread of
// the block must call it, in block-uniform control flow (it holds __syncthreads when blockDim.x > 32). All threads
// of a row-group get the same (bitwise) result. red: __shared__ float[K * 32]; reusable right after return.
// The block has at most 1024 threads, i.e. at most 32 warps, so slot (threadIdx.y * warps per row + warp) < 32.
template <int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K], float* red) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_allreduce_sum(v[k]);
  if (blockDim.x == 32) return;  // one warp per row: done (block-uniform branch)
  const int lane = threadIdx.x & 31;
  const int nwarps = blockDim.x >> 5;
  const int slot0 = threadIdx.y * nwarps;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[k * 32 + slot0 + (threadIdx.x >> 5)] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float t = lane < nwarps ? red[k * 32 + slot0 + lane] : 0.f;
    v[k] = warp_allreduce_sum(t);
  }
  __syncthreads();  // the next call may overwrite red
}

// ------------------------------------------------------------------------------------------------ host side
inline int dtype_size(AddNormDtype d) { return d == AddNormDtype::kFloat32 ? 4 : 2; }
inline int ceil_div_int(int a, int b) { return (a + b - 1) / b; }
inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int round_up_int(int a, int b) { return ceil_div_int(a, b) * b; }
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

struct RowConfig {
  int elts;    // elements per thread (per tile for the stream kernels)
  int tpr;     // threads per row (blockDim.x), a multiple of 32
  int rpb;     // rows per block (blockDim.y)
  bool stream; // wide-row kernel
};

inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace add_norm_cuda
}  // namespace fastattn
