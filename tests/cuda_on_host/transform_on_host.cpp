// tt_host.transform: csrc/cuda/transform_image.cuh, the CUDA kernel's per-image code, run on CPU
// tensors (host_launch.h), with the plan (rows per chunk, staging, 16-byte packs, threads) chosen
// by the test, or (shared_limit > 0) the plan a GPU with that much shared memory would choose.
// Arguments are validated beforehand by torch.ops.tt.check_transform / check_match.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda/transform_image.cuh"
#include "host_launch.h"

namespace tt {
namespace {

Method parse_method(c10::string_view m) {
  return m == "prune" ? Method::Prune
         : m == "evit" ? Method::Evit
         : m == "tome" ? Method::Tome
                       : Method::Transform;
}

Mode parse_mode(c10::string_view m) {
  return m == "sum" ? Mode::Sum : m == "norm" ? Mode::Norm : Mode::Mean;
}

template <typename metric_t, typename x_t, int V>
void run(image::Step s, bool stage, bool packed, int threads, int64_t shared_limit,
         const at::Tensor& metric, const at::Tensor& score, const at::Tensor& size,
         const at::Tensor& dst, const at::Tensor& weight, const at::Tensor& x,
         const at::Tensor& x_out, const at::Tensor& size_out) {
  const metric_t* ptr = metric.defined() ? metric.data_ptr<metric_t>() : nullptr;
  const int64_t sn = metric.defined() ? metric.stride(1) : 0;
  const int64_t sb = metric.defined() ? metric.stride(0) : 0;
  if (shared_limit > 0) {  // the plan a GPU with this much shared memory per block would make
    TORCH_CHECK(image::plan(s, ptr, sn, sb, shared_limit, image::kBlockThreads / 32) > 0,
                "no plan fits ", shared_limit, " bytes");
  } else {
    stage = stage && s.needs_affinity;
    s.metric_packed = s.needs_affinity && packed && image::metric_packs(s.D, stage, ptr, sn, sb);
    s.metric_ld = stage ? image::staged_ld(s.D, sizeof(metric_t), s.metric_packed) : 0;
  }
  image::Batch<metric_t, x_t> batch{};
  if (metric.defined()) {
    batch.first.metric = metric.data_ptr<metric_t>();
    batch.first.metric_sn = metric.stride(1);
    batch.metric_sb = metric.stride(0);
  }
  batch.first.score = score.defined() ? score.data_ptr<float>() : nullptr;
  batch.first.size = size.data_ptr<float>();
  batch.first.dst = dst.data_ptr<int64_t>();
  batch.first.weight = weight.data_ptr<float>();
  if (x.defined()) {
    batch.first.x = x.data_ptr<x_t>();
    batch.first.x_out = x_out.data_ptr<x_t>();
    batch.first.size_out = size_out.data_ptr<float>();
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
    int64_t rows_per_chunk, bool stage, bool packed, int64_t threads, int64_t shared_limit) {
  const at::Tensor& ref = metric_in.has_value() ? *metric_in : *score_in;
  Construction c{};
  c.method = parse_method(method);
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
  at::Tensor metric = metric_in.has_value() ? *metric_in : at::Tensor();
  const int64_t B = c.batch, N = c.tokens, K = c.slots(), n_out = N - r;
  const int64_t C = x.defined() ? x.size(2) : 0;
  image::Step s = image::make_step(c, metric.defined() ? metric.size(2) : 0, C, parse_mode(mode));
  s.rows_per_chunk = static_cast<int>(rows_per_chunk);
  auto dst = at::full({B, N, K}, -7, size.options().dtype(at::kLong));
  auto weight = at::full({B, N, K}, NAN, size.options());
  auto x_out = x.defined() ? at::full({B, n_out, C}, NAN, x.options()) : at::empty({0});
  auto size_out = at::full({B, n_out}, NAN, size.options());
  const auto x_type = x.defined() ? x.scalar_type()
                                  : (metric.defined() ? metric.scalar_type() : at::kFloat);
  if (metric.defined() && metric.scalar_type() != x_type) metric = metric.to(at::kFloat);
  if (metric.defined() && metric.stride(2) != 1) metric = metric.contiguous();
  TT_DISPATCH_FLOAT_TYPES(x_type, "transform_on_host", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = packed && x.defined() && image::pack_width<scalar_t>(x.data_ptr(), C) == V;
    const auto go = [&](auto metric_zero, auto width) {
      using metric_t = decltype(metric_zero);
      run<metric_t, scalar_t, decltype(width)::value>(s, stage, packed, static_cast<int>(threads),
                                                     shared_limit, metric, score, size, dst,
                                                     weight, x, x_out, size_out);
    };
    const bool same = !metric.defined() || metric.scalar_type() == x_type;
    if (same && vec) go(scalar_t{}, std::integral_constant<int, V>{});
    if (same && !vec) go(scalar_t{}, std::integral_constant<int, 1>{});
    if (!same && vec) go(float{}, std::integral_constant<int, V>{});
    if (!same && !vec) go(float{}, std::integral_constant<int, 1>{});
  });
  return {x_out, size_out, dst, weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def(
      "transform(Tensor? x, Tensor size, Tensor? metric, Tensor? score, int r, str method, int k, "
      "float tau, float alpha, str targets, int prefix, str mode, str cost, int rows_per_chunk, "
      "bool stage, bool packed, int threads, int shared_limit=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) { m.impl("transform", &transform_on_host); }

}  // namespace tt
