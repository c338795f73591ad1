// CPU tt.match: the constructions of T (prune, evit, tome, spread), one image at a time. Which
// tokens leave comes first (by importance or by redundancy), then where each one goes. The
// cosine similarities come from one batched fp32 GEMM of the raw metric over the pairs the
// construction reads (A x B tokens for ToMe and targets "b"), scaled by both tokens' inverse norms
// (no normalised copy of the metric is written; the rounding stays within verify.cosine_error),
// and every affinity follows the reference's formula, so selections are the reference's (float64)
// except between affinities within fp32 rounding of each other; exact ties go to the lower index
// in both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../tt.h"
#include "kernels.h"
#include "sum_of_squares.h"

namespace tt {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The first of ToMe's B tokens (the odd unprotected ones, the targets of its choice).
int64_t first_b(int64_t prefix) { return prefix + 1 - prefix % 2; }

// The tokens start, start + step, ...: the rows or the columns of the affinities.
struct Tokens {
  int64_t start, step, count;
  int64_t token(int64_t i) const { return start + step * i; }
  int64_t index(int64_t token) const { return (token - start) / step; }
};

// What one image's affinities hold: a row for each token that may leave (the A tokens by
// redundancy, every token by importance), a column for each token it is compared with (only the B
// tokens where nothing reads the others: ToMe's best B token, targets "b"; else every token).
struct Grid {
  Tokens rows, cols;
  explicit Grid(const Construction& c) {
    const int64_t N = c.tokens, P = c.prefix;
    rows = c.by_importance() ? Tokens{0, 1, N} : Tokens{first_a(P), 2, a_count(N, P)};
    cols = c.method == Method::Tome || c.targets_b
               ? Tokens{first_b(P), 2, std::max<int64_t>(N - first_b(P) + 1, 0) / 2}
               : Tokens{0, 1, N};
  }
};

// The metric's rows `tokens`, [B, count, D], read where they lie (the model's queries are a
// strided view).
at::Tensor rows_of(const at::Tensor& metric, const Tokens& tokens) {
  return metric.slice(1, tokens.start, tokens.start + tokens.step * tokens.count, tokens.step);
}

// The dot products of the grid's rows with its columns [B, rows, cols], fp32, from the metric
// in fp32 with contiguous channels (`fp32_rows`).
at::Tensor dot_products(const at::Tensor& metric, const Grid& grid) {
  const at::Tensor rows = rows_of(metric, grid.rows);
  const bool same = grid.rows.step == grid.cols.step && grid.rows.start == grid.cols.start;
  return at::bmm(rows, (same ? rows : rows_of(metric, grid.cols)).transpose(1, 2));
}

// The metric as the loops read it: fp32, each token's channels contiguous.
at::Tensor fp32_rows(const at::Tensor& metric_in) {
  auto metric = metric_in.scalar_type() == at::kFloat ? metric_in : metric_in.to(at::kFloat);
  return metric.stride(2) == 1 ? metric : metric.contiguous();
}

// Sorts `tokens` by key, descending; equal keys keep ascending token order.
void sort_descending(std::vector<int64_t>& tokens, const std::vector<float>& key) {
  std::stable_sort(tokens.begin(), tokens.end(),
                   [&](int64_t a, int64_t b) { return key[a] > key[b]; });
}

// The affinities in place of the dot products: the cosine dot inv_norm_i inv_norm_j, and for
// Ward's cost -(size_i size_j / (size_i + size_j)) (1 - cosine), as the reference. The columns'
// inverse norms and sizes are gathered side by side first, so that each row's loop is elementwise
// over contiguous arrays and vectorises (the same operations in the same order).
void affinities(float* sim, const float* inv_norm, const float* size, bool ward,
                const Grid& grid) {
  const int64_t n_cols = grid.cols.count;
  std::vector<float> col_inv(n_cols), col_size(n_cols);
  for (int64_t j = 0; j < n_cols; ++j) {
    col_inv[j] = inv_norm[grid.cols.token(j)];
    col_size[j] = size[grid.cols.token(j)];
  }
  for (int64_t i = 0; i < grid.rows.count; ++i) {
    const float inv_i = inv_norm[grid.rows.token(i)];
    const float s_i = size[grid.rows.token(i)];
    float* row = sim + i * n_cols;
    if (ward) {
      for (int64_t j = 0; j < n_cols; ++j) {
        const float cosine = row[j] * inv_i * col_inv[j];
        row[j] = -(s_i * col_size[j] / std::max(s_i + col_size[j], SCORE_EPS) * (1.f - cosine));
      }
    } else {
      for (int64_t j = 0; j < n_cols; ++j) row[j] = row[j] * inv_i * col_inv[j];
    }
  }
}

// Who leaves by importance (prune, evit, spread with alpha = 1): all but the n_keep highest
// scores after the prefix; on ties the lower index stays.
void choose_by_importance(const Construction& c, const float* score, std::vector<char>& keep) {
  const int64_t N = c.tokens, P = c.prefix;
  std::vector<int64_t> order;
  std::vector<float> key(N, kNegInf);
  for (int64_t j = P; j < N; ++j) order.push_back(j), key[j] = score[j];
  sort_descending(order, key);
  for (size_t i = n_keep(c.method, N, c.r, P); i < order.size(); ++i) keep[order[i]] = 0;
}

// One image's affinities: row(t) holds token t's, at the grid's columns.
struct Affinities {
  float* data;
  const Grid& grid;
  const float* row(int64_t token) const {
    return data + grid.rows.index(token) * grid.cols.count;
  }
};

// The first of the largest of v[0], v[step], ..., v[(n - 1) step] (NaN is never the largest) and
// its value; (-1, -inf) where none exceeds -inf. The same as one pass that keeps each value above
// all before it, but run as kLanes interleaved passes (each keeps its own first largest; the
// lanes' largest then wins, the lower index on ties): independent comparisons, which the CPU
// overlaps, instead of one chain of dependent ones.
std::pair<int64_t, float> first_max(const float* v, int64_t n, int64_t step) {
  constexpr int kLanes = 8;
  float best[kLanes];
  int64_t at[kLanes];
  std::fill_n(best, kLanes, kNegInf);
  std::fill_n(at, kLanes, -1);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l)
      if (v[(j + l) * step] > best[l]) best[l] = v[(j + l) * step], at[l] = j + l;
  std::pair<int64_t, float> first{-1, kNegInf};
  for (; j < n; ++j)
    if (v[j * step] > first.second) first = {j, v[j * step]};
  for (int l = 0; l < kLanes; ++l)
    if (best[l] > first.second || (best[l] == first.second && at[l] >= 0 && at[l] < first.first))
      first = {at[l], best[l]};
  return first;
}

// Who leaves by redundancy (ToMe's bipartite choice): the r A tokens most similar to a B token,
// their similarity optionally mixed with unimportance (alpha > 0); best_b[a]: A token a's most
// similar B token.
void choose_by_redundancy(const Construction& c, const Affinities& sim, const float* score,
                          std::vector<char>& keep, std::vector<int64_t>& best_b) {
  const int64_t N = c.tokens, P = c.prefix;
  std::vector<int64_t> order;
  std::vector<float> key(N, kNegInf);
  float top_score = SCORE_EPS;
  if (c.alpha > 0)
    for (int64_t j = P; j < N; ++j) top_score = std::max(top_score, score[j]);
  const float w_red = static_cast<float>(1.0 - c.alpha), w_imp = static_cast<float>(c.alpha);
  const int64_t col0 = sim.grid.cols.index(first_b(P)), step = 2 / sim.grid.cols.step;
  const int64_t n_b = std::max<int64_t>(N - first_b(P) + 1, 0) / 2;
  for (int64_t a = first_a(P); a < N; a += 2) {
    const auto [i, best] = first_max(sim.row(a) + col0, n_b, step);
    if (i >= 0) best_b[a] = first_b(P) + 2 * i;
    key[a] = c.alpha > 0 ? best * w_red + (1.f - score[a] / top_score) * w_imp : best;
    order.push_back(a);
  }
  sort_descending(order, key);
  for (int64_t i = 0; i < c.r; ++i) keep[order[i]] = 0;
}

// spread: removed token j's slots d/w, its k most similar allowed targets (kept, after the
// prefix, B tokens only with targets "b"), weighted softmax(affinity / tau); none found: pruned
// (weights stay 0). top/val: k entries of scratch.
void spread(const Construction& c, const Affinities& sim, int64_t j,
            const std::vector<char>& keep, const std::vector<int64_t>& row_of,
            std::vector<int64_t>& top, std::vector<float>& val, int64_t* d, float* w) {
  const int64_t N = c.tokens, P = c.prefix, K = c.k;
  const float* row = sim.row(j);
  // The allowed targets in ascending order, inserted into a descending list (strict > keeps the
  // lower index on ties).
  const int64_t first = c.targets_b ? first_b(P) : P, step = c.targets_b ? 2 : 1;
  const int64_t col_step = step / sim.grid.cols.step;
  int64_t found = 0;
  for (int64_t t = first, col = sim.grid.cols.index(first); t < N; t += step, col += col_step) {
    if (!keep[t]) continue;
    const float v = row[col];
    if (found == K && !(v > val[K - 1])) continue;
    int64_t pos = std::min(found, K - 1);
    while (pos > 0 && v > val[pos - 1]) {
      val[pos] = val[pos - 1];
      top[pos] = top[pos - 1];
      --pos;
    }
    val[pos] = v;
    top[pos] = t;
    found = std::min(found + 1, K);
  }
  // softmax(affinity / tau) over the targets found, as torch.softmax computes it.
  const float tau = static_cast<float>(c.tau);
  float peak = kNegInf, total = 0;
  for (int64_t s = 0; s < found; ++s) peak = std::max(peak, val[s] / tau);
  for (int64_t s = 0; s < found; ++s) total += (w[s] = std::exp(val[s] / tau - peak));
  for (int64_t s = 0; s < found; ++s) {
    w[s] /= total;
    d[s] = row_of[top[s]];
  }
}

// An image's metric: N rows of D fp32 channels, `stride` apart.
struct Metric {
  const float* data;
  int64_t stride, D;
};

// 1 / |metric row t| of every token, a zero row's norm clamped to NORM_EPS (its cosines are 0).
std::vector<float> inverse_norms(const Metric& m, int64_t N) {
  std::vector<float> inv(N);
  for (int64_t t = 0; t < N; ++t)
    inv[t] = 1.f / std::max(std::sqrt(sum_of_squares(m.data + t * m.stride, m.D)), NORM_EPS);
  return inv;
}

// One image: fills dst/weight [N, K] from its dot products and metric (sim.data and metric.data
// null when the construction reads none), `score` [N] and `size` [N].
void match_image(const Construction& c, const Affinities& sim, const Metric& metric,
                 const float* score, const float* size, int64_t* dst, float* weight) {
  const int64_t N = c.tokens, K = c.slots();
  if (sim.data) affinities(sim.data, inverse_norms(metric, N).data(), size, c.ward, sim.grid);

  std::vector<char> keep(N, 1);
  std::vector<int64_t> best_b(N, 0);  // each A token's most similar B token (tome)
  if (c.by_importance())
    choose_by_importance(c, score, keep);
  else
    choose_by_redundancy(c, sim, score, keep, best_b);
  std::vector<int64_t> row_of(N);  // output row of each kept token (of the one before, if not)
  for (int64_t j = 0, kept = 0; j < N; ++j) row_of[j] = keep[j] ? kept++ : kept - 1;

  // Kept tokens send weight 1 to their own row; removed ones go where the construction says.
  std::fill(dst, dst + N * K, 0);
  std::fill(weight, weight + N * K, 0.f);
  float fused_mass = 0, fused_score_mass = 0;  // evit: sum(size), sum(score * size) of the fused
  if (c.method == Method::Evit)
    for (int64_t j = 0; j < N; ++j)
      if (!keep[j]) fused_mass += size[j], fused_score_mass += score[j] * size[j];
  std::vector<int64_t> top(K);
  std::vector<float> val(K);
  for (int64_t j = 0; j < N; ++j) {
    int64_t* d = dst + j * K;
    float* w = weight + j * K;
    if (keep[j]) {
      d[0] = row_of[j];
      w[0] = 1.f;
      continue;
    }
    switch (c.method) {
      case Method::Prune:  // dropped: weight 0
        break;
      case Method::Evit:  // into the fused last row, by score
        d[0] = N - c.r - 1;
        w[0] = score[j] * fused_mass / std::max(fused_score_mass, SCORE_EPS);
        break;
      case Method::Tome:  // merged into its most similar B token
        d[0] = row_of[best_b[j]];
        w[0] = 1.f;
        break;
      case Method::Spread:  // spread over its k most similar targets
        spread(c, sim, j, keep, row_of, top, val, d, w);
        break;
    }
  }
}

at::Tensor unit_size(const Construction& c, const std::optional<at::Tensor>& metric,
                     const std::optional<at::Tensor>& score) {
  const auto& given = metric.has_value() ? *metric : *score;
  return at::ones({c.batch, c.tokens}, given.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> match_cpu(const std::optional<at::Tensor>& metric,
                                             const std::optional<at::Tensor>& score,
                                             const std::optional<at::Tensor>& size, int64_t r,
                                             c10::string_view method, int64_t k, double tau,
                                             double alpha, c10::string_view targets,
                                             int64_t prefix, c10::string_view cost) {
  const Construction c = check_match("tt.match", metric, score, size, r, method, k, tau, alpha,
                                     targets, prefix, cost);
  return match_cpu_impl(c, metric, score, size.has_value() ? *size : unit_size(c, metric, score));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> match_cpu_impl(const Construction& c,
                                                  const std::optional<at::Tensor>& metric,
                                                  const std::optional<at::Tensor>& score_in,
                                                  const at::Tensor& size_in) {
  const int64_t B = c.batch, N = c.tokens, K = c.slots();
  const auto opts = size_in.options();
  auto dst = at::empty({B, N, K}, opts.dtype(at::kLong));
  auto weight = at::empty({B, N, K}, opts);
  const bool needs_sim = !c.by_importance() || c.method == Method::Spread;
  const Grid grid(c);
  const at::Tensor m = needs_sim ? fp32_rows(*metric) : at::Tensor();
  const at::Tensor sim = needs_sim ? dot_products(m, grid) : at::Tensor();
  const int64_t per_image = grid.rows.count * grid.cols.count;
  const int64_t m_stride = needs_sim ? m.stride(1) : 0, D = needs_sim ? m.size(2) : 0;
  const at::Tensor score = score_in.has_value() ? score_in->contiguous() : at::Tensor();
  const at::Tensor size = size_in.contiguous();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      match_image(c, {needs_sim ? sim.data_ptr<float>() + b * per_image : nullptr, grid},
                  {needs_sim ? m.data_ptr<float>() + b * m.stride(0) : nullptr, m_stride, D},
                  score.defined() ? score.data_ptr<float>() + b * N : nullptr,
                  size.data_ptr<float>() + b * N, dst.data_ptr<int64_t>() + b * N * K,
                  weight.data_ptr<float>() + b * N * K);
  });
  return {dst, weight};
}

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("match", &match_cpu); }

}  // namespace tt
