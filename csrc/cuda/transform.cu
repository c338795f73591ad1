// CUDA tt.transform, the fused reduction step: one thread block per image runs transform_image
// (transform_image.cuh), T's construction and then its apply, in one launch on the current stream
// (after match.cu's removal-key blocks when the batch is too small to fill the GPU). Where the
// apply's row buffers (C floats a warp) do not fit beside the construction, T is built by
// tt.match's kernel and applied by tt.apply's, in two launches.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "block.cuh"
#include "kernels.h"
#include "launch.h"
#include "transform_image.cuh"

namespace tt {
namespace {

constexpr int kThreads = image::kBlockThreads;

// V: x elements per load and store in the apply (16 bytes when x's rows are aligned).
template <typename metric_t, typename x_t, int V>
__global__ void __launch_bounds__(kThreads, 1)
    transform_kernel(image::Step s, image::ApplyStep as, image::MatchImage<metric_t> first_match,
                     image::ApplyImage<x_t> first_apply) {
  extern __shared__ float4 shared[];  // float4: 16-byte alignment for the staged metric
  BlockExec ex;
  image::transform_image<V>(ex, s, as, first_match.image(s, blockIdx.x),
                            first_apply.image(as, blockIdx.x), shared);
}

// Launches the kernel; false when its shared memory does not fit.
template <typename metric_t, typename x_t>
bool launch(const char* op, image::Step s, const image::ApplyStep& as, const at::Tensor& metric,
            const at::Tensor& score, const at::Tensor& size, const at::Tensor& dst,
            const at::Tensor& weight, const at::Tensor& x, const at::Tensor& x_out,
            const at::Tensor& size_out) {
  const int device = size.device().index();
  const int64_t limit = shared_memory_limit(device) - kBlockExecShared;
  const int64_t bytes =
      image::plan_for<metric_t>(s, metric, limit, image::fused_apply_bytes(as, kThreads / 32));
  if (bytes == 0) return false;
  auto first_match = image::make_match_image<metric_t>(metric, score, size, dst, weight);
  const auto [key, best] = removal_keys_cuda(op, s, metric, size);
  if (key.defined()) {
    first_match.key_in = key.data_ptr<float>();
    first_match.best_in = best.data_ptr<int>();
  }
  constexpr int V = 16 / sizeof(x_t);
  const bool packed = image::pack_width<x_t>(x.data_ptr(), as.C) == V;
  const auto kernel =
      packed ? transform_kernel<metric_t, x_t, V> : transform_kernel<metric_t, x_t, 1>;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), device, bytes);
  kernel<<<size.size(0), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      s, as, first_match, image::make_apply_image<x_t>(x, size, dst, weight, x_out, size_out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transform_cuda(
    const at::Tensor& x_in, const at::Tensor& size_in, const std::optional<at::Tensor>& metric,
    const std::optional<at::Tensor>& score, int64_t r, c10::string_view method, int64_t k,
    double tau, double alpha, c10::string_view targets, int64_t prefix, c10::string_view mode,
    c10::string_view cost) {
  const char* op = "tt.transform";
  const Construction c =
      check_match(op, metric, score, size_in, r, method, k, tau, alpha, targets, prefix, cost);
  const Mode how = check_transform(x_in, size_in, c, mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto size = size_in.contiguous();
  const int64_t B = c.batch, N = c.tokens, K = c.slots(), C = x.size(2), n_out = N - c.r;
  const auto fopts = size.options();
  auto dst = at::empty({B, N, K}, fopts.dtype(at::kLong));
  auto weight = at::empty({B, N, K}, fopts);
  auto x_out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::empty({B, n_out}, fopts);
  if (B == 0 || N == 0) return {x_out, size_out, dst, weight};
  // The metric in x's dtype, or in fp32 (image::dispatch_dtypes).
  const at::Tensor m = metric.has_value() ? image::kernel_metric(*metric, x.scalar_type())
                                          : at::Tensor();
  const at::Tensor score_c = contiguous_or_empty(score);
  const image::Step s = image::make_step(c, m.defined() ? m.size(2) : 0);
  const image::ApplyStep as{static_cast<int>(N), static_cast<int>(K), static_cast<int>(C),
                            static_cast<int>(n_out), how};
  bool fused = false;
  image::dispatch_dtypes(x.scalar_type(), m, [&](auto metric_zero, auto x_zero) {
    fused = launch<decltype(metric_zero), decltype(x_zero)>(op, s, as, m, score_c, size, dst,
                                                            weight, x, x_out, size_out);
  });
  if (fused) return {x_out, size_out, dst, weight};
  // The apply's row buffers do not fit beside T's construction: build T, then apply it apart.
  match_cuda_impl(op, c, m, score_c, size, dst, weight);
  std::tie(x_out, size_out) = apply_cuda_impl(x, size, dst, weight, n_out, how);
  return {x_out, size_out, dst, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CUDA, m) { m.impl("transform", &transform_cuda); }

}  // namespace tt
