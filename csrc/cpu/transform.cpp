// CPU tt.transform, the fused reduction step: T's construction (match.cpp), then X' = T X
// (apply.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../tt.h"
#include "kernels.h"

namespace tt {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transform_cpu(
    const at::Tensor& x, const at::Tensor& size, const std::optional<at::Tensor>& metric,
    const std::optional<at::Tensor>& score, int64_t r, c10::string_view method, int64_t k,
    double tau, double alpha, c10::string_view targets, int64_t prefix, c10::string_view mode,
    c10::string_view cost) {
  const Construction c = check_match("tt.transform", metric, score, size, r, method, k, tau,
                                     alpha, targets, prefix, cost);
  const Mode how = check_transform(x, size, c, mode);
  auto [dst, weight] = match_cpu_impl(c, metric, score, size);
  auto [x_out, size_out] = apply_cpu_impl(x, size, dst, weight, c.tokens - c.r, how);
  return {x_out, size_out, dst, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("transform", &transform_cpu); }

}  // namespace tt
