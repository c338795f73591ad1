// Host-side launch helpers of the CUDA kernels: the device's shared-memory budget of a block and
// its multiprocessors.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace tt {

// The most dynamic shared memory a block may opt into on `device`.
inline int64_t shared_memory_limit(int device) {
  int limit = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

// The multiprocessors of `device`.
inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Lets `kernel` take `bytes` of dynamic shared memory on `device` (the current one). Each kernel,
// device and size is granted once and the grant only grows, so that the launches a CUDA graph
// captures (always after an eager warm-up) make no runtime calls besides the launch.
inline void allow_shared_memory(const void* kernel, int device, int64_t bytes) {
  if (bytes <= 48 * 1024) return;  // what every block may use without asking
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& have = granted[{kernel, device}];
  if (bytes <= have) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}

}  // namespace tt
