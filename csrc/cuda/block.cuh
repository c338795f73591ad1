// The executor of the per-image kernels (portable.h) on a CUDA thread block: the block's threads
// share the loops, a barrier ends every call.
#pragma once

#include <cstdint>

namespace tt {

// BlockExec's static shared memory (its reduction partials), with room to spare: launches that
// plan their dynamic shared memory up to the device's limit leave this much.
constexpr int64_t kBlockExecShared = 1024;

struct BlockExec {
  template <typename F>
  __device__ void for_each(int n, F f) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
    __syncthreads();
  }

  // blockDim.x is a multiple of 32, so every lane of a warp takes the same iterations and the
  // shuffles in warp_sum see the whole warp.
  template <typename F>
  __device__ void for_each_warp(int n, F f) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int i = warp; i < n; i += blockDim.x / 32) f(i, lane, 32, warp);
    __syncthreads();
  }

  __device__ int warps() const { return blockDim.x / 32; }

  __device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  }

  __device__ void warp_argmax(float& v, int& i) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other_v = __shfl_xor_sync(0xffffffffu, v, offset);
      const int other_i = __shfl_xor_sync(0xffffffffu, i, offset);
      if (other_v > v || (other_v == v && other_i < i)) v = other_v, i = other_i;
    }
  }

  template <typename F>
  __device__ auto sum(int n, F f) -> decltype(f(0)) {
    using T = decltype(f(0));
    T v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += f(i);
    return reduce(v, [](T a, T b) { return a + b; });
  }

  template <typename F, typename T>
  __device__ T max(int n, F f, T lowest) {
    T v = lowest;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const T x = f(i);
      v = v > x ? v : x;
    }
    return reduce(v, [](T a, T b) { return a > b ? a : b; });
  }

  template <typename F>
  __device__ void single(F f) {
    if (threadIdx.x == 0) f();
    __syncthreads();
  }

  __device__ int atomic_add(int* p, int v) { return atomicAdd(p, v); }

 private:
  // Warp shuffles, then the warps' partials in a fixed order: the result never depends on timing.
  template <typename T, typename Op>
  __device__ T reduce(T v, Op op) {
    __shared__ T partial[32];
    for (int offset = 16; offset > 0; offset >>= 1)
      v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    T total = partial[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = op(total, partial[w]);
    __syncthreads();
    return total;
  }
};

}  // namespace tt
