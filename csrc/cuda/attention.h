// Flash attention (forward + backward) on tensor cores: kernel parameters and launchers (torch-free).
//
// Semantics (the contract of fastattn._C attention_fwd_cuda / attention_bwd_cuda; see fastattn/ops/attention/dispatch.py):
//   s[i, j] = scale * q[i] . k[j], -inf where key j does not take part in row i:
//     j >= S, or (causal and j > i + diag_offset), or (mask and !mask[b, h, i, j]);
//   out = softmax(s) v;  lse[i] = log(sum_j exp(s[i, j])) (natural log, float32);
//   a row with no key taking part gives out = 0, lse = +inf and zero gradients (never NaN).
// Query head h reads K/V head h / (H / Hk) (GQA / MQA); dk, dv are summed over each group of query heads.
// Supported: head dim D = Ev in {32, 64, 128}, fp16 / bf16, causal with any diag_offset, bool masks read through
// their strides (stride 0 broadcasts allowed). The binding (attention_api.cpp) validates every tensor; the launchers
// here only check what they rely on (sizes, grid limits, 16-byte alignment) and report launch errors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn {
namespace attention_cuda {

enum class AttnDtype : int { kFloat16 = 0, kBFloat16 = 1 };

// A (B, heads, rows, D) tensor: element (b, h, r, d) sits at ptr + b * sb + h * sh + r * sr + d (strides in
// elements; the last dim is contiguous). ptr and sb, sh, sr (times the element size) are 16-byte aligned.
struct AttnTensor {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};

// The boolean mask: (B, H, L, S) bytes (0 = masked out), any strides (0 for broadcast dims).
struct AttnMask {
  const uint8_t* ptr = nullptr;  // null: no mask
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

struct AttnFwdParams {
  AttnDtype dtype = AttnDtype::kFloat16;
  int B = 0, H = 0, Hk = 0;  // batch, query heads, key/value heads (H % Hk == 0)
  int L = 0, S = 0, D = 0;   // query length, key length, head dim (32, 64 or 128)

  AttnTensor q;    // (B, H, L, D)
  AttnTensor k;    // (B, Hk, S, D)
  AttnTensor v;    // (B, Hk, S, D)
  AttnMask mask;   // optional
  AttnTensor out;  // (B, H, L, D), written
  float* lse = nullptr;  // (B, H, L) float32, contiguous, written

  float scale = 1.f;
  bool causal = false;
  int64_t diag_offset = 0;  // query i's diagonal is key i + diag_offset (causal only)
};

struct AttnBwdParams {
  AttnDtype dtype = AttnDtype::kFloat16;
  int B = 0, H = 0, Hk = 0;
  int L = 0, S = 0, D = 0;

  AttnTensor q, k, v;   // as in the forward
  AttnTensor out;       // (B, H, L, D): the forward's output
  AttnTensor dout;      // (B, H, L, D)
  const float* lse = nullptr;  // (B, H, L) float32, contiguous (the forward's: +inf for empty rows)
  AttnMask mask;

  AttnTensor dq;  // (B, H, L, D), written
  AttnTensor dk;  // (B, Hk, S, D), written (summed over the GQA group)
  AttnTensor dv;  // (B, Hk, S, D), written

  float* delta = nullptr;  // workspace: (B, H, L) float32, contiguous (rowsum(dout * out))

  float scale = 1.f;
  bool causal = false;
  int64_t diag_offset = 0;
};

// Launchers: enqueue on `stream` (never synchronise); return nullptr on success, else a static error message.
// Zero-sized problems launch nothing that would be empty (S == 0 still writes out = 0, lse = +inf, dq = 0;
// L == 0 still writes dk = dv = 0).
const char* attention_fwd_launch(const AttnFwdParams& p, cudaStream_t stream);
// Floats of workspace the backward needs in AttnBwdParams::delta (B * H * L).
size_t attention_bwd_workspace_floats(const AttnBwdParams& p);
const char* attention_bwd_launch(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace attention_cuda
}  // namespace fastattn
