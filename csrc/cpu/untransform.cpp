// CPU tt.untransform: every token takes the weight-normalised sum of the output rows it went to,
// in fp32, in slot order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../tt.h"

namespace tt {
namespace {

template <typename scalar_t>
void untransform_rows(const scalar_t* y, const int64_t* dst, const float* weight, int64_t B,
                        int64_t N, int64_t K, int64_t C, int64_t n_y, scalar_t* out) {
  at::parallel_for(0, B * N, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N;
      const float* w = weight + t * K;
      const int64_t* d = dst + t * K;
      float total = 0;
      for (int64_t k = 0; k < K; ++k) total += w[k];
      std::fill(acc.begin(), acc.end(), 0.f);
      if (total > 0) {
        for (int64_t k = 0; k < K; ++k) {
          const float coef = w[k] / total;
          const scalar_t* yi = y + (b * n_y + d[k]) * C;
          for (int64_t ch = 0; ch < C; ++ch) acc[ch] += coef * static_cast<float>(yi[ch]);
        }
      }
      scalar_t* o = out + t * C;
      for (int64_t ch = 0; ch < C; ++ch) o[ch] = static_cast<scalar_t>(acc[ch]);
    }
  });
}

at::Tensor untransform_cpu(const at::Tensor& y_in, const at::Tensor& dst_in,
                           const at::Tensor& weight_in) {
  check_untransform(y_in, dst_in, weight_in);
  const auto y = y_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = dst.size(0), N = dst.size(1), K = dst.size(2), C = y.size(2);
  auto out = at::empty({B, N, C}, y.options());
  TT_DISPATCH_FLOAT_TYPES(y.scalar_type(), "tt_untransform_cpu", [&] {
    untransform_rows<scalar_t>(y.data_ptr<scalar_t>(), dst.data_ptr<int64_t>(),
                                 weight.data_ptr<float>(), B, N, K, C, y.size(1),
                                 out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("untransform", &untransform_cpu); }

}  // namespace tt
