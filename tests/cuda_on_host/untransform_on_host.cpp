// tt_host.untransform: csrc/cuda/untransform_image.cuh, the CUDA kernel's per-image code, run on
// CPU tensors (host_launch.h), in blocks of `rows_per_block` tokens, with or without 16-byte
// packs. Arguments are validated beforehand by check_untransform.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/untransform_image.cuh"
#include "host_launch.h"
#include "tt.h"

namespace tt {
namespace {

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
      "untransform(Tensor y, Tensor dst, Tensor weight, int rows_per_block, bool packed, "
      "int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) { m.impl("untransform", &untransform_on_host); }

}  // namespace tt
