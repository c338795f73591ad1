// tt_host.transform: csrc/cuda/transform_image.cuh, the CUDA kernel's per-image code, run on CPU
// tensors (host_launch.h); without x, match_image.cuh alone, as tt.match's kernel (match.cu). The
// plan (rows per chunk, staging, 16-byte packs, threads) is chosen by the test, or (shared_limit
// > 0) is the plan a GPU with that much shared memory would choose; with key_parts > 0 the
// removal keys first come from that many blocks an image (keys_image), as match.cu does for
// small batches.
// Arguments are validated beforehand by torch.ops.tt.check_transform / check_match.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/transform_image.cuh"
#include "host_launch.h"

namespace tt {
namespace {

// The plan a GPU would make (shared_limit > 0; apply_bytes: the fused apply's), or the test's.
template <typename metric_t>
void choose_plan(image::Step& s, bool stage, bool packed, int64_t shared_limit,
                 int64_t apply_bytes, const at::Tensor& metric) {
  if (shared_limit > 0) {
    TORCH_CHECK(image::plan_for<metric_t>(s, metric, shared_limit, apply_bytes) > 0,
                "no plan fits ", shared_limit, " bytes");
    return;
  }
  stage = stage && s.needs_affinity;
  s.metric_packed = s.needs_affinity && packed &&
                    image::metric_packs(s.D, stage, metric.data_ptr<metric_t>(),
                                        metric.stride(1), metric.stride(0));
  s.metric_ld = stage ? image::staged_ld(s.D, sizeof(metric_t), s.metric_packed) : 0;
}

// match.cu's keys_kernel: key_parts blocks an image write each image's removal keys to key/best,
// which `first` then points at.
template <typename metric_t>
void removal_keys(image::Step s, bool packed, int threads, int64_t shared_limit, int key_parts,
                  const at::Tensor& metric, image::MatchImage<metric_t>& first, at::Tensor& key,
                  at::Tensor& best) {
  if (key_parts == 0 || s.by_importance) return;
  if (shared_limit > 0) {
    TORCH_CHECK(image::plan_keys<metric_t>(s, metric.data_ptr<metric_t>(), metric.stride(1),
                                           metric.stride(0), shared_limit) > 0,
                "no plan of the removal keys fits ", shared_limit, " bytes");
  } else {
    s.metric_ld = 0;
    s.metric_packed = packed && image::metric_packs(s.D, false, metric.data_ptr<metric_t>(),
                                                    metric.stride(1), metric.stride(0));
  }
  const int64_t B = key.size(0), N = s.N;
  float* k = key.data_ptr<float>();
  int* t = best.data_ptr<int>();
  launch_on_host(B * key_parts, threads, image::keys_bytes(s),
                 [&](auto& ex, int64_t block, void* shared) {
                   const int64_t b = block / key_parts;
                   image::keys_image(ex, s, first.image(s, b), k + b * N, t + b * N,
                                     static_cast<int>(block % key_parts), key_parts, shared);
                 });
  first.key_in = k;
  first.best_in = t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transform_on_host(
    const std::optional<at::Tensor>& x_in, const at::Tensor& size_in,
    const std::optional<at::Tensor>& metric_in, const std::optional<at::Tensor>& score_in,
    int64_t r, c10::string_view method, int64_t k, double tau, double alpha,
    c10::string_view targets, int64_t prefix, c10::string_view mode, c10::string_view cost,
    int64_t rows_per_chunk, bool stage, bool packed, int64_t threads, int64_t shared_limit,
    int64_t key_parts) {
  const at::Tensor& given = metric_in.has_value() ? *metric_in : *score_in;
  Construction c{};
  c.method = parse_method("tt_host.transform", method);
  c.batch = given.size(0);
  c.tokens = metric_in.has_value() ? metric_in->size(-2) : score_in->size(1);  // metric: N, D last
  c.r = r;
  c.k = k;
  c.prefix = prefix;
  c.tau = tau;
  c.alpha = c.method == Method::Spread ? alpha : 0.0;
  c.targets_b = targets == "b";
  c.ward = cost == "ward";
  const at::Tensor x = x_in.has_value() ? x_in->contiguous() : at::Tensor();
  const at::Tensor size = size_in.contiguous();
  const at::Tensor score = score_in.has_value() ? score_in->contiguous() : at::Tensor();
  const int64_t B = c.batch, N = c.tokens, K = c.slots(), n_out = N - r;
  const int64_t C = x.defined() ? x.size(2) : 0;
  // The metric as match.cu (its own dtype) or transform.cu (x's dtype, or fp32) reads it.
  const at::Tensor metric =
      metric_in.has_value()
          ? image::kernel_metric(*metric_in,
                                 x.defined() ? x.scalar_type() : metric_in->scalar_type())
          : at::Tensor();
  image::Step s = image::make_step(c, metric.defined() ? metric.size(2) : 0);
  s.rows_per_chunk = static_cast<int>(rows_per_chunk);
  const image::ApplyStep as{static_cast<int>(N), static_cast<int>(K), static_cast<int>(C),
                            static_cast<int>(n_out), parse_mode("tt_host.transform", mode)};
  auto dst = at::full({B, N, K}, -7, size.options().dtype(at::kLong));
  auto weight = at::full({B, N, K}, NAN, size.options());
  auto x_out = x.defined() ? at::full({B, n_out, C}, NAN, x.options()) : at::empty({0});
  auto size_out = at::full({B, n_out}, NAN, size.options());
  auto key = at::full({B, N}, NAN, size.options());  // poisoned: an unwritten key shows
  auto best = at::full({B, N}, -7, size.options().dtype(at::kInt));
  const int team = static_cast<int>(threads), parts = static_cast<int>(key_parts);
  if (!x.defined()) {  // match.cu
    TT_DISPATCH_FLOAT_TYPES(metric.defined() ? metric.scalar_type() : at::kFloat, "match_on_host",
                            [&] {
      choose_plan<scalar_t>(s, stage, packed, shared_limit, 0, metric);
      auto first = image::make_match_image<scalar_t>(metric, score, size, dst, weight);
      removal_keys(s, packed, team, shared_limit, parts, metric, first, key, best);
      launch_on_host(B, team, image::layout(s).bytes(s, sizeof(scalar_t)),
                     [&](auto& ex, int64_t b, void* shared) {
                       image::match_image(ex, s, first.image(s, b), shared);
                     });
    });
    return {x_out, size_out, dst, weight};
  }
  // transform.cu
  image::dispatch_dtypes(x.scalar_type(), metric, [&](auto metric_zero, auto x_zero) {
    using metric_t = decltype(metric_zero);
    using x_t = decltype(x_zero);
    choose_plan<metric_t>(s, stage, packed, shared_limit,
                          image::fused_apply_bytes(as, image::kBlockThreads / 32), metric);
    auto first = image::make_match_image<metric_t>(metric, score, size, dst, weight);
    removal_keys(s, packed, team, shared_limit, parts, metric, first, key, best);
    const auto first_apply = image::make_apply_image<x_t>(x, size, dst, weight, x_out, size_out);
    const int64_t bytes = std::max(image::layout(s).bytes(s, sizeof(metric_t)),
                                   image::fused_apply_bytes(as, host_warps(team)));
    constexpr int V = 16 / sizeof(x_t);
    const auto run = [&](auto width) {
      launch_on_host(B, team, bytes, [&](auto& ex, int64_t b, void* shared) {
        image::transform_image<decltype(width)::value>(ex, s, as, first.image(s, b),
                                                       first_apply.image(as, b), shared);
      });
    };
    if (packed && image::pack_width<x_t>(x.data_ptr(), C) == V)
      run(std::integral_constant<int, V>{});
    else
      run(std::integral_constant<int, 1>{});
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
