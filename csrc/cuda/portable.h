// What lets the per-image kernels (*_image.cuh) compile both as CUDA device code, run by
// BlockExec (block.cuh) with one thread block per image, and as host C++, run by the serial
// executor of tests/cuda_on_host/, which checks them against the reference on every CI run.
//
// An executor `ex` provides, with the semantics of a CUDA block (each call ends with a barrier):
//   ex.for_each(n, f)       f(i) for i in [0, n), spread over the threads
//   ex.for_each_warp(n, f)  f(i, lane, lanes, warp) for i in [0, n), one warp per i; warp <
//                           ex.warps(), the count a launch sizes per-warp buffers by
//   ex.warp_sum(v)          sum of v over the calling warp's lanes, returned to every lane
//   ex.warp_argmax(v, i)    the lane's (v, i) with the largest v, on ties the smallest i, to every
//                           lane
//   ex.sum(n, f), ex.max(n, f, lowest)   reductions of f(i) over [0, n), returned to every thread
//   ex.single(f)            f() on one thread
//   ex.atomic_add(p, v)     *p += v, returning the old value
// Every for_each body writes only its own elements, so any thread schedule gives the same result;
// where atomics decide an order, the kernel sorts afterwards.
#pragma once

#ifdef __CUDACC__
#define TT_DEVICE __device__ __forceinline__
#define TT_HOST_DEVICE __host__ __device__ inline
#define TT_UNROLL(n) _Pragma(#n)
#else
#define TT_DEVICE inline
#define TT_HOST_DEVICE inline
#define TT_UNROLL(n)
#endif
