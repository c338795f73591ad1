// CPU importance score: the class token's attention row only, never the N x N matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../tt.h"

namespace tt {
namespace {

template <typename scalar_t>
void cls_attention_rows(const scalar_t* q, const scalar_t* k, const float* size, int64_t B,
                        int64_t H, int64_t Nq, int64_t N, int64_t D, float scale, float* out) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> logits(N), query(D);
    for (int64_t b = b0; b < b1; ++b) {
      float* o = out + b * N;
      std::fill(o, o + N, 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* q0 = q + ((b * H + h) * Nq) * D;
        const scalar_t* kh = k + (b * H + h) * N * D;
        for (int64_t d = 0; d < D; ++d) query[d] = static_cast<float>(q0[d]);
        float peak = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < N; ++j) {
          float dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += query[d] * static_cast<float>(kh[j * D + d]);
          logits[j] = dot * scale + (size ? std::log(size[b * N + j]) : 0.f);
          peak = std::max(peak, logits[j]);
        }
        float total = 0;
        for (int64_t j = 0; j < N; ++j) total += (logits[j] = std::exp(logits[j] - peak));
        for (int64_t j = 0; j < N; ++j) o[j] += logits[j] / total;
      }
      for (int64_t j = 0; j < N; ++j) o[j] /= static_cast<float>(H);
    }
  });
}

at::Tensor cls_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                             const std::optional<at::Tensor>& size_in,
                             std::optional<double> scale) {
  const float s = static_cast<float>(check_cls_attention(q_in, k_in, size_in, scale));
  const auto q = q_in.contiguous();
  const auto k = k_in.contiguous();
  const auto size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3);
  auto out = at::empty({B, N}, k.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tt_cls_attention_cpu",
                                  [&] {
                                    cls_attention_rows<scalar_t>(
                                        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                        size.defined() ? size.data_ptr<float>() : nullptr, B, H,
                                        q.size(2), N, D, s, out.data_ptr<float>());
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("cls_attention", &cls_attention_cpu); }

}  // namespace tt
