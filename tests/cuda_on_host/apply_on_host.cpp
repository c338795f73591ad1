// tt_host.apply: csrc/cuda/apply_image.cuh, the CUDA kernel's per-image code, run on CPU tensors
// (host_launch.h), in blocks of `rows_per_block` output rows, with or without 16-byte packs.
// Arguments are validated beforehand by check_apply.
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
  const auto first = image::make_apply_image<x_t>(x, size, dst, weight, out, size_out);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def(
      "apply(Tensor x, Tensor size, Tensor dst, Tensor weight, int n_out, str mode, "
      "int rows_per_block, bool packed, int threads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) { m.impl("apply", &apply_on_host); }

}  // namespace tt
