// X = T^T Y for one image, column-normalised (tt.untransform; executors: portable.h): one warp per
// token, V-element (16-byte) loads. untransform.cu runs it with a block per range of tokens.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "pack.cuh"
#include "portable.h"

namespace tt {
namespace image {

// untransform for tokens [t0, t1) of one image: out_t = sum_k (w_tk / sum_k w_tk) y_{dst_tk}.
template <int V, typename Exec, typename x_t>
TT_DEVICE void untransform_rows(Exec& ex, int K, int C, const x_t* y, const int64_t* dst,
                                const float* weight, x_t* out, int t0, int t1) {
  ex.for_each_warp(t1 - t0, [&](int i, int lane, int lanes, int) {
    const int64_t t = t0 + i;
    float total = 0.f;
    for (int k = 0; k < K; ++k) total += weight[t * K + k];
    for (int ch = lane * V; ch < C; ch += lanes * V) {
      float acc[V];
      for (int v = 0; v < V; ++v) acc[v] = 0.f;
      for (int k = 0; total > 0.f && k < K; ++k) {
        const float coef = weight[t * K + k] / total;
        const Pack<x_t, V> in = load_pack<V>(y + dst[t * K + k] * C + ch);
        for (int v = 0; v < V; ++v) acc[v] += coef * static_cast<float>(in.v[v]);
      }
      Pack<x_t, V> packed;
      for (int v = 0; v < V; ++v) packed.v[v] = static_cast<x_t>(acc[v]);
      store_pack<V>(out + t * C + ch, packed);
    }
  });
}

}  // namespace image
}  // namespace tt
