// The class token's attention row for one image, averaged over heads in a fixed order: one warp
// per key for the logits, then a block softmax (executors: portable.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "../tt.h"
#include "portable.h"

namespace tt {
namespace image {

// q and k of one image, with their strides over heads, tokens and channels.
template <typename q_t, typename k_t>
struct Heads {
  const q_t* q;
  int64_t q_sh, q_sd;
  const k_t* k;
  int64_t k_sh, k_sn, k_sd;
  const float* size;  // null: no proportional-attention bias
  float* out;         // [N]
};

// `logits` is N floats of shared memory.
template <typename Exec, typename q_t, typename k_t>
TT_DEVICE void cls_attention_image(Exec& ex, int H, int N, int Dh, float scale,
                                   const Heads<q_t, k_t>& im, float* logits) {
  ex.for_each(N, [&](int j) { im.out[j] = 0.f; });
  for (int h = 0; h < H; ++h) {
    ex.for_each_warp(N, [&](int j, int lane, int lanes, int) {
      float dot = 0.f;
      for (int d = lane; d < Dh; d += lanes)
        dot += static_cast<float>(im.q[h * im.q_sh + d * im.q_sd]) *
               static_cast<float>(im.k[h * im.k_sh + j * im.k_sn + d * im.k_sd]);
      dot = ex.warp_sum(dot);
      if (lane == 0) logits[j] = dot * scale + (im.size ? logf(im.size[j]) : 0.f);
    });
    const float peak = ex.max(N, [&](int j) { return logits[j]; }, -INFINITY);
    const float total = ex.sum(N, [&](int j) { return expf(logits[j] - peak); });
    ex.for_each(N, [&](int j) { im.out[j] += expf(logits[j] - peak) / total; });
  }
  ex.for_each(N, [&](int j) { im.out[j] /= H; });
}

// Host side of a launch (cls_attention.cu, and tests/cuda_on_host).

// The queries as the kernels read them: in k's dtype, or else (autocast may give them another)
// the class token's row widened to fp32, exactly, so that five dtype pairs are compiled, not nine.
inline at::Tensor kernel_queries(const at::Tensor& q, const at::Tensor& k) {
  return q.scalar_type() == k.scalar_type() ? q : q.narrow(2, 0, 1).to(at::kFloat);
}

// f(q_t{}, k_t{}) for the launch's dtype pair (q from kernel_queries).
template <typename F>
void dispatch_heads(const at::Tensor& q, const at::Tensor& k, F f) {
  TT_DISPATCH_FLOAT_TYPES(k.scalar_type(), "tt_cls_attention", [&] {
    if (q.scalar_type() == k.scalar_type())
      f(scalar_t{}, scalar_t{});
    else
      f(float{}, scalar_t{});
  });
}

}  // namespace image
}  // namespace tt
