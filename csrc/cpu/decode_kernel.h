// CPU split-KV decode attention (flash-decoding), torch-free: raw pointers, element strides and a plain struct.
// Semantics: fastattn/ops/attention/decode.py (module docstring). Few query rows (L <= 16 in practice) against a
// long KV cache; each sequence b has its own length len_b (keys >= len_b are never read) and its query rows are
// bottom-right aligned to it; GQA reads each K/V head once for all the query heads of its group.
#pragma once
#include <cstdint>

#include "attention_kernel.h"  // AttnDType, AttnView

namespace fastattn {
namespace cpu {

struct DecodeArgs {
  int64_t B = 0, H = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;  // H % Hk == 0: query head h reads kv head h / (H / Hk)
  AttnDType dtype = AttnDType::kFloat32;  // of q, k, v and out: float32, float16 or bfloat16
  AttnView q, k, v;                       // (B, H, L, E), (B, Hk, S, E), (B, Hk, S, Ev); stride[3] == 1
  const int32_t* seqlens = nullptr;       // (B,) contiguous keys per sequence, clamped to [0, S]; nullptr: S
  const uint8_t* keep = nullptr;          // (B, S) bool, True = the key takes part; nullptr: all
  int64_t keep_stride[2] = {0, 1};
  double scale = 1.0;
  double softcap = 0.0;                   // > 0: s = softcap * tanh(s / softcap)
  bool causal = true;                     // query i sees keys j <= i + len_b - L
  int num_threads = 1;
  void* out = nullptr;                    // (B, H, L, Ev) contiguous, dtype
  float* lse = nullptr;                   // (B, H, L) contiguous: natural-log logsumexp, +inf for a row with no key
};

void decode_attention(const DecodeArgs& a);

}  // namespace cpu
}  // namespace fastattn
