// CPU cross-entropy rows (torch-free), the inner op of fastattn.linear_cross_entropy: for each row i of logits
// (n, V), row stride `stride`, with target t = target[i]:
//   loss[i] = logsumexp(x_i) - x_i[t]                      (0 for t == ignore_index)
//   write_grad: x_i <- softmax(x_i) - onehot(t)           (all zeros for t == ignore_index), in place
// The math is float32 (float64 for float64 rows); float16 / bfloat16 rows are widened and the gradient rounded
// once. Targets are in [0, V) or ignore_index (checked by the caller). loss is float32 (float64 for float64 rows).
#pragma once
#include <cstdint>

#include "float_bits.h"  // DType

namespace fastattn {
namespace cpu {

struct CrossEntropyParams {
  int64_t n = 0, V = 0, stride = 0;
  DType dtype = DType::kFloat32;
  void* logits = nullptr;           // (n, V) rows, stride elements apart; overwritten when write_grad
  const int64_t* target = nullptr;  // (n,)
  void* loss = nullptr;             // (n,) float32 (float64 for float64 logits)
  int64_t ignore_index = -100;
  bool write_grad = false;
  int num_threads = 1;
};

void cross_entropy_rows(const CrossEntropyParams& p);

}  // namespace cpu
}  // namespace fastattn
