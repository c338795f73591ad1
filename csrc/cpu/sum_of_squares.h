// |v|^2 of a D-long row, in fp32, for the CPU kernels' norms (match's metric rows, apply's rows
// in mode "norm").
#pragma once

#include <cstdint>

namespace tt {

// Summed in kLanes interleaved partial sums, which vectorise, where one running sum is a chain of
// dependent additions (a 384-wide row: 384 additions in a row, each waiting for the last); any
// order of the D terms is within the kernels' error bounds (verify.cosine_error, apply's
// tolerances). A loop and not an ATen norm: at batch 1 each op costs microseconds, more between a
// model's GEMMs.
template <typename scalar_t>
float sum_of_squares(const scalar_t* v, int64_t D) {
  constexpr int kLanes = 8;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float value = static_cast<float>(v[d + l]);
      part[l] += value * value;
    }
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  for (; d < D; ++d) total += static_cast<float>(v[d]) * static_cast<float>(v[d]);
  return total;
}

}  // namespace tt
