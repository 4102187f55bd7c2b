// CPU kernels of the INT8 ops (torch-free: raw pointers and plain structs).
// Semantics: see fastattn/ops/int8.py and fastattn/reference.py (int8_matmul_ref, quantize_rows_ref).
#pragma once
#include <cstdint>

namespace fastattn {

namespace cpu {

enum class Int8OutType : int { kFloat32, kFloat16, kBFloat16, kInt32 };
enum class Int8InType : int { kFloat32, kFloat16, kBFloat16 };

// out (M, N) = a (M, K) @ b (N, K)^T with an exact int32 accumulator acc. For kInt32 out = acc (no scales, no bias);
// otherwise, in float32 and in this order: c = float(acc); c *= a_scale[m]; c *= b_scale[n]; c += bias[n]; out =
// c rounded to nearest-even in out_type. All arrays contiguous row-major; optional inputs are nullptr when absent.
// Exact for K < 2**17 (|acc| < 2**31).
struct Int8MatmulParams {
  int64_t M = 0, N = 0, K = 0;
  const int8_t* a = nullptr;        // (M, K)
  const int8_t* b = nullptr;        // (N, K), the nn.Linear weight layout
  const float* a_scale = nullptr;   // (M,)
  const float* b_scale = nullptr;   // (N,)
  const float* bias = nullptr;      // (N,)
  Int8OutType out_type = Int8OutType::kFloat32;
  void* out = nullptr;              // (M, N) out_type (float16/bfloat16 as raw uint16 bits)
  int num_threads = 1;
};

// Per row m of x (M, K): xf = float(x[m][k]) (/ smooth[k]); scale[m] = max_k |xf| / 127; inv = scale > 0 ? 1 / scale
// : 0; q[m][k] = clamp(round_half_even(xf * inv), -127, 127). Bit-exact with quantize_rows_ref (float32 throughout).
struct QuantizeRowsParams {
  int64_t M = 0, K = 0;
  Int8InType x_type = Int8InType::kFloat32;
  const void* x = nullptr;          // (M, K) x_type (float16/bfloat16 as raw uint16 bits)
  const float* smooth = nullptr;    // (K,) or nullptr
  int8_t* q = nullptr;              // (M, K)
  float* scale = nullptr;           // (M,)
  int num_threads = 1;
};

// Weight-only int8 (w8a16): out (M, N) = (x (M, K) @ float(w (N, K))^T) * w_scale[n] (+ bias[n]), the sums in
// float32 (any order), then c *= w_scale[n]; c += bias[n] as separate float32 operations; out in x's type.
struct W8A16Params {
  int64_t M = 0, N = 0, K = 0;
  Int8InType x_type = Int8InType::kFloat32;
  const void* x = nullptr;          // (M, K) x_type; out is (M, N) of the same type
  const int8_t* w = nullptr;        // (N, K)
  const float* w_scale = nullptr;   // (N,)
  const float* bias = nullptr;      // (N,) or nullptr
  void* out = nullptr;
  int num_threads = 1;
};

// out (M, N) = x (M, K) @ w (N, K)^T (+ bias (N,)), all float32, for M <= gemv_max_rows(): the w8a16 GEMV body on a
// float32 weight, read once, one row at a time.
struct GemvF32Params {
  int64_t M = 0, N = 0, K = 0;
  const float* x = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;
  float* out = nullptr;
  int num_threads = 1;
};

void int8_matmul(const Int8MatmulParams& p);
// The matmul's code path on this CPU (packed, M > 4): "avx512-vnni", "avx-vnni", "avx2" or "portable".
const char* int8_matmul_path();
void quantize_rows(const QuantizeRowsParams& p);
void w8a16_matmul(const W8A16Params& p);
void gemv_f32(const GemvF32Params& p);
int64_t gemv_max_rows();
// The w8a16 matmul's code path on this CPU: "avx512", "avx2" or "portable".
const char* w8a16_matmul_path();

}  // namespace cpu
}  // namespace fastattn
