// CUDA tt.match: one thread block per image runs match_image (match_image.cuh), T's whole
// construction (affinities, removed set, dst/weight) in one launch on the current stream. A batch
// too small to fill the GPU with one block per image first spreads each image's removal keys (its
// A x B affinities, the bulk of the work) over several blocks (keys_kernel); tt.transform does the
// same (transform.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "block.cuh"
#include "kernels.h"
#include "launch.h"
#include "match_image.cuh"

namespace tt {
namespace {

constexpr int kThreads = image::kBlockThreads;

template <typename metric_t>
__global__ void __launch_bounds__(kThreads, 1)
    match_kernel(image::Step s, image::MatchImage<metric_t> first) {
  extern __shared__ float4 shared[];  // float4: 16-byte alignment for the staged metric
  BlockExec ex;
  image::match_image(ex, s, first.image(s, blockIdx.x), shared);
}

// Part blockIdx.x of gridDim.x of image blockIdx.y's removal keys, into key/best [B, N].
template <typename metric_t>
__global__ void __launch_bounds__(kThreads)
    keys_kernel(image::Step s, image::MatchImage<metric_t> first, float* key, int* best) {
  extern __shared__ float4 shared[];
  BlockExec ex;
  const int64_t b = blockIdx.y, n = s.N;
  image::keys_image(ex, s, first.image(s, b), key + b * n, best + b * n, blockIdx.x, gridDim.x,
                    shared);
}

// How many blocks share an image's removal keys: one while the batch fills the GPU (two blocks an
// SM), else enough blocks for that, each with at least kMinKeyRows A tokens.
constexpr int kMinKeyRows = 8;
inline int key_parts(const image::Step& s, int64_t B, int sms) {
  if (s.by_importance || B * 2 >= sms) return 1;
  const int64_t fill = (2 * sms + B - 1) / B, most = a_count(s.N, s.P) / kMinKeyRows;
  return static_cast<int>(std::max<int64_t>(1, std::min(fill, most)));
}

template <typename metric_t>
void launch_keys(const char* op, image::Step s, const at::Tensor& metric, const at::Tensor& size,
                 const at::Tensor& key, const at::Tensor& best, int parts) {
  const int device = size.device().index();
  const int64_t limit = shared_memory_limit(device) - kBlockExecShared;
  const int64_t bytes = image::plan_keys<metric_t>(s, metric.data_ptr<metric_t>(),
                                                   metric.stride(1), metric.stride(0), limit);
  TORCH_CHECK(bytes > 0, op, ": no plan of the removal keys fits ", limit, " bytes");
  const auto kernel = keys_kernel<metric_t>;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), device, bytes);
  kernel<<<dim3(parts, size.size(0)), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      s, image::make_match_image<metric_t>(metric, {}, size, {}, {}), key.data_ptr<float>(),
      best.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename metric_t>
void launch(const char* op, image::Step s, const at::Tensor& metric, const at::Tensor& score,
            const at::Tensor& size, const at::Tensor& dst, const at::Tensor& weight) {
  const int device = size.device().index();
  const int64_t limit = shared_memory_limit(device) - kBlockExecShared;
  const int64_t bytes = image::plan_for<metric_t>(s, metric, limit, 0);
  TORCH_CHECK(bytes > 0, op, ": N = ", s.N, " tokens need more shared memory than this GPU gives "
              "a block (", limit, " bytes); use backend=\"triton\"");
  auto first = image::make_match_image<metric_t>(metric, score, size, dst, weight);
  const auto [key, best] = removal_keys_cuda(op, s, metric, size);
  if (key.defined()) {
    first.key_in = key.data_ptr<float>();
    first.best_in = best.data_ptr<int>();
  }
  const auto kernel = match_kernel<metric_t>;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), device, bytes);
  kernel<<<size.size(0), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(s, first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> match_cuda(const std::optional<at::Tensor>& metric,
                                              const std::optional<at::Tensor>& score,
                                              const std::optional<at::Tensor>& size_in,
                                              int64_t r, c10::string_view method, int64_t k,
                                              double tau, double alpha, c10::string_view targets,
                                              int64_t prefix, c10::string_view cost) {
  const char* op = "tt.match";
  const Construction c =
      check_match(op, metric, score, size_in, r, method, k, tau, alpha, targets, prefix, cost);
  const at::Tensor& given = metric.has_value() ? *metric : *score;
  const c10::cuda::CUDAGuard guard(given.device());
  const auto fopts = given.options().dtype(at::kFloat);
  const at::Tensor size = size_in.has_value() ? size_in->contiguous()
                                              : at::ones({c.batch, c.tokens}, fopts);
  auto dst = at::empty({c.batch, c.tokens, c.slots()}, fopts.dtype(at::kLong));
  auto weight = at::empty({c.batch, c.tokens, c.slots()}, fopts);
  if (c.batch == 0 || c.tokens == 0) return {dst, weight};
  const at::Tensor m = metric.has_value() ? image::kernel_metric(*metric, metric->scalar_type())
                                          : at::Tensor();
  match_cuda_impl(op, c, m, contiguous_or_empty(score), size, dst, weight);
  return {dst, weight};
}

}  // namespace

void match_cuda_impl(const char* op, const Construction& c, const at::Tensor& metric,
                     const at::Tensor& score, const at::Tensor& size, const at::Tensor& dst,
                     const at::Tensor& weight) {
  const image::Step s = image::make_step(c, metric.defined() ? metric.size(2) : 0);
  TT_DISPATCH_FLOAT_TYPES(metric.defined() ? metric.scalar_type() : at::kFloat, "tt_match", [&] {
    launch<scalar_t>(op, s, metric, score, size, dst, weight);
  });
}

std::tuple<at::Tensor, at::Tensor> removal_keys_cuda(const char* op, const image::Step& s,
                                                     const at::Tensor& metric,
                                                     const at::Tensor& size) {
  const int64_t B = size.size(0);
  const int parts = key_parts(s, B, multiprocessor_count(size.device().index()));
  if (parts == 1) return {};
  // Freed to the caching allocator in stream order: safe for both kernels.
  auto key = at::empty({B, s.N}, size.options());
  auto best = at::empty({B, s.N}, size.options().dtype(at::kInt));
  TT_DISPATCH_FLOAT_TYPES(metric.scalar_type(), "tt_removal_keys", [&] {
    launch_keys<scalar_t>(op, s, metric, size, key, best, parts);
  });
  return {key, best};
}

TORCH_LIBRARY_IMPL(tt, CUDA, m) { m.impl("match", &match_cuda); }

}  // namespace tt
