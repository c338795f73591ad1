// CUDA apply (X' = T X) and untransform in the deterministic gather form. apply first transposes
// T into per-row lists sorted by input index (one block per image), then one block per output row
// sums its contributions in that order, in fp32, so results never depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const float* __restrict__ size,
                                   const float* __restrict__ weight, const int* __restrict__ start,
                                   const int* __restrict__ entry,
                                   const float* __restrict__ size_out, int N, int K, int C,
                                   int n_out, bool mean, scalar_t* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / n_out, i = row % n_out;
  const int* st = start + b * (n_out + 1);
  const int* ent = entry + b * N * K;
  const float total = size_out[row];
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    float acc = 0.f;
    for (int a = st[i]; a < st[i + 1]; ++a) {
      const int e = ent[a], j = e / K;
      const float coef = mean ? weight[b * N * K + e] * size[b * N + j] : weight[b * N * K + e];
      acc += coef * static_cast<float>(x[(b * N + j) * C + ch]);
    }
    if (mean) acc = total > 0.f ? acc / total : 0.f;
    out[row * C + ch] = static_cast<scalar_t>(acc);
  }
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

int channel_threads(int64_t C) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(C, 32), kThreads)); }

std::tuple<at::Tensor, at::Tensor> apply_cuda(const at::Tensor& x_in, const at::Tensor& size_in,
                                              const at::Tensor& dst_in,
                                              const at::Tensor& weight_in, int64_t n_out,
                                              c10::string_view mode) {
  const bool mean = check_apply("tt.apply", x_in, size_in, dst_in, weight_in, n_out, mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto size = size_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = dst.size(2);
  TORCH_CHECK(N * K < (int64_t{1} << 31), "tt.apply: N * K must fit in int32, got ", N * K);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tt_apply_cuda", [&] {
    gather_rows_kernel<scalar_t><<<B * n_out, channel_threads(C), 0, stream>>>(
        x.data_ptr<scalar_t>(), size.data_ptr<float>(), weight.data_ptr<float>(),
        start.data_ptr<int>(), entry.data_ptr<int>(), size_out.data_ptr<float>(), N, K, C, n_out,
        mean, out.data_ptr<scalar_t>());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tt_untransform_cuda",
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
