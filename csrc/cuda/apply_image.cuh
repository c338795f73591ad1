// X' = T X for one image, in gather form (executors: portable.h): T laid out by output row
// (entries j * K + slot, ascending, whatever the atomics did), then one warp per output row sums
// its inputs in that order into an fp32 row buffer, reading each input row once with V-element
// (16-byte) loads. A block may take a range of output rows, so that a small batch still spreads
// over the GPU. apply.cu runs it alone, transform.cu after match_image (transform_image.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "../tt.h"
#include "pack.cuh"
#include "portable.h"

namespace tt {
namespace image {

struct ApplyStep {
  int N, K, C, n_out;
  Mode mode;
};

template <typename x_t>
struct ApplyImage {
  const x_t* x;  // [N, C]
  const float* size;
  const int64_t* dst;
  const float* weight;
  x_t* x_out;  // [n_out, C]
  float* size_out;

  // Image b of a batch that starts here.
  TT_DEVICE ApplyImage image(const ApplyStep& s, int64_t b) const {
    const int64_t nk = static_cast<int64_t>(s.N) * s.K;
    return {x + b * s.N * s.C, size + b * s.N, dst + b * nk, weight + b * nk,
            x_out + b * s.n_out * s.C, size_out + b * s.n_out};
  }
};

// The kernels' view of a batch (x_out and size_out: the outputs).
template <typename x_t>
ApplyImage<x_t> make_apply_image(const at::Tensor& x, const at::Tensor& size,
                                 const at::Tensor& dst, const at::Tensor& weight,
                                 const at::Tensor& x_out, const at::Tensor& size_out) {
  return {x.data_ptr<x_t>(),     size.data_ptr<float>(), dst.data_ptr<int64_t>(),
          weight.data_ptr<float>(), x_out.data_ptr<x_t>(), size_out.data_ptr<float>()};
}

// Shared words for `rows` output rows and `warps` warps.
TT_HOST_DEVICE int apply_words(const ApplyStep& s, int rows, int warps) {
  return 2 * rows + 1 + s.N * s.K + warps * s.C;
}

// Output rows [row0, row1) of one image.
template <int V, typename Exec, typename x_t>
TT_DEVICE void apply_rows(Exec& ex, const ApplyStep& s, const ApplyImage<x_t>& im, int row0,
                          int row1, void* shared) {
  const int rows = row1 - row0, NK = s.N * s.K, K = s.K, C = s.C;
  int* start = static_cast<int*>(shared);
  int* cursor = start + rows + 1;
  int* entry = cursor + rows;
  float* row_buf = reinterpret_cast<float*>(entry + NK);
  const int64_t* dst = im.dst;
  const float* weight = im.weight;
  const auto mine = [&](int e) { return weight[e] != 0.f && dst[e] >= row0 && dst[e] < row1; };
  ex.for_each(rows + 1, [&](int i) { start[i] = 0; });
  ex.for_each(NK, [&](int e) {
    if (mine(e)) ex.atomic_add(start + (dst[e] - row0) + 1, 1);
  });
  ex.single([&] {
    for (int i = 0; i < rows; ++i) start[i + 1] += start[i];
  });
  ex.for_each(rows, [&](int i) { cursor[i] = start[i]; });
  ex.for_each(NK, [&](int e) {
    if (mine(e)) entry[ex.atomic_add(cursor + (dst[e] - row0), 1)] = e;
  });
  ex.for_each(rows, [&](int i) {
    for (int a = start[i] + 1; a < start[i + 1]; ++a) {
      const int v = entry[a];
      int p = a;
      for (; p > start[i] && entry[p - 1] > v; --p) entry[p] = entry[p - 1];
      entry[p] = v;
    }
    float total = 0.f;
    for (int a = start[i]; a < start[i + 1]; ++a) total += weight[entry[a]] * im.size[entry[a] / K];
    im.size_out[row0 + i] = total;
  });

  ex.for_each_warp(rows, [&](int i, int lane, int lanes, int warp) {
    float* acc = row_buf + warp * C;
    for (int ch = lane * V; ch < C; ch += lanes * V)
      for (int v = 0; v < V; ++v) acc[ch + v] = 0.f;
    float norm = 0.f;  // mode norm: the coefficient-weighted sum of the inputs' norms
    for (int a = start[i]; a < start[i + 1]; ++a) {
      const int e = entry[a], j = e / K;
      const float coef = s.mode == Mode::Sum ? weight[e] : weight[e] * im.size[j];
      const x_t* xj = im.x + static_cast<int64_t>(j) * C;
      float square = 0.f;
      for (int ch = lane * V; ch < C; ch += lanes * V) {
        const Pack<x_t, V> in = load_pack<V>(xj + ch);
        for (int v = 0; v < V; ++v) {
          const float value = static_cast<float>(in.v[v]);
          acc[ch + v] += coef * value;
          square += value * value;
        }
      }
      if (s.mode == Mode::Norm) norm += coef * sqrtf(ex.warp_sum(square));
    }
    // Mean rows divide by their size; a row that receives nothing stays zero.
    const float total = im.size_out[row0 + i];
    float length = 0.f;
    if (s.mode == Mode::Norm) {
      float square = 0.f;
      for (int ch = lane * V; ch < C; ch += lanes * V)
        for (int v = 0; v < V; ++v) {
          acc[ch + v] = total > 0.f ? acc[ch + v] / total : 0.f;
          square += acc[ch + v] * acc[ch + v];
        }
      length = sqrtf(ex.warp_sum(square));
    }
    x_t* out = im.x_out + static_cast<int64_t>(row0 + i) * C;
    for (int ch = lane * V; ch < C; ch += lanes * V) {
      Pack<x_t, V> packed;
      for (int v = 0; v < V; ++v) {
        float value = acc[ch + v];
        if (s.mode == Mode::Mean) value = total > 0.f ? value / total : 0.f;
        if (s.mode == Mode::Norm)
          value *= length > 0.f && total > 0.f ? (norm / total) / length : 0.f;
        packed.v[v] = static_cast<x_t>(value);
      }
      store_pack<V>(out + ch, packed);
    }
  });
}

}  // namespace image
}  // namespace tt
