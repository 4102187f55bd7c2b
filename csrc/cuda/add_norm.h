// Fused residual-add + LayerNorm / RMSNorm: CUDA kernel parameters and launchers (torch-free).
//
// Semantics: see the add_norm contract (fastattn._C add_norm_fwd_cuda / add_norm_bwd_cuda). In short:
//   s = round_to_s_dtype(float(x) + float(residual));  y = (s - mean) * rstd * w + b   (LN)
//                                                      y = s * rstd * w               (RMS)
// The binding (add_norm_api.cpp) validates every tensor; the launchers here only check what they rely on
// (sizes, alignment for the vectorised path) and report launch errors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace add_norm_cuda {

enum class AddNormDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Widest row the CUDA kernels accept.
constexpr int kAddNormMaxN = 65536;

// All (M, N) tensors are contiguous row-major; (N,) tensors are contiguous. "x dtype" = AddNormDtype dtype.
struct AddNormFwdParams {
  AddNormDtype dtype = AddNormDtype::kFloat32;  // x and y
  int64_t M = 0;                                // rows (may be 0: nothing is launched)
  int N = 0;                                    // columns, 1 .. kAddNormMaxN

  const void* x = nullptr;         // (M, N) x dtype
  const void* residual = nullptr;  // (M, N) or null
  bool residual_fp32 = false;      // residual is float32 (else x dtype)
  const void* weight = nullptr;    // (N,) or null
  bool weight_fp32 = false;
  const void* bias = nullptr;      // (N,) or null (always null for RMS)
  bool bias_fp32 = false;

  void* y = nullptr;      // (M, N) x dtype
  void* s = nullptr;      // (M, N) s dtype, or null when s is not stored
  bool s_fp32 = false;    // s dtype is float32 (else x dtype); governs the rounding of s even when s is null
  float* mean = nullptr;  // (M,) float32, or null (RMS)
  float* rstd = nullptr;  // (M,) float32

  float eps = 1e-5f;
  bool is_rms = false;
};

struct AddNormBwdParams {
  AddNormDtype dtype = AddNormDtype::kFloat32;  // dy and dx
  int64_t M = 0;
  int N = 0;

  const void* dy = nullptr;       // (M, N) x dtype
  const void* s = nullptr;        // (M, N) s dtype
  bool s_fp32 = false;            // s (and ds) dtype is float32 (else x dtype)
  const float* mean = nullptr;    // (M,) float32; ignored (may be null) for RMS
  const float* rstd = nullptr;    // (M,) float32
  const void* weight = nullptr;   // (N,) or null
  bool weight_fp32 = false;
  const void* ds = nullptr;       // (M, N) s dtype, or null

  void* dx = nullptr;             // (M, N) x dtype
  float* dres = nullptr;          // (M, N) float32, or null
  float* dweight = nullptr;       // (N,) float32, or null (the binding sets it iff a weight is given)
  float* dbias = nullptr;         // (N,) float32, or null

  bool is_rms = false;
  int num_sms = 1;                // multiprocessor count of the device (sizes the backward grid)
};

// Launchers: return nullptr on success, else a static error message (a CUDA error string or a description).
// They enqueue on `stream` and never synchronise. M == 0 launches nothing (the caller zero-fills dweight/dbias).
const char* add_norm_fwd_launch(const AddNormFwdParams& p, cudaStream_t stream);

// Backward needs a float32 workspace (partial column sums of dweight / dbias). Query its size (in floats; 0 when
// no dweight/dbias is requested) with the same params first, allocate it (256-byte aligned, e.g. a torch tensor),
// then launch with it.
const char* add_norm_bwd_workspace_size(const AddNormBwdParams& p, size_t* workspace_floats);
const char* add_norm_bwd_launch(const AddNormBwdParams& p, float* workspace, size_t workspace_floats,
                                cudaStream_t stream);

}  // namespace add_norm_cuda
}  // namespace fastattn
