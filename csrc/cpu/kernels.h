// The CPU kernels on validated inputs that tt.transform's CPU kernel composes (transform.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../tt.h"

namespace tt {

// dst and weight [B, N, K] of the construction `c` (match.cpp).
std::tuple<at::Tensor, at::Tensor> match_cpu_impl(const Construction& c,
                                                  const std::optional<at::Tensor>& metric,
                                                  const std::optional<at::Tensor>& score,
                                                  const at::Tensor& size);
// x' [B, n_out, C] and size' [B, n_out] (apply.cpp).
std::tuple<at::Tensor, at::Tensor> apply_cpu_impl(const at::Tensor& x, const at::Tensor& size,
                                                  const at::Tensor& dst, const at::Tensor& weight,
                                                  int64_t n_out, Mode mode);

}  // namespace tt
