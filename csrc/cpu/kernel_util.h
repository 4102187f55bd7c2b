// Small pieces shared by the CPU kernels, free of SIMD code: integer rounding, the online softmax's NaN-aware running
// max, a 64-byte aligned buffer, run-once flags for blocks that the first thread needing them packs, and the OpenMP
// thread id.
#pragma once

#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#define FA_INLINE inline __attribute__((always_inline))

namespace fastattn {
namespace cpu {
namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The online softmax's new running max from the old one and a block's row max mx (the SIMD maxima skip NaN scores,
// or return one): NaN when the row holds a NaN score, so that NaN inputs give NaN outputs as in torch, never a row
// taken for "no key". A finite mx needs no scan: a NaN score then makes its exponential, the sum and the row NaN.
template <class T>
T running_max(T m, T mx, const T* row, int64_t n) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  if (m != m || mx != mx) return nan;
  if (mx == -std::numeric_limits<T>::infinity())
    for (int64_t j = 0; j < n; ++j)
      if (row[j] != row[j]) return nan;
  return std::max(m, mx);
}

// 64-byte aligned buffer (allocated outside parallel regions: a throw there would terminate). Large ones are
// 2 MiB aligned and ask for transparent huge pages (fewer page faults and TLB misses on the packed operands).
template <class T>
class ABuf {
 public:
  ABuf() = default;
  explicit ABuf(int64_t n) {
    const size_t bytes = size_t(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
    const size_t huge = size_t(2) << 20;
    const bool big = bytes >= 2 * huge;
    p_ = static_cast<T*>(big ? std::aligned_alloc(huge, (bytes + huge - 1) / huge * huge) : std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (big) madvise(p_, (bytes + huge - 1) / huge * huge, MADV_HUGEPAGE);
#endif
  }
  ABuf(const ABuf&) = delete;
  ABuf& operator=(const ABuf&) = delete;
  ~ABuf() { std::free(p_); }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
};

// Lazy packing: f(i) runs once per index i, by the first thread that needs it. run(lo, hi, f) makes [lo, hi)
// ready: it first runs the indices nobody has claimed yet, then waits for those that other threads are running.
class OnceFlags {
 public:
  explicit OnceFlags(int64_t n) : f_(new std::atomic<uint8_t>[size_t(std::max<int64_t>(n, 1))]()) {}
  template <class F>
  void run(int64_t lo, int64_t hi, F&& f) {
    bool busy = false;
    for (int64_t i = lo; i < hi; ++i) busy |= !try_run(i, f);
    if (busy)
      for (int64_t i = lo; i < hi; ++i) wait(i);
  }
  template <class F>
  void run(int64_t i, F&& f) { run(i, i + 1, f); }

 private:
  template <class F>
  bool try_run(int64_t i, F& f) {  // false: another thread is running it
    std::atomic<uint8_t>& s = f_[i];
    if (s.load(std::memory_order_acquire) == 2) return true;
    uint8_t expected = 0;
    if (!s.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) return expected == 2;
    f(i);
    s.store(2, std::memory_order_release);
    return true;
  }
  void wait(int64_t i) {
    std::atomic<uint8_t>& s = f_[i];
    for (int spins = 0; s.load(std::memory_order_acquire) != 2; ++spins) {
      if (spins < 64) {
#ifdef FA_X86
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

  std::unique_ptr<std::atomic<uint8_t>[]> f_;
};

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn
