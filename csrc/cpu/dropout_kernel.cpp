// CPU dropout (dropout_kernel.h): the elements in chunks of kDropChunk, each chunk's keep flags by the widest Philox
// this CPU runs (8 or 16 counters at a time) into a stack buffer, then one multiply pass over it; chunks split
// across threads. out = x * (keep ? 1 / (1 - p) : 0), as torch's dropout multiplies (a dropped NaN stays NaN).
#include "dropout_kernel.h"

#include "cpu_features.h"
#include "float_bits.h"
#include "philox.h"

#include <algorithm>

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kDropChunk = 4096;       // elements per chunk (the keep flags stay in L1)
constexpr int64_t kParallelMin = 1 << 15;  // elements below which one thread does the whole op

#define FA_ISA_INCLUDE "dropout_chunk-inl.h"  // avx2::dropout_chunk, avx512::dropout_chunk
#include "foreach_isa.h"

namespace scalar {
inline void keep_row(uint64_t seed, uint64_t ctr, int64_t n, float p, uint8_t* keep) {
  keep_row_scalar(seed, ctr, n, p, keep);
}
#include "dropout_chunk-inl.h"
}  // namespace scalar

template <class T>
void run(const DropoutParams& p) {
  using Acc = decltype(to_acc(T{}));
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const float prob = float(p.p);
  const Acc scale = Acc(1.0 / (1.0 - p.p));
  auto chunk = &scalar::dropout_chunk<T, Acc>;
#ifdef FA_X86
  if (cpu_use_avx512()) chunk = &avx512::dropout_chunk<T, Acc>;
  else if (cpu_use_avx2()) chunk = &avx2::dropout_chunk<T, Acc>;
#endif
  const int64_t chunks = (p.n + kDropChunk - 1) / kDropChunk;
  [[maybe_unused]] const int nt = std::max(1, p.num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && p.n >= kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kDropChunk;
    chunk(x + j0, out + j0, std::min(kDropChunk, p.n - j0), prob, scale, p.seed, p.offset + uint64_t(j0));
  }
}

}  // namespace

void dropout(const DropoutParams& p) {
  if (p.n == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p);
    case DType::kFloat16: return run<Half>(p);
    case DType::kBFloat16: return run<BF16>(p);
    case DType::kFloat64: return run<double>(p);
  }
}

}  // namespace cpu
}  // namespace fastattn
