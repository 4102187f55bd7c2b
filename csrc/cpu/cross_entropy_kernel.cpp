// CPU cross-entropy rows (cross_entropy_kernel.h): rows split across threads; a float32 row is worked in place, a
// float16 / bfloat16 row widened into a per-thread float buffer and, with the gradient, rounded back once; float64
// rows in double, scalar (the tests' gradcheck path). The row body, cross_entropy_row-inl.h, is compiled for
// AVX-512F, AVX2/FMA and one lane (FASTATTN_CPU_NO_AVX512=1 / FASTATTN_CPU_NO_AVX2=1 force the lower ones).
#include "cross_entropy_kernel.h"

#include "cpu_features.h"
#include "float_bits.h"
#include "kernel_util.h"
#include "simd.h"
#include "vec_math.h"
#include "vec_traits.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kParallelMin = 1 << 16;  // elements below which one thread does the whole call

namespace portable {
inline float vexp2(float x) { return std::exp2(x); }
inline float row_max(const float* x, int64_t n) {
  float r = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) r = x[j] > r || x[j] != x[j] ? x[j] : r;  // NaN wins, as in the vector paths
  return r;
}
#include "cross_entropy_row-inl.h"
}  // namespace portable

#ifdef FA_X86
namespace avx2 {
FA_AVX2_BEGIN
FA_INLINE Vec::F vexp2(Vec::F x) { return exp2_ps<true>(x); }
#include "cross_entropy_row-inl.h"
FA_TARGET_END
}  // namespace avx2

namespace avx512 {
FA_AVX512_BEGIN
FA_INLINE Vec::F vexp2(Vec::F x) { return exp2_512(x); }
#include "cross_entropy_row-inl.h"
FA_TARGET_END
}  // namespace avx512
#endif

using RowFn = float (*)(float*, int64_t, int64_t, bool);

RowFn pick_row() {
#ifdef FA_X86
  if (cpu_use_avx512()) return &avx512::ce_row;
  if (cpu_use_avx2()) return &avx2::ce_row;
#endif
  return &portable::ce_row;
}

double ce_row_f64(double* x, int64_t V, int64_t t, bool grad) {
  const double xt = x[t];
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = x[j] > m || x[j] != x[j] ? x[j] : m;
  double sum = 0.0;
  for (int64_t j = 0; j < V; ++j) sum += std::exp(x[j] - m);
  if (grad) {
    for (int64_t j = 0; j < V; ++j) x[j] = std::exp(x[j] - m) / sum;
    x[t] -= 1.0;
  }
  return std::log(sum) + m - xt;
}

template <class T, class L>
void run(const CrossEntropyParams& p) {
  T* logits = static_cast<T*>(p.logits);
  L* loss = static_cast<L*>(p.loss);
  [[maybe_unused]] const RowFn row_fn = pick_row();
  [[maybe_unused]] const int nt = std::max(1, p.num_threads);
#pragma omp parallel num_threads(nt) if (nt > 1 && p.n * p.V >= kParallelMin && p.n > 1)
  {
    std::vector<float> buf(std::is_same_v<T, float> || std::is_same_v<T, double> ? 0 : p.V);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      T* x = logits + i * p.stride;
      const int64_t t = p.target[i];
      if (t == p.ignore_index) {
        loss[i] = L(0);
        if (p.write_grad) std::fill(x, x + p.V, from_acc<T>(decltype(to_acc(T{}))(0)));
        continue;
      }
      if constexpr (std::is_same_v<T, double>) {
        loss[i] = ce_row_f64(x, p.V, t, p.write_grad);
      } else if constexpr (std::is_same_v<T, float>) {
        loss[i] = row_fn(x, p.V, t, p.write_grad);
      } else {
        for (int64_t j = 0; j < p.V; ++j) buf[j] = to_acc(x[j]);
        loss[i] = row_fn(buf.data(), p.V, t, p.write_grad);
        if (p.write_grad)
          for (int64_t j = 0; j < p.V; ++j) x[j] = from_acc<T>(buf[j]);
      }
    }
  }
}

}  // namespace

void cross_entropy_rows(const CrossEntropyParams& p) {
  if (p.n == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: return run<float, float>(p);
    case DType::kFloat16: return run<Half, float>(p);
    case DType::kBFloat16: return run<BF16, float>(p);
    case DType::kFloat64: return run<double, double>(p);
  }
}

}  // namespace cpu
}  // namespace fastattn
