// CPU kernels of the fused residual-add + LayerNorm/RMSNorm ops (torch-free: raw pointers and plain structs).
// Semantics: see the add_norm contract (y = norm(s) * w + b with s = round_to_s_dtype(x + residual)).
#pragma once
#include <cstdint>

#include "float_bits.h"  // DType

namespace fastattn {

namespace cpu {

// All tensors are contiguous; (M, N) row-major unless noted. The "stats dtype" (mean, rstd, dweight, dbias) and
// the compute type are float64 for float64 x, else float32. Optional inputs/outputs are nullptr when absent.
struct AddNormFwdParams {
  int64_t rows = 0, cols = 0;  // M, N
  DType x_dtype = DType::kFloat32;         // x and y
  const void* x = nullptr;
  const void* residual = nullptr;          // (M, N), x_dtype or float32
  DType residual_dtype = DType::kFloat32;
  const void* weight = nullptr;            // (N,), x_dtype or float32
  DType weight_dtype = DType::kFloat32;
  const void* bias = nullptr;              // (N,), x_dtype or float32
  DType bias_dtype = DType::kFloat32;
  DType s_dtype = DType::kFloat32;         // s is rounded to this dtype (x_dtype or float32)
  void* y = nullptr;                       // (M, N) x_dtype
  void* s = nullptr;                       // (M, N) s_dtype, written when non-null
  void* mean = nullptr;                    // (M,) stats dtype, LayerNorm only
  void* rstd = nullptr;                    // (M,) stats dtype
  double eps = 1e-5;
  bool is_rms = false;
  int num_threads = 1;
};

struct AddNormBwdParams {
  int64_t rows = 0, cols = 0;
  DType dy_dtype = DType::kFloat32;        // dy and dx (= x dtype)
  const void* dy = nullptr;
  const void* s = nullptr;                 // (M, N) s_dtype
  DType s_dtype = DType::kFloat32;         // dy_dtype or float32
  const void* mean = nullptr;              // (M,) stats dtype, ignored for RMSNorm
  const void* rstd = nullptr;              // (M,) stats dtype
  const void* weight = nullptr;            // (N,), dy_dtype or float32
  DType weight_dtype = DType::kFloat32;
  const void* ds = nullptr;                // (M, N) s_dtype, added to the result
  void* dx = nullptr;                      // (M, N) dy_dtype
  void* dres = nullptr;                    // (M, N) float32, written when non-null
  void* dweight = nullptr;                 // (N,) stats dtype, written when non-null
  void* dbias = nullptr;                   // (N,) stats dtype, written when non-null
  bool is_rms = false;
  int num_threads = 1;
};

void add_norm_fwd(const AddNormFwdParams& p);
void add_norm_bwd(const AddNormBwdParams& p);

}  // namespace cpu
}  // namespace fastattn
