// Row-wise symmetric int8 quantization (per-token activations / per-channel weights), bit-exact with
// fastattn.reference.quantize_rows_ref evaluated on a CUDA tensor:
//
//   xf = float(x[m][k])  (/ smooth[k]: a correctly rounded division)
//   amax = max_k |xf|    (NaN propagates)
//   scale = amax * float(1/127)   (PyTorch CUDA's `tensor / 127.0`; amax / 127 with scale_by_reciprocal = false)
//   inv = scale > 0 ? 1 / scale : 0
//   q = clamp(round_half_even(xf * inv), -127, 127)
//
// One row per warp / group of warps (blockDim = (threads per row, rows per block)); two passes over the row (the
// second re-reads it, from L1/L2), 16-byte vector loads when K % 8 == 0 and the bases are aligned. Every float op
// is explicit round-to-nearest PTX without .ftz: the library is compiled with --use_fast_math, under which `/`
// would be an approximate division and subnormals would flush to zero. |xf| is maximised on the bit patterns
// (sign cleared), which orders non-negative floats exactly, keeps subnormals and propagates NaN like torch.amax.
#include "int8.h"

#ifndef FASTATTN_INT8_HOST_EMULATION
#include <cuda_runtime.h>
#define FA8Q_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace int8_cuda {
namespace {

#ifndef FASTATTN_INT8_HOST_EMULATION
__device__ __forceinline__ float q_fdiv_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float q_fmul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Round to nearest even; saturates out-of-range values, NaN -> 0.
__device__ __forceinline__ int q_f2i_rn(float x) {
  int r;
  asm("cvt.rni.s32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float q_h2f(uint32_t h) {  // low 16 bits: an IEEE half (exact conversion)
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(static_cast<uint16_t>(h)));
  return r;
}
__device__ __forceinline__ uint32_t q_warp_max(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ uint4 q_ld_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
#endif  // !FASTATTN_INT8_HOST_EMULATION

constexpr int kQThreads = 256;         // threads per block
constexpr uint32_t kInv127 = 0x3C010204u;  // float(1/127) = 0.007874016...

__device__ __forceinline__ float q_bf2f(uint32_t b) { return __uint_as_float((b & 0xffffu) << 16); }

// Element k of a row, as float32 (exact).
template <Int8InDtype DT>
__device__ __forceinline__ float load1(const void* row, int64_t k) {
  if constexpr (DT == Int8InDtype::kFloat32) {
    return static_cast<const float*>(row)[k];
  } else if constexpr (DT == Int8InDtype::kFloat16) {
    return q_h2f(static_cast<const uint16_t*>(row)[k]);
  } else {
    return q_bf2f(static_cast<const uint16_t*>(row)[k]);
  }
}

// Elements [8c, 8c + 8) of a row (16-byte aligned groups), as float32.
template <Int8InDtype DT>
__device__ __forceinline__ void load8(const void* row, int64_t c, float (&v)[8]) {
  if constexpr (DT == Int8InDtype::kFloat32) {
    const char* base = static_cast<const char*>(row) + c * 32;
    const uint4 u0 = q_ld_v4(base), u1 = q_ld_v4(base + 16);
    v[0] = __uint_as_float(u0.x);
    v[1] = __uint_as_float(u0.y);
    v[2] = __uint_as_float(u0.z);
    v[3] = __uint_as_float(u0.w);
    v[4] = __uint_as_float(u1.x);
    v[5] = __uint_as_float(u1.y);
    v[6] = __uint_as_float(u1.z);
    v[7] = __uint_as_float(u1.w);
  } else {
    const uint4 u = q_ld_v4(static_cast<const char*>(row) + c * 16);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == Int8InDtype::kFloat16) {
        v[2 * i] = q_h2f(w[i] & 0xffffu);
        v[2 * i + 1] = q_h2f(w[i] >> 16);
      } else {
        v[2 * i] = q_bf2f(w[i]);
        v[2 * i + 1] = q_bf2f(w[i] >> 16);
      }
    }
  }
}

__device__ __forceinline__ void smooth8(const float* smooth, int64_t c, float (&v)[8]) {
  const uint4 s0 = q_ld_v4(smooth + 8 * c), s1 = q_ld_v4(smooth + 8 * c + 4);
  v[0] = q_fdiv_rn(v[0], __uint_as_float(s0.x));
  v[1] = q_fdiv_rn(v[1], __uint_as_float(s0.y));
  v[2] = q_fdiv_rn(v[2], __uint_as_float(s0.z));
  v[3] = q_fdiv_rn(v[3], __uint_as_float(s0.w));
  v[4] = q_fdiv_rn(v[4], __uint_as_float(s1.x));
  v[5] = q_fdiv_rn(v[5], __uint_as_float(s1.y));
  v[6] = q_fdiv_rn(v[6], __uint_as_float(s1.z));
  v[7] = q_fdiv_rn(v[7], __uint_as_float(s1.w));
}

__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t quant1(float x, float inv) {
  int q = q_f2i_rn(q_fmul_rn(x, inv));
  q = q < -127 ? -127 : (q > 127 ? 127 : q);
  return static_cast<uint32_t>(q) & 0xffu;
}

template <Int8InDtype DT, bool VEC>
__global__ void __launch_bounds__(kQThreads) quantize_rows_kernel(const Int8QuantizeParams p) {
  constexpr int64_t kElem = DT == Int8InDtype::kFloat32 ? 4 : 2;
  const int tpr = static_cast<int>(blockDim.x);  // threads per row: 32, 64, 128 or 256
  const int tx = static_cast<int>(threadIdx.x);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.M;
  const int64_t K = p.K;
  const void* xrow = static_cast<const char*>(p.x) + (row_ok ? row : 0) * K * kElem;
  const float* smooth = p.smooth;

  // Pass 1: max |xf| as bits.
  uint32_t mx = 0;
  if (row_ok) {
    if constexpr (VEC) {
      const int64_t groups = K / 8;
      for (int64_t c = tx; c < groups; c += tpr) {
        float v[8];
        load8<DT>(xrow, c, v);
        if (smooth != nullptr) smooth8(smooth, c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) mx = max(mx, abs_bits(v[i]));
      }
    } else {
      for (int64_t k = tx; k < K; k += tpr) {
        float v = load1<DT>(xrow, k);
        if (smooth != nullptr) v = q_fdiv_rn(v, smooth[k]);
        mx = max(mx, abs_bits(v));
      }
    }
  }
  mx = q_warp_max(mx);
  if (tpr > 32) {  // rows span several warps: combine through shared memory (every thread reaches the barrier)
    __shared__ uint32_t red[kQThreads / 32];
    const int wpr = tpr / 32;
    const int w = tx / 32;
    if ((tx & 31) == 0) red[threadIdx.y * wpr + w] = mx;
    __syncthreads();
    mx = 0;
    for (int i = 0; i < wpr; ++i) mx = max(mx, red[threadIdx.y * wpr + i]);
  }
  if (!row_ok) return;

  const float amax = __uint_as_float(mx);
  const float scale = p.scale_by_reciprocal ? q_fmul_rn(amax, __uint_as_float(kInv127)) : q_fdiv_rn(amax, 127.0f);
  const uint32_t sbits = __float_as_uint(scale);
  const bool positive = sbits != 0u && sbits <= 0x7f800000u;  // scale > 0 (scale is never negative; NaN is not)
  const float inv = positive ? q_fdiv_rn(1.0f, scale) : 0.0f;
  if (tx == 0) p.scale[row] = scale;

  // Pass 2: quantize.
  int8_t* qrow = p.q + row * K;
  if constexpr (VEC) {
    const int64_t groups = K / 8;
    for (int64_t c = tx; c < groups; c += tpr) {
      float v[8];
      load8<DT>(xrow, c, v);
      if (smooth != nullptr) smooth8(smooth, c, v);
      uint2 out;
      out.x = quant1(v[0], inv) | (quant1(v[1], inv) << 8) | (quant1(v[2], inv) << 16) | (quant1(v[3], inv) << 24);
      out.y = quant1(v[4], inv) | (quant1(v[5], inv) << 8) | (quant1(v[6], inv) << 16) | (quant1(v[7], inv) << 24);
      *reinterpret_cast<uint2*>(qrow + 8 * c) = out;
    }
  } else {
    for (int64_t k = tx; k < K; k += tpr) {
      float v = load1<DT>(xrow, k);
      if (smooth != nullptr) v = q_fdiv_rn(v, smooth[k]);
      qrow[k] = static_cast<int8_t>(static_cast<uint8_t>(quant1(v, inv)));
    }
  }
}

bool q_aligned(const void* ptr, uintptr_t n) { return (reinterpret_cast<uintptr_t>(ptr) % n) == 0; }

template <Int8InDtype DT>
const char* launch_dtype(const Int8QuantizeParams& p, cudaStream_t stream) {
  const bool vec = p.K % 8 == 0 && q_aligned(p.x, 16) && (p.smooth == nullptr || q_aligned(p.smooth, 16)) &&
                   q_aligned(p.q, 8);
  const int64_t work = vec ? p.K / 8 : p.K;  // loop trips of one row
  int tpr = 32;
  while (tpr < kQThreads && int64_t(tpr) * 4 < work) tpr *= 2;
  const int rows = kQThreads / tpr;
  const int64_t grid = (p.M + rows - 1) / rows;
  if (grid > INT32_MAX) return "quantize_rows (CUDA): too many rows";
  const auto kernel = vec ? quantize_rows_kernel<DT, true> : quantize_rows_kernel<DT, false>;
  FA8Q_LAUNCH(kernel, dim3(static_cast<unsigned>(grid)), dim3(tpr, rows), stream, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* quantize_rows_launch(const Int8QuantizeParams& p, cudaStream_t stream) {
  if (p.M < 1 || p.K < 1) return "quantize_rows (CUDA): M and K must be >= 1";
  if (p.x == nullptr || p.q == nullptr || p.scale == nullptr) return "quantize_rows (CUDA): null x, q or scale";
  switch (p.x_dtype) {
    case Int8InDtype::kFloat32:
      return launch_dtype<Int8InDtype::kFloat32>(p, stream);
    case Int8InDtype::kFloat16:
      return launch_dtype<Int8InDtype::kFloat16>(p, stream);
    case Int8InDtype::kBFloat16:
      return launch_dtype<Int8InDtype::kBFloat16>(p, stream);
  }
  return "quantize_rows (CUDA): unknown x dtype";
}

}  // namespace int8_cuda
}  // namespace fastattn
