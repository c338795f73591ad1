// Host-side launch helpers of the CUDA kernels: the device's shared-memory budget of a block and
// its multiprocessors, and the blocks of apply and untransform.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

namespace tt {

// apply's and untransform's blocks: up to 8 warps, a range of kRowsPerBlock output rows (tokens)
// each, at least 2 blocks an SM, so that ptxas keeps the loops in registers (<= 128).
constexpr int kRowWarps = 8;
constexpr int kRowsPerBlock = 4 * kRowWarps;

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline at::Tensor contiguous_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

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
