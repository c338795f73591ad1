// The fused reduction step for one image: T's construction (match_image.cuh), then X' = T X
// (apply_image.cuh) in the same block, its shared memory reused. transform.cu runs it with one
// CUDA block per image; tests/cuda_on_host/ runs the same source on the CPU (see portable.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../tt.h"
#include "apply_image.cuh"
#include "match_image.cuh"
#include "portable.h"

namespace tt {
namespace image {

// V: x elements per load and store in the apply.
template <int V, typename Exec, typename metric_t, typename x_t>
TT_DEVICE void transform_image(Exec& ex, const Step& s, const ApplyStep& as,
                               const MatchImage<metric_t>& m, const ApplyImage<x_t>& a,
                               void* shared) {
  match_image(ex, s, m, shared);
  apply_rows<V>(ex, as, a, 0, as.n_out, shared);
}

// Host side of a launch (transform.cu, and tests/cuda_on_host).

// The bytes of the apply after the construction, in a block of `warps` warps.
inline int64_t fused_apply_bytes(const ApplyStep& as, int warps) {
  return 4 * static_cast<int64_t>(apply_words(as, as.n_out, warps));
}

// f(metric_t{}, x_t{}) for the step's dtype pair: x's dtype, the metric in it or else in fp32
// (kernel_metric(metric, x's dtype)), so that five pairs are compiled.
template <typename F>
void dispatch_dtypes(at::ScalarType dtype, const at::Tensor& metric, F f) {
  TT_DISPATCH_FLOAT_TYPES(dtype, "tt_transform", [&] {
    if (!metric.defined() || metric.scalar_type() == dtype)
      f(scalar_t{}, scalar_t{});
    else
      f(float{}, scalar_t{});
  });
}

}  // namespace image
}  // namespace tt
