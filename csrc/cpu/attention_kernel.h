// CPU kernels of fused scaled-dot-product attention, forward and backward (torch-free: raw pointers, element
// strides and plain structs). Semantics: the module docstring of fastattn/ops/attention/dispatch.py (scores, masks,
// causal / window bounds, ALiBi, softcap, dropout counters, lse = +inf and zero output / gradients for a row with
// no key).
#pragma once
#include <cstdint>

namespace fastattn {

namespace cpu {

// Storage types of the attention tensors (kBool: masks only).
enum class AttnDType : int { kFloat32, kFloat16, kBFloat16, kFloat64, kBool };

// A 4-D strided view; strides in elements. q/k/v/out/dout have stride[3] == 1; a mask may have any strides,
// 0 included (broadcast dims are read through their strides, never expanded).
struct AttnView {
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 1};
};

// Inputs shared by the forward and the backward. The compute type is float64 for float64 inputs, else float32.
struct AttnArgs {
  int64_t B = 0, H = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;  // H % Hk == 0: query head h reads kv head h / (H / Hk)
  AttnDType dtype = AttnDType::kFloat32;  // of q, k, v (and out, dout, dq, dk, dv)
  AttnView q, k, v;                       // (B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev)
  AttnView mask;                          // (B, H, L, S) view or data == nullptr; bool (True = take part) or float
  AttnDType mask_dtype = AttnDType::kBool;
  const float* alibi = nullptr;           // (B, H) contiguous slopes, or nullptr
  double scale = 1.0;
  bool causal = false;
  int64_t diag_offset = 0;                // query i's diagonal is key i + diag_offset
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  double softcap = 0.0;                   // > 0: s = softcap * tanh(s / softcap)
  double dropout_p = 0.0;                 // in [0, 1)
  uint64_t seed = 0, offset = 0;          // Philox key and counter offset of the dropout mask
  // A packed (varlen) sequence run as a batch of its own: its dropout counters are those of batch rng_b of a padded
  // (_, H, rng_L, rng_S) layout (rng_L == 0: this call's own (L, S))
  int64_t rng_b = 0, rng_L = 0, rng_S = 0;
  int num_threads = 1;
};

// A 4-D output: element strides of its first three dims; the last is contiguous (stride 1).
struct AttnOut {
  void* data = nullptr;
  int64_t stride[3] = {0, 0, 0};
};

struct AttnFwdArgs : AttnArgs {
  AttnOut out;           // (B, H, L, Ev), dtype
  float* lse = nullptr;  // (B, H, L) contiguous: natural-log logsumexp, +inf for a row with no key
};

struct AttnBwdArgs : AttnArgs {
  AttnView dout, out;                // (B, H, L, Ev), dtype
  const float* lse = nullptr;        // (B, H, L) as written by the forward
  int64_t lse_stride[3] = {0, 0, 1};
  AttnOut dq;                        // (B, H, L, E), dtype
  AttnOut dk;                        // (B, Hk, S, E), dtype (summed over each GQA group)
  AttnOut dv;                        // (B, Hk, S, Ev), dtype (summed over each GQA group)
};

void attention_fwd(const AttnFwdArgs& a);
void attention_bwd(const AttnBwdArgs& a);

// The dropout counter of (b, h, i, j) is offset + ((b * H + h) * L + i) * S4 + j, S4 = S rounded up to a multiple of
// 4 (rows start Philox blocks when offset is a multiple of 4: the Triton kernels then draw four keys per evaluation).
inline uint64_t dropout_row_stride(int64_t S) { return (uint64_t(S) + 3) / 4 * 4; }

// keep[((b * H + h) * L + i) * S + j] = (the uniform of that entry's counter) >= (float)dropout_p: word
// (counter % 4) of Philox4x32-10 at (counter / 4) under key seed (philox.h; Triton's philox_keep).
void attention_dropout_mask(int64_t B, int64_t H, int64_t L, int64_t S, double dropout_p, uint64_t seed,
                            uint64_t offset, bool* keep, int num_threads);

}  // namespace cpu
}  // namespace fastattn
