// CPU tt.apply (X' = T X) in the deterministic gather form: every output row sums its
// contributions in ascending input order, in fp32, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../tt.h"
#include "kernels.h"
#include "sum_of_squares.h"

namespace tt {
namespace {

// T transposed into rows: for each image, the (input token, coefficient) pairs of each output row.
struct RowLists {
  std::vector<int64_t> start;  // [B, n_out + 1]
  std::vector<int64_t> token;  // [B, N * K]
  std::vector<float> coef;     // [B, N * K]
};

RowLists transpose_rows(const float* size, const int64_t* dst, const float* weight, int64_t B,
                        int64_t N, int64_t K, int64_t n_out, Mode mode, float* size_out) {
  RowLists lists{std::vector<int64_t>(B * (n_out + 1), 0), std::vector<int64_t>(B * N * K),
                 std::vector<float>(B * N * K)};
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* start = lists.start.data() + b * (n_out + 1);
      const int64_t* d = dst + b * N * K;
      const float* w = weight + b * N * K;
      for (int64_t e = 0; e < N * K; ++e)
        if (w[e] != 0) ++start[d[e] + 1];
      for (int64_t i = 0; i < n_out; ++i) start[i + 1] += start[i];
      std::vector<int64_t> cursor(start, start + n_out);
      float* so = size_out + b * n_out;
      for (int64_t i = 0; i < n_out; ++i) so[i] = 0;
      for (int64_t e = 0; e < N * K; ++e) {
        if (w[e] == 0) continue;
        const int64_t j = e / K;
        const float mass = w[e] * size[b * N + j];
        so[d[e]] += mass;
        const int64_t slot = b * N * K + cursor[d[e]]++;
        lists.token[slot] = j;
        lists.coef[slot] = mode == Mode::Sum ? w[e] : mass;
      }
    }
  });
  return lists;
}

template <typename scalar_t>
void gather_rows(const RowLists& lists, const scalar_t* x, const float* size_out, int64_t B,
                 int64_t N, int64_t K, int64_t C, int64_t n_out, Mode mode, scalar_t* out) {
  at::parallel_for(0, B * n_out, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(C);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / n_out, i = row % n_out;
      const int64_t* start = lists.start.data() + b * (n_out + 1);
      const int64_t* token = lists.token.data() + b * N * K;
      const float* coef = lists.coef.data() + b * N * K;
      const float total = size_out[row];
      scalar_t* o = out + row * C;
      // A row with one input that nothing rescales is that input (mean and norm: x s / s; sum:
      // weight 1): most rows are a kept token's own, and they are copied exactly.
      if (start[i + 1] - start[i] == 1 &&
          (mode == Mode::Sum ? coef[start[i]] == 1.f : total > 0)) {
        std::copy_n(x + (b * N + token[start[i]]) * C, C, o);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float norm = 0;  // the coefficient-weighted sum of the inputs' norms (mode norm)
      for (int64_t e = start[i]; e < start[i + 1]; ++e) {
        const scalar_t* xj = x + (b * N + token[e]) * C;
        for (int64_t ch = 0; ch < C; ++ch) acc[ch] += coef[e] * static_cast<float>(xj[ch]);
        if (mode == Mode::Norm) norm += coef[e] * std::sqrt(sum_of_squares(xj, C));
      }
      // Mean rows divide by their size; a row that receives nothing stays zero.
      if (mode != Mode::Sum)
        for (int64_t ch = 0; ch < C; ++ch) acc[ch] = total > 0 ? acc[ch] / total : 0.f;
      if (mode == Mode::Norm) {
        const float length = std::sqrt(sum_of_squares(acc.data(), C));
        const float scale = length > 0 && total > 0 ? (norm / total) / length : 0.f;
        for (int64_t ch = 0; ch < C; ++ch) acc[ch] *= scale;
      }
      for (int64_t ch = 0; ch < C; ++ch) o[ch] = static_cast<scalar_t>(acc[ch]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> apply_cpu(const at::Tensor& x, const at::Tensor& size,
                                             const at::Tensor& dst, const at::Tensor& weight,
                                             int64_t n_out, c10::string_view mode) {
  return apply_cpu_impl(x, size, dst, weight, n_out,
                        check_apply("tt.apply", x, size, dst, weight, n_out, mode));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_cpu_impl(const at::Tensor& x_in, const at::Tensor& size_in,
                                                  const at::Tensor& dst_in,
                                                  const at::Tensor& weight_in, int64_t n_out,
                                                  Mode mode) {
  const auto x = x_in.contiguous();
  const auto size = size_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = dst.size(2);
  auto out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::empty({B, n_out}, size.options());
  const RowLists lists = transpose_rows(size.data_ptr<float>(), dst.data_ptr<int64_t>(),
                                        weight.data_ptr<float>(), B, N, K, n_out, mode,
                                        size_out.data_ptr<float>());
  TT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tt_apply_cpu", [&] {
    gather_rows<scalar_t>(lists, x.data_ptr<scalar_t>(), size_out.data_ptr<float>(), B, N, K, C,
                          n_out, mode, out.data_ptr<scalar_t>());
  });
  return {out, size_out};
}

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("apply", &apply_cpu); }

}  // namespace tt
