// INT8 GEMM (W8A8, exact int32 accumulation, fused dequant epilogue) and row-wise int8 quantization: CUDA kernel
// parameters and launchers (torch-free; int8_api.cpp is the torch binding).
//
// Semantics (fastattn/ops/int8.py, fastattn/reference.py int8_matmul_ref / quantize_rows_ref):
//   int8_mm:  acc[m][n] = sum_k a[m][k] * b[n][k]  (exact int32; a (M, K), b (N, K), both row-major / K-major)
//             kInt32 out: out = acc (no scales, no bias). Otherwise, in float32 and in this order, every step
//             rounded to nearest even with no flush of subnormals and no fused multiply-add:
//               c = float(acc); c *= a_scale[m]; c *= b_scale[n]; c += bias[n]   (each only when given)
//             then out = c rounded to nearest even in out_dtype.
//   quantize: per row m of x (M, K):  xf = float(x[m][k]) (xf = xf / smooth[k], a correctly rounded division)
//             amax = max_k |xf| (NaN propagates), scale = amax / 127 (see Int8QuantizeParams::scale_by_reciprocal),
//             inv = scale > 0 ? 1 / scale : 0, q = clamp(round_half_even(xf * inv), -127, 127).
// The launchers validate what the kernels rely on (sizes, pointers) and report launch errors; they enqueue on
// `stream` and never synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace int8_cuda {

enum class Int8OutDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt32 = 3 };
enum class Int8InDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest K for which |acc| <= K * 2**14 stays below 2**31 (the int32 accumulator is exact), as the CPU op.
constexpr int64_t kInt8MaxK = (int64_t(1) << 17) - 1;

// Which GEMM kernel runs (kAuto: a heuristic on M, N and the SM count). The others force one, for benchmarks and
// tests; every kernel is exact for every shape.
enum class Int8Kernel : int {
  kAuto = 0,
  kSmallM = 1,         // M <= 32 (decoding): split-K over warps, operands straight from global memory
  kTile64x64 = 2,      // 4 warps of 32x32
  kTile128x128 = 3,    // 4 warps of 64x64
  kTile128x128W8 = 4,  // 8 warps of 64x32
  kTile128x256 = 5,    // 8 warps of 64x64
};

// out (M, N) = epilogue(a (M, K) @ b (N, K)^T). All matrices contiguous row-major; vectors contiguous; optional
// vectors are nullptr when absent (and must all be nullptr for kInt32). M, N >= 1 (callers skip empty outputs),
// 0 <= K <= kInt8MaxK (K == 0 gives acc = 0; a and b may then be null and are never read). Any base alignment
// works (16-byte aligned a / b with K % 16 == 0 take the cp.async fast path; K % 4 == 0 a 4-byte path; anything else
// a byte path).
struct Int8MatmulParams {
  int64_t M = 0, N = 0, K = 0;
  const int8_t* a = nullptr;       // (M, K)
  const int8_t* b = nullptr;       // (N, K), the nn.Linear weight layout
  const float* a_scale = nullptr;  // (M,) or null
  const float* b_scale = nullptr;  // (N,) or null
  const float* bias = nullptr;     // (N,) or null
  Int8OutDtype out_dtype = Int8OutDtype::kFloat16;
  void* out = nullptr;             // (M, N) out_dtype, at least 8-byte aligned (a fresh torch allocation is)
  int num_sms = 0;                 // multiprocessors of the device (tile heuristics); <= 0 means 132
  Int8Kernel kernel = Int8Kernel::kAuto;
};

struct Int8QuantizeParams {
  int64_t M = 0, K = 0;            // M >= 1, K >= 1
  Int8InDtype x_dtype = Int8InDtype::kFloat32;
  const void* x = nullptr;         // (M, K) x_dtype
  const float* smooth = nullptr;   // (K,) or null
  int8_t* q = nullptr;             // (M, K)
  float* scale = nullptr;          // (M,)
  // scale = amax * float(1/127) (true) or amax / 127 (false). quantize_rows_ref evaluated on a CUDA tensor computes
  // `amax / 127.0` as amax * float(1/127) (PyTorch's CUDA div by a Python scalar multiplies by the reciprocal),
  // while on a CPU tensor it divides: the two differ in the last bit for ~4.5% of rows. The CUDA binding matches
  // the reference on the CUDA device (true).
  bool scale_by_reciprocal = false;
};

// Return nullptr on success, else a static error message.
const char* int8_mm_launch(const Int8MatmulParams& p, cudaStream_t stream);
const char* quantize_rows_launch(const Int8QuantizeParams& p, cudaStream_t stream);

// Which GEMM kernel int8_mm_launch runs for these params (tests / benchmarks): "small_m", "tile64x64",
// "tile128x128", "tile128x128w8" or "tile128x256", with the load path appended ("/v16", "/v4", "/v1").
const char* int8_mm_kernel_name(const Int8MatmulParams& p);

}  // namespace int8_cuda
}  // namespace fastattn
