// tt_host.apply / tt_host.untransform: csrc/cuda/apply_image.cuh, the CUDA kernels' per-image
// code, run on CPU tensors (host_launch.h), in blocks of `rows_per_block` output rows (tokens),
// with or without 16-byte packs. Arguments are validated beforehand by check_apply/untransform.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/apply_image.cuh"
#include "host_launch.h"

namespace tt {
namespace {

template <typename x_t, int V>
void apply_all(const image::ApplyStep& s, const at::Tensor& x, const at::Tensor& size,
               const at::Tensor& dst, const at::Tensor& weight, const at::Tensor& out,
               const at::Tensor& size_out, int rows_per_block, int threads) {
  const int64_t bytes = 4 * static_cast<int64_t>(
                                image::apply_words(s, rows_per_block, host_warps(threads)));
  const image::ApplyImage<x_t> first{x.data_ptr<x_t>(),      size.data_ptr<float>(),
                                     dst.data_ptr<int64_t>(), weight.data_ptr<float>(),
                                     out.data_ptr<x_t>(),    size_out.data_ptr<float>()};
  launch_on_host(x.size(0), threads, bytes, [&](auto& ex, int64_t b, void* shared) {
    const image::ApplyImage<x_t> im = first.image(s, b);
    for (int row0 = 0; row0 < s.n_out; row0 += rows_per_block)
      image::apply_rows<V>(ex, s, im, row0, std::min(s.n_out, row0 + rows_per_block), shared);
  });
}

std::tuple<at::Tensor, at::Tensor> apply_on_host(const at::Tensor& x_in,
                                                 const at::Tensor& size_in,
                                                 const at::Tensor& dst_in,
                                                 const at::Tensor& weight_in, int64_t n_out,
                                                 c10::string_view mode, int64_t rows_per_block,
                                                 bool packed, int64_t threads) {
  const auto x = x_in.contiguous();
  const auto size = size_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const image::ApplyStep s{static_cast<int>(x.size(1)), static_cast<int>(dst.size(2)),
                           static_cast<int>(x.size(2)), static_cast<int>(n_out),
                           parse_mode("tt_host.apply", mode)};
  auto out = at::full({x.size(0), n_out, x.size(2)}, NAN, x.options());
  auto size_out = at::full({x.size(0), n_out}, NAN, size.options());
  TT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "apply_on_host", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const int rows = static_cast<int>(rows_per_block), team = static_cast<int>(threads);
    if (packed && image::pack_width<scalar_t>(x.data_ptr(), s.C) == V)
      apply_all<scalar_t, V>(s, x, size, dst, weight, out, size_out, rows, team);
    else
      apply_all<scalar_t, 1>(s, x, size, dst, weight, out, size_out, rows, team);
  });
  return {out, size_out};
}

at::Tensor untransform_on_host(const at::Tensor& y_in, const at::Tensor& dst_in,
                               const at::Tensor& weight_in, int64_t rows_per_block, bool packed,
                               int64_t threads) {
  const auto y = y_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = dst.size(0), N = dst.size(1), K = dst.size(2), C = y.size(2);
  auto out = at::full({B, N, C}, NAN, y.options());
  TT_DISPATCH_FLOAT_TYPES(y.scalar_type(), "untransform_on_host", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = packed && image::pack_width<scalar_t>(y.data_ptr(), C) == V;
    launch_on_host(B, static_cast<int>(threads), 0, [&](auto& ex, int64_t b, void*) {
      const scalar_t* yb = y.data_ptr<scalar_t>() + b * y.size(1) * C;
      const int64_t* db = dst.data_ptr<int64_t>() + b * N * K;
      const float* wb = weight.data_ptr<float>() + b * N * K;
      scalar_t* ob = out.data_ptr<scalar_t>() + b * N * C;
      for (int64_t t0 = 0; t0 < N; t0 += rows_per_block) {
        const int t1 = static_cast<int>(std::min(N, t0 + rows_per_block));
        if (vec)
          image::untransform_rows<V>(ex, K, C, yb, db, wb, ob, static_cast<int>(t0), t1);
        else
          image::untransform_rows<1>(ex, K, C, yb, db, wb, ob, static_cast<int>(t0), t1);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def(
      "apply(Tensor x, Tensor size, Tensor dst, Tensor weight, int n_out, str mode, "
      "int rows_per_block, bool packed, int threads) -> (Tensor, Tensor)");
  m.def(
      "untransform(Tensor y, Tensor dst, Tensor weight, int rows_per_block, bool packed, "
      "int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) {
  m.impl("apply", &apply_on_host);
  m.impl("untransform", &untransform_on_host);
}

}  // namespace tt
