// tt_host.transform: csrc/cuda/transform_image.cuh, the CUDA kernel's per-image code, run on CPU
// tensors (host_launch.h), with the plan (rows per chunk, staging, 16-byte packs, threads) chosen
// by the test, or (shared_limit > 0) the plan a GPU with that much shared memory would choose;
// with key_parts > 0 the removal keys first come from that many blocks an image (keys_image), as
// transform.cu does for small batches.
// Arguments are validated beforehand by torch.ops.tt.check_transform / check_match.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/transform_image.cuh"
#include "host_launch.h"

namespace tt {
namespace {

template <typename metric_t, typename x_t, int V>
void run(image::Step s, bool stage, bool packed, int threads, int64_t shared_limit,
         int key_parts, const at::Tensor& metric, const at::Tensor& score,
         const at::Tensor& size, const at::Tensor& dst, const at::Tensor& weight,
         const at::Tensor& x, const at::Tensor& x_out, const at::Tensor& size_out) {
  if (shared_limit > 0) {  // the plan a GPU with this much shared memory per block would make
    TORCH_CHECK(image::plan_for<metric_t>(s, metric, shared_limit, image::kBlockThreads / 32) > 0,
                "no plan fits ", shared_limit, " bytes");
  } else {
    stage = stage && s.needs_affinity;
    s.metric_packed = s.needs_affinity && packed &&
                      image::metric_packs(s.D, stage, metric.data_ptr<metric_t>(),
                                          metric.stride(1), metric.stride(0));
    s.metric_ld = stage ? image::staged_ld(s.D, sizeof(metric_t), s.metric_packed) : 0;
  }
  auto batch =
      image::make_batch<metric_t, x_t>(metric, score, size, dst, weight, x, x_out, size_out);
  const int64_t B = size.size(0), N = s.N;
  at::Tensor key, best;
  if (key_parts > 0 && !s.by_importance) {  // transform.cu's keys_kernel: key_parts blocks an image
    image::Step ks = s;
    if (shared_limit > 0) {
      TORCH_CHECK(image::plan_keys<metric_t>(ks, metric.data_ptr<metric_t>(), metric.stride(1),
                                             metric.stride(0), shared_limit) > 0,
                  "no plan of the removal keys fits ", shared_limit, " bytes");
    } else {
      ks.metric_ld = 0;
      ks.metric_packed = packed && image::metric_packs(s.D, false, metric.data_ptr<metric_t>(),
                                                       metric.stride(1), metric.stride(0));
    }
    key = at::full({B, N}, NAN, size.options());  // poisoned: an unwritten key shows
    best = at::full({B, N}, -7, size.options().dtype(at::kInt));
    float* k = key.data_ptr<float>();
    int* t = best.data_ptr<int>();
    launch_on_host(B * key_parts, threads, image::keys_bytes(ks),
                   [&](auto& ex, int64_t block, void* shared) {
                     const int64_t b = block / key_parts;
                     image::keys_image(ex, ks, batch.image(ks, b), k + b * N, t + b * N,
                                       static_cast<int>(block % key_parts), key_parts, shared);
                   });
    batch.first.key_in = k;
    batch.first.best_in = t;
  }
  launch_on_host(size.size(0), threads,
                 image::layout(s).bytes(s, sizeof(metric_t), host_warps(threads)),
                 [&](auto& ex, int64_t b, void* shared) {
                   image::transform_image<V>(ex, s, batch.image(s, b), shared);
                 });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transform_on_host(
    const std::optional<at::Tensor>& x_in, const at::Tensor& size_in,
    const std::optional<at::Tensor>& metric_in, const std::optional<at::Tensor>& score_in,
    int64_t r, c10::string_view method, int64_t k, double tau, double alpha,
    c10::string_view targets, int64_t prefix, c10::string_view mode, c10::string_view cost,
    int64_t rows_per_chunk, bool stage, bool packed, int64_t threads, int64_t shared_limit,
    int64_t key_parts) {
  const at::Tensor& ref = metric_in.has_value() ? *metric_in : *score_in;
  Construction c{};
  c.method = parse_method("tt_host.transform", method);
  c.batch = ref.size(0);
  c.tokens = ref.size(1);
  c.r = r;
  c.k = k;
  c.prefix = prefix;
  c.tau = tau;
  c.alpha = c.method == Method::Transform ? alpha : 0.0;
  c.targets_b = targets == "b";
  c.ward = cost == "ward";
  const at::Tensor x = x_in.has_value() ? x_in->contiguous() : at::Tensor();
  const at::Tensor size = size_in.contiguous();
  const at::Tensor score = score_in.has_value() ? score_in->contiguous() : at::Tensor();
  const at::Tensor given = metric_in.has_value() ? *metric_in : at::Tensor();
  const int64_t B = c.batch, N = c.tokens, K = c.slots(), n_out = N - r;
  const int64_t C = x.defined() ? x.size(2) : 0;
  image::Step s = image::make_step(c, given.defined() ? given.size(2) : 0, C,
                                   parse_mode("tt_host.transform", mode));
  s.rows_per_chunk = static_cast<int>(rows_per_chunk);
  auto dst = at::full({B, N, K}, -7, size.options().dtype(at::kLong));
  auto weight = at::full({B, N, K}, NAN, size.options());
  auto x_out = x.defined() ? at::full({B, n_out, C}, NAN, x.options()) : at::empty({0});
  auto size_out = at::full({B, n_out}, NAN, size.options());
  const auto dtype = image::launch_dtype(x, given);
  const at::Tensor metric = image::kernel_metric(given, dtype);
  image::dispatch_dtypes(dtype, metric, [&](auto metric_zero, auto x_zero) {
    using metric_t = decltype(metric_zero);
    using x_t = decltype(x_zero);
    constexpr int V = 16 / sizeof(x_t);
    const int team = static_cast<int>(threads), parts = static_cast<int>(key_parts);
    if (packed && x.defined() && image::pack_width<x_t>(x.data_ptr(), C) == V)
      run<metric_t, x_t, V>(s, stage, packed, team, shared_limit, parts, metric, score, size, dst,
                            weight, x, x_out, size_out);
    else
      run<metric_t, x_t, 1>(s, stage, packed, team, shared_limit, parts, metric, score, size, dst,
                            weight, x, x_out, size_out);
  });
  return {x_out, size_out, dst, weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def(
      "transform(Tensor? x, Tensor size, Tensor? metric, Tensor? score, int r, str method, int k, "
      "float tau, float alpha, str targets, int prefix, str mode, str cost, int rows_per_chunk, "
      "bool stage, bool packed, int threads, int shared_limit=0, int key_parts=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) { m.impl("transform", &transform_on_host); }

}  // namespace tt
