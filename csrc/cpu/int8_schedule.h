// The parallel side of the CPU int8 matmul: per-call scratch memory (Scratch) and the schedules of the packed
// paths (run_packed) and of the small-M paths (for_owned), both with work stealing (take_items).
#pragma once

#include "int8_kernel.h"
#include "kernel_util.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kSmallM = 4;           // up to this many rows: no packing (GEMV-like path)
constexpr int64_t kParallelMinMacs = 1 << 18;  // below this many multiply-adds one thread does the whole matmul

constexpr size_t align64(size_t n) { return (n + 63) / 64 * 64; }

// 64-byte aligned, uninitialised scratch memory for one call, carved into parts of the given sizes. Up to
// kCachedScratch bytes come from a grow-only buffer kept per calling thread (released when the thread exits), so
// repeated calls neither allocate nor page-fault; larger requests are allocated and freed per call. One Scratch per
// thread at a time.
constexpr size_t kCachedScratch = size_t(64) << 20;

class Scratch {
  static constexpr size_t kMaxParts = 4;

 public:
  template <size_t N>
  explicit Scratch(const size_t (&sizes)[N]) {
    static_assert(N <= kMaxParts, "too many parts");
    size_t total = 0;
    for (size_t i = 0; i < N; ++i) total += align64(std::max<size_t>(sizes[i], 1));
    if (total <= kCachedScratch) {
      Cache& cache = thread_cache();
      if (cache.bytes < total) {
        std::free(cache.p);
        cache.bytes = 0;
        cache.p = std::aligned_alloc(64, total);
        if (!cache.p) throw std::bad_alloc();
        cache.bytes = total;
      }
      base_ = static_cast<char*>(cache.p);
    } else {
      base_ = static_cast<char*>(std::aligned_alloc(64, total));
      if (!base_) throw std::bad_alloc();
      owned_ = true;
    }
    size_t off = 0;
    for (size_t i = 0; i < N; ++i) {
      offsets_[i] = off;
      off += align64(std::max<size_t>(sizes[i], 1));
    }
  }
  ~Scratch() {
    if (owned_) std::free(base_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* part(size_t i) const { return reinterpret_cast<T*>(base_ + offsets_[i]); }

 private:
  struct Cache {
    void* p = nullptr;
    size_t bytes = 0;
    ~Cache() { std::free(p); }
  };
  static Cache& thread_cache() {
    thread_local Cache cache;
    return cache;
  }
  char* base_ = nullptr;
  bool owned_ = false;
  size_t offsets_[kMaxParts] = {};
};

// ---------------------------------------------------------------------------------------------------------------
// The parallel schedule of the packed matmuls (AVX2 and VNNI). B is packed into PN panels of panel_bytes each. The
// panels are split into one contiguous group per thread, which that thread packs (so they land in its own caches); a
// group's work items are (block of its panels small enough to stay in L2, chunk of MC rows), blocks outer, so a block
// stays in the core's L2 while A's row chunks stream past it (re-reading B from a shared L3 for every row tile is slow
// when other tenants use it). A thread done with its group takes the remaining items of the others (one atomic counter
// per group), so one descheduled thread does not hold a call up.
//   pack(j): packs panel j;  prep(m0, m1): per-row work on rows m0 .. m1-1, done before any tile;
//   tile(m0, m1, j0, j1): rows m0 .. m1-1 against panels j0 .. j1-1.
constexpr size_t kBlockBytes = size_t(512) << 10;

struct alignas(64) WorkCounter {  // one cache line each
  std::atomic<int64_t> next{0};
};

// Work stealing over G groups of items (group g holds items(g), taken in order through counters[g]): thread t works
// through group t % G first, then takes what is left of the others.
template <class Items, class F>
void take_items(WorkCounter* counters, int G, int t, Items items, F f) {
  for (int k = 0; k < G; ++k) {
    const int g = (t + k) % G;
    const int64_t n = items(g);
    for (int64_t it; (it = counters[g].next.fetch_add(1, std::memory_order_relaxed)) < n;) f(g, it);
  }
}

// Items 0 .. n-1 in one contiguous range per thread, with take_items: repeated calls on the same operands find each
// thread's share in its own caches (unlike a dynamic schedule), and a descheduled thread does not hold a call up.
template <class F>
void for_owned(int64_t n, int num_threads, bool par, F f) {
  std::vector<WorkCounter> counters(size_t(std::max(1, num_threads)));
#pragma omp parallel num_threads(num_threads) if (par)
  {
    int T = 1, t = 0;
#ifdef _OPENMP
    T = omp_get_num_threads();
    t = omp_get_thread_num();
#endif
    auto first = [&](int g) { return n * g / T; };
    take_items(counters.data(), T, t, [&](int g) { return first(g + 1) - first(g); },
               [&](int g, int64_t i) { f(first(g) + i); });
  }
}

template <class Pack, class Prep, class Tile>
void run_packed(const Int8MatmulParams& p, int64_t PN, size_t panel_bytes, int64_t MC, Pack pack, Prep prep,
                Tile tile) {
  const int64_t M = p.M;
  const int64_t block = std::max<int64_t>(1, int64_t(kBlockBytes / panel_bytes));  // panels per work item
  const int64_t chunks = cdiv(M, MC);
  const bool par = M * p.N * p.K >= kParallelMinMacs && p.num_threads > 1;
  std::vector<WorkCounter> counters(size_t(std::max(1, p.num_threads)));
#pragma omp parallel num_threads(p.num_threads) if (par)
  {
    int T = 1, t = 0;
#ifdef _OPENMP
    T = omp_get_num_threads();
    t = omp_get_thread_num();
#endif
    const int G = int(std::min<int64_t>(T, PN));
    auto first = [&](int g) { return PN * g / G; };  // group g: panels first(g) .. first(g + 1) - 1
    if (t < G)
      for (int64_t j = first(t); j < first(t + 1); ++j) pack(j);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) prep(c * MC, std::min(M, (c + 1) * MC));
    // (the implicit barrier above: every panel packed, every row prepared)
    take_items(counters.data(), G, t, [&](int g) { return cdiv(first(g + 1) - first(g), block) * chunks; },
               [&](int g, int64_t it) {
                 const int64_t j0 = first(g) + (it / chunks) * block, m0 = (it % chunks) * MC;
                 tile(m0, std::min(M, m0 + MC), j0, std::min(first(g + 1), j0 + block));
               });
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn
