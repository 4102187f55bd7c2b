// Host-side device queries shared by the CUDA bindings (*_api.cpp). Torch-free apart from check.h's FA_CHECK.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

#include "../check.h"

namespace fastattn {

// Multiprocessor count of a device, queried once per device (an inline function: one cache for every binding).
inline int sm_count(int device, const char* op) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // zero-initialised (static storage)
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  FA_CHECK(err == cudaSuccess, op, ": cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) failed: ",
           cudaGetErrorString(err));
  FA_CHECK(n > 0, op, ": device ", device, " reports no multiprocessors");
  if (cacheable) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace fastattn
