// CUDA apply (X' = T X) and untransform in the deterministic gather form. apply first transposes
// T into per-row lists sorted by input index (one block per image), then one block per output row
// sums its contributions in that order, in fp32, so results never depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tt.h"

namespace tt {
namespace {

constexpr int kThreads = 256;

// start: [B, n_out + 1] zeroed counts in, row offsets out; cursor: [B, n_out] scratch;
// entry: [B, N * K] flat (j * K + k) indices grouped by output row, ascending within each row.
__global__ void transpose_rows_kernel(const float* __restrict__ size,
                                      const int64_t* __restrict__ dst,
                                      const float* __restrict__ weight, int N, int K, int n_out,
                                      int* __restrict__ start, int* __restrict__ cursor,
                                      int* __restrict__ entry, float* __restrict__ size_out) {
  const int b = blockIdx.x;
  const int64_t* d = dst + static_cast<int64_t>(b) * N * K;
  const float* w = weight + static_cast<int64_t>(b) * N * K;
  int* st = start + static_cast<int64_t>(b) * (n_out + 1);
  int* cur = cursor + static_cast<int64_t>(b) * n_out;
  int* ent = entry + static_cast<int64_t>(b) * N * K;
  for (int e = threadIdx.x; e < N * K; e += blockDim.x)
    if (w[e] != 0.f) atomicAdd(st + d[e] + 1, 1);
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 0; i < n_out; ++i) st[i + 1] += st[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) cur[i] = st[i];
  __syncthreads();
  for (int e = threadIdx.x; e < N * K; e += blockDim.x)
    if (w[e] != 0.f) ent[atomicAdd(cur + d[e], 1)] = e;
  __syncthreads();
  // Atomics placed each row's entries in arbitrary order: sort them, then sum sizes in order.
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) {
    for (int a = st[i] + 1; a < st[i + 1]; ++a) {
      const int v = ent[a];
      int p = a;
      for (; p > st[i] && ent[p - 1] > v; --p) ent[p] = ent[p - 1];
      ent[p] = v;
    }
    float total = 0.f;
    for (int a = st[i]; a < st[i + 1]; ++a)
      total += w[ent[a]] * size[static_cast<int64_t>(b) * N + ent[a] / K];
    size_out[static_cast<int64_t>(b) * n_out + i] = total;
  }
}

// Sum over the block's threads (blockDim.x a multiple of 32), returned to every thread.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) total += partial[w];
  __syncthreads();
  return total;
}

// One output row per block. Mode::Norm keeps the mean row in shared memory (C floats) until its
// length is known, then rescales it to the coefficient-weighted mean of the inputs' norms.
template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const float* __restrict__ size,
                                   const float* __restrict__ weight, const int* __restrict__ start,
                                   const int* __restrict__ entry,
                                   const float* __restrict__ size_out,
                                   const float* __restrict__ norms, int N, int K, int C,
                                   int n_out, Mode mode, scalar_t* __restrict__ out) {
  extern __shared__ float mean_row[];
  const int64_t row = blockIdx.x;
  const int64_t b = row / n_out, i = row % n_out;
  const int* st = start + b * (n_out + 1);
  const int* ent = entry + b * N * K;
  const float total = size_out[row];
  float square = 0.f;
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    float acc = 0.f;
    for (int a = st[i]; a < st[i + 1]; ++a) {
      const int e = ent[a], j = e / K;
      const float w = weight[b * N * K + e];
      const float coef = mode == Mode::Sum ? w : w * size[b * N + j];
      acc += coef * static_cast<float>(x[(b * N + j) * C + ch]);
    }
    if (mode != Mode::Sum) acc = total > 0.f ? acc / total : 0.f;
    if (mode == Mode::Norm) {
      mean_row[ch] = acc;
      square += acc * acc;
    } else {
      out[row * C + ch] = static_cast<scalar_t>(acc);
    }
  }
  if (mode != Mode::Norm) return;
  const float length = sqrtf(block_sum(square));
  float norm = 0.f;
  for (int a = st[i]; a < st[i + 1]; ++a) {
    const int e = ent[a];
    norm += weight[b * N * K + e] * size[b * N + e / K] * norms[b * N + e / K];
  }
  const float scale = length > 0.f && total > 0.f ? (norm / total) / length : 0.f;
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x)
    out[row * C + ch] = static_cast<scalar_t>(mean_row[ch] * scale);
}

template <typename scalar_t>
__global__ void untransform_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ dst,
                                   const float* __restrict__ weight, int N, int K, int C, int n_y,
                                   scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int64_t b = t / N;
  const float* w = weight + t * K;
  const int64_t* d = dst + t * K;
  float total = 0.f;
  for (int k = 0; k < K; ++k) total += w[k];
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    float acc = 0.f;
    if (total > 0.f)
      for (int k = 0; k < K; ++k)
        acc += (w[k] / total) * static_cast<float>(y[(b * n_y + d[k]) * C + ch]);
    out[t * C + ch] = static_cast<scalar_t>(acc);
  }
}

// Threads over channels: a whole number of warps, at most kThreads.
int channel_threads(int64_t C) {
  return static_cast<int>(std::min<int64_t>((std::max<int64_t>(C, 1) + 31) / 32 * 32, kThreads));
}

std::tuple<at::Tensor, at::Tensor> apply_cuda(const at::Tensor& x_in, const at::Tensor& size_in,
                                              const at::Tensor& dst_in,
                                              const at::Tensor& weight_in, int64_t n_out,
                                              c10::string_view mode) {
  const Mode how = check_apply("tt.apply", x_in, size_in, dst_in, weight_in, n_out, mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto size = size_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = dst.size(2);
  TORCH_CHECK(N * K < (int64_t{1} << 31), "tt.apply: N * K must fit in int32, got ", N * K);
  TORCH_CHECK(how != Mode::Norm || C <= 12000, "tt.apply: mode 'norm' on CUDA holds a row of `x` "
              "in shared memory (48 KiB with block_sum's): C <= 12000, got ", C);
  auto out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::zeros({B, n_out}, size.options());
  if (B == 0 || n_out == 0) return {out, size_out};
  const auto iopts = size.options().dtype(at::kInt);
  auto start = at::zeros({B, n_out + 1}, iopts);
  auto cursor = at::empty({B, n_out}, iopts);
  auto entry = at::empty({B, N * K}, iopts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  transpose_rows_kernel<<<B, kThreads, 0, stream>>>(
      size.data_ptr<float>(), dst.data_ptr<int64_t>(), weight.data_ptr<float>(), N, K, n_out,
      start.data_ptr<int>(), cursor.data_ptr<int>(), entry.data_ptr<int>(),
      size_out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (C == 0) return {out, size_out};
  const at::Tensor norms =
      how == Mode::Norm ? at::linalg_vector_norm(x.to(at::kFloat), 2, {-1}) : size;
  const size_t shared = how == Mode::Norm ? C * sizeof(float) : 0;
  TT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tt_apply_cuda", [&] {
    gather_rows_kernel<scalar_t><<<B * n_out, channel_threads(C), shared, stream>>>(
        x.data_ptr<scalar_t>(), size.data_ptr<float>(), weight.data_ptr<float>(),
        start.data_ptr<int>(), entry.data_ptr<int>(), size_out.data_ptr<float>(),
        norms.data_ptr<float>(), N, K, C, n_out, how, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

at::Tensor untransform_cuda(const at::Tensor& y_in, const at::Tensor& dst_in,
                            const at::Tensor& weight_in) {
  check_untransform(y_in, dst_in, weight_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = dst.size(0), N = dst.size(1), K = dst.size(2), C = y.size(2);
  auto out = at::empty({B, N, C}, y.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TT_DISPATCH_FLOAT_TYPES(y.scalar_type(), "tt_untransform_cuda",
                                  [&] {
                                    untransform_kernel<scalar_t>
                                        <<<B * N, channel_threads(C), 0, stream>>>(
                                            y.data_ptr<scalar_t>(), dst.data_ptr<int64_t>(),
                                            weight.data_ptr<float>(), N, K, C, y.size(1),
                                            out.data_ptr<scalar_t>());
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CUDA, m) {
  m.impl("apply", &apply_cuda);
  m.impl("untransform", &untransform_cuda);
}

}  // namespace tt
