// CPU dropout on Philox counters (torch-free): out[i] = x[i] * (keep_i / (1 - p)), keep_i = the uniform of logical
// counter offset + i under key seed is >= p (philox.h: word (offset + i) % 4 of Philox4x32-10 at (offset + i) / 4;
// the Triton kernel keeps the same elements). x and out are contiguous, of n elements of one dtype, and may be the
// same memory (in place).
#pragma once
#include <cstdint>

#include "float_bits.h"  // DType

namespace fastattn {
namespace cpu {

struct DropoutParams {
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* out = nullptr;
  double p = 0.0;  // in [0, 1)
  uint64_t seed = 0, offset = 0;
  int num_threads = 1;
};

void dropout(const DropoutParams& p);

}  // namespace cpu
}  // namespace fastattn
