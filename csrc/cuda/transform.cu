// CUDA tt.match and tt.transform: one thread block per image runs transform_image.cuh, the whole
// reduction step (affinities, removed set, dst/weight and, for tt.transform, the apply) in one
// launch on the current stream. Where the apply's row buffers (C floats a warp) do not fit
// beside the construction, tt.transform builds T in one launch and applies it in a second. A batch
// too small to fill the GPU with one block per image first spreads each image's removal keys (its
// A x B affinities, the bulk of the work) over several blocks (keys_kernel).
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
#include "launch.h"
#include "transform_image.cuh"

namespace tt {
namespace {

constexpr int kThreads = image::kBlockThreads;
constexpr int64_t kStaticShared = 1024;  // BlockExec's reduction partials, with room to spare

// V: x elements per load and store in the apply (16 bytes when x's rows are aligned).
template <typename metric_t, typename x_t, int V>
__global__ void __launch_bounds__(kThreads, 1)
    transform_kernel(image::Step s, image::Batch<metric_t, x_t> batch) {
  extern __shared__ float4 shared[];  // float4: 16-byte alignment for the staged metric
  BlockExec ex;
  image::transform_image<V>(ex, s, batch.image(s, blockIdx.x), shared);
}

// Part blockIdx.x of gridDim.x of image blockIdx.y's removal keys, into key/best [B, N].
template <typename metric_t, typename x_t>
__global__ void __launch_bounds__(kThreads)
    keys_kernel(image::Step s, image::Batch<metric_t, x_t> batch, float* key, int* best) {
  extern __shared__ float4 shared[];
  BlockExec ex;
  const int64_t b = blockIdx.y, n = s.N;
  image::keys_image(ex, s, batch.image(s, b), key + b * n, best + b * n, blockIdx.x, gridDim.x,
                    shared);
}

// How many blocks share an image's removal keys: one while the batch fills the GPU (two blocks an
// SM), else enough blocks for that, each with at least kMinKeyRows A tokens.
constexpr int kMinKeyRows = 8;
inline int key_parts(const image::Step& s, int64_t B, int sms) {
  if (s.by_importance || B * 2 >= sms) return 1;
  const int64_t fill = (2 * sms + B - 1) / B, most = image::Bipartite(s).nA / kMinKeyRows;
  return static_cast<int>(std::max<int64_t>(1, std::min(fill, most)));
}

// Launches the kernel; false when its shared memory does not fit (only checked with x: without
// it, that is an error).
template <typename metric_t, typename x_t>
bool launch(const char* op, image::Step s, const at::Tensor& metric, const at::Tensor& score,
            const at::Tensor& size, const at::Tensor& dst, const at::Tensor& weight,
            const at::Tensor& x, const at::Tensor& x_out, const at::Tensor& size_out) {
  const int device = size.device().index();
  const int64_t limit = shared_memory_limit(device) - kStaticShared;
  const int64_t bytes = image::plan_for<metric_t>(s, metric, limit, kThreads / 32);
  if (bytes == 0 && x.defined()) return false;
  TORCH_CHECK(bytes > 0, op, ": N = ", s.N, " tokens need more shared memory than this GPU gives "
              "a block (", limit, " bytes); use backend=\"triton\"");
  auto batch =
      image::make_batch<metric_t, x_t>(metric, score, size, dst, weight, x, x_out, size_out);
  const int64_t B = size.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int parts = key_parts(s, B, multiprocessor_count(device));
  at::Tensor key, best;  // freed to the caching allocator in stream order: safe for both kernels
  if (parts > 1) {
    image::Step ks = s;
    const int64_t key_bytes = image::plan_keys<metric_t>(ks, metric.data_ptr<metric_t>(),
                                                          metric.stride(1), metric.stride(0), limit);
    TORCH_CHECK(key_bytes > 0, op, ": no plan of the removal keys fits ", limit, " bytes");
    key = at::empty({B, s.N}, size.options());
    best = at::empty({B, s.N}, size.options().dtype(at::kInt));
    const auto keys = keys_kernel<metric_t, x_t>;
    allow_shared_memory(reinterpret_cast<const void*>(keys), device, key_bytes);
    keys<<<dim3(parts, B), kThreads, key_bytes, stream>>>(ks, batch, key.data_ptr<float>(),
                                                           best.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch.first.key_in = key.data_ptr<float>();
    batch.first.best_in = best.data_ptr<int>();
  }
  constexpr int V = 16 / sizeof(x_t);
  const bool packed = x.defined() && image::pack_width<x_t>(x.data_ptr(), s.C) == V;
  const auto kernel =
      packed ? transform_kernel<metric_t, x_t, V> : transform_kernel<metric_t, x_t, 1>;
  allow_shared_memory(reinterpret_cast<const void*>(kernel), device, bytes);
  kernel<<<B, kThreads, bytes, stream>>>(s, batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Runs the kernel in x's dtype (the metric's when there is no x). False: as launch.
bool dispatch(const char* op, const image::Step& s, const std::optional<at::Tensor>& metric_in,
              const at::Tensor& score, const at::Tensor& size, const at::Tensor& dst,
              const at::Tensor& weight, const at::Tensor& x, const at::Tensor& x_out,
              const at::Tensor& size_out) {
  const at::Tensor given = metric_in.has_value() ? *metric_in : at::Tensor();
  const auto dtype = image::launch_dtype(x, given);
  const at::Tensor metric = image::kernel_metric(given, dtype);
  bool launched = false;
  image::dispatch_dtypes(dtype, metric, [&](auto metric_zero, auto x_zero) {
    launched = launch<decltype(metric_zero), decltype(x_zero)>(op, s, metric, score, size, dst,
                                                               weight, x, x_out, size_out);
  });
  return launched;
}

at::Tensor contiguous_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
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
  const at::Tensor& ref = metric.has_value() ? *metric : *score;
  const c10::cuda::CUDAGuard guard(ref.device());
  const auto fopts = ref.options().dtype(at::kFloat);
  const at::Tensor size = size_in.has_value() ? size_in->contiguous()
                                              : at::ones({c.batch, c.tokens}, fopts);
  auto dst = at::empty({c.batch, c.tokens, c.slots()}, fopts.dtype(at::kLong));
  auto weight = at::empty({c.batch, c.tokens, c.slots()}, fopts);
  if (c.batch == 0 || c.tokens == 0) return {dst, weight};
  const image::Step s = image::make_step(c, metric.has_value() ? metric->size(2) : 0, 0,
                                         Mode::Mean);
  dispatch(op, s, metric, contiguous_or_empty(score), size, dst, weight, {}, {}, {});
  return {dst, weight};
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
  image::Step s = image::make_step(c, metric.has_value() ? metric->size(2) : 0, C, how);
  const at::Tensor score_c = contiguous_or_empty(score);
  if (dispatch(op, s, metric, score_c, size, dst, weight, x, x_out, size_out))
    return {x_out, size_out, dst, weight};
  // The apply's row buffers do not fit beside T's construction: build T, then apply it apart.
  s.C = 0;
  dispatch(op, s, metric, score_c, size, dst, weight, {}, {}, {});
  std::tie(x_out, size_out) = apply_cuda_impl(x, size, dst, weight, n_out, how);
  return {x_out, size_out, dst, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CUDA, m) {
  m.impl("match", &match_cuda);
  m.impl("transform", &transform_cuda);
}

}  // namespace tt
