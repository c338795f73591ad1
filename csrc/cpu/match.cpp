// CPU tt.match: the constructions of T (prune, evit, tome, transform), one image at a time. Which
// tokens leave comes first (by importance or by redundancy), then where each one goes. The
// cosine similarities come from one batched fp32 GEMM and every affinity follows the reference's
// formula, so selections are the reference's (float64) except between affinities within fp32
// rounding of each other; exact ties go to the lower index in both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../tt.h"
#include "kernels.h"

namespace tt {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Cosine similarity of the tokens `from` (undefined: all) with every token, [B, R, N].
at::Tensor similarity(const at::Tensor& metric, const at::Tensor& from) {
  // Contiguous first: the norms of a strided view would round differently.
  auto m = metric.to(at::kFloat).contiguous();
  m = m / at::linalg_vector_norm(m, 2, {-1}, /*keepdim=*/true).clamp_min(NORM_EPS);
  return at::bmm(from.defined() ? m.index_select(1, from) : m, m.transpose(1, 2)).contiguous();
}

// Sorts `tokens` by key, descending; equal keys keep ascending token order.
void sort_descending(std::vector<int64_t>& tokens, const std::vector<float>& key) {
  std::stable_sort(tokens.begin(), tokens.end(),
                   [&](int64_t a, int64_t b) { return key[a] > key[b]; });
}

// Ward's affinity in place: -(size_i size_j / (size_i + size_j)) (1 - cosine), as the reference.
// Row i of `sim` belongs to token row_token(i).
template <typename RowToken>
void ward_affinity(float* sim, const float* size, int64_t n_rows, int64_t N, RowToken row_token) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const float s_i = size[row_token(i)];
    for (int64_t j = 0; j < N; ++j) {
      const float pair = s_i * size[j] / std::max(s_i + size[j], SCORE_EPS);
      sim[i * N + j] = -(pair * (1.f - sim[i * N + j]));
    }
  }
}

// Who leaves by importance (prune, evit, transform with alpha = 1): all but the n_keep highest
// scores after the prefix; on ties the lower index stays.
void choose_by_importance(const Construction& c, const float* score, std::vector<char>& keep) {
  const int64_t N = c.tokens, P = c.prefix;
  std::vector<int64_t> order;
  std::vector<float> key(N, kNegInf);
  for (int64_t j = P; j < N; ++j) order.push_back(j), key[j] = score[j];
  sort_descending(order, key);
  for (size_t i = n_keep(c.method, N, c.r, P); i < order.size(); ++i) keep[order[i]] = 0;
}

// Who leaves by redundancy (ToMe's bipartite choice): the r A tokens most similar to a B token,
// their similarity optionally mixed with unimportance (alpha > 0); best_b[a]: A token a's most
// similar B token. sim_row(a): A token a's affinities to every token.
template <typename SimRow>
void choose_by_redundancy(const Construction& c, SimRow sim_row, const float* score,
                          std::vector<char>& keep, std::vector<int64_t>& best_b) {
  const int64_t N = c.tokens, P = c.prefix;
  std::vector<int64_t> order;
  std::vector<float> key(N, kNegInf);
  float top_score = SCORE_EPS;
  if (c.alpha > 0)
    for (int64_t j = P; j < N; ++j) top_score = std::max(top_score, score[j]);
  const float w_red = static_cast<float>(1.0 - c.alpha), w_imp = static_cast<float>(c.alpha);
  const int64_t first_b = P + 1 - (P % 2);
  for (int64_t a = first_a(P); a < N; a += 2) {
    const float* row = sim_row(a);
    float best = kNegInf;
    for (int64_t b = first_b; b < N; b += 2)
      if (row[b] > best) best = row[b], best_b[a] = b;
    key[a] = c.alpha > 0 ? best * w_red + (1.f - score[a] / top_score) * w_imp : best;
    order.push_back(a);
  }
  sort_descending(order, key);
  for (int64_t i = 0; i < c.r; ++i) keep[order[i]] = 0;
}

// transform: a removed token's slots d/w, its k most similar allowed targets (kept, after the
// prefix, B tokens only with targets "b") by affinity `row`, weighted softmax(affinity / tau);
// none found: pruned (weights stay 0). top/val: k entries of scratch.
void spread(const Construction& c, const float* row, const std::vector<char>& keep,
            const std::vector<int64_t>& row_of, std::vector<int64_t>& top,
            std::vector<float>& val, int64_t* d, float* w) {
  const int64_t N = c.tokens, P = c.prefix, K = c.k;
  // Insertion into a descending list (strict > keeps the lower index on ties).
  int64_t found = 0;
  for (int64_t t = P; t < N; ++t) {
    if (!keep[t] || (c.targets_b && t % 2 == 0)) continue;
    if (found == K && !(row[t] > val[K - 1])) continue;
    int64_t pos = std::min(found, K - 1);
    while (pos > 0 && row[t] > val[pos - 1]) {
      val[pos] = val[pos - 1];
      top[pos] = top[pos - 1];
      --pos;
    }
    val[pos] = row[t];
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

// One image: fills dst/weight [N, K] from affinities `sim` (or null) and `score` [N]. `sim` holds
// the rows of all tokens ([N, N]) when choosing by importance, else of the A tokens only.
void match_image(const Construction& c, float* sim, const float* score, const float* size,
                 int64_t* dst, float* weight) {
  const int64_t N = c.tokens, P = c.prefix, K = c.slots();
  const bool all_rows = c.by_importance();
  const auto row_token = [&](int64_t i) { return all_rows ? i : first_a(P) + 2 * i; };
  const auto sim_row = [&](int64_t j) {
    return sim + (all_rows ? j : (j - first_a(P)) / 2) * N;
  };
  if (c.ward) ward_affinity(sim, size, all_rows ? N : a_count(N, P), N, row_token);

  std::vector<char> keep(N, 1);
  std::vector<int64_t> best_b(N, 0);  // each A token's most similar B token (tome)
  if (c.by_importance())
    choose_by_importance(c, score, keep);
  else
    choose_by_redundancy(c, sim_row, score, keep, best_b);
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
      case Method::Transform:  // spread over its k most similar targets
        spread(c, sim_row(j), keep, row_of, top, val, d, w);
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
  const bool needs_sim = !c.by_importance() || c.method == Method::Transform;
  const int64_t a0 = std::min(first_a(c.prefix), N);
  const at::Tensor from =
      c.by_importance() ? at::Tensor() : at::arange(a0, N, 2, opts.dtype(at::kLong));
  const at::Tensor sim = needs_sim ? similarity(*metric, from) : at::Tensor();
  const int64_t sim_rows = needs_sim ? sim.size(1) : 0;
  const at::Tensor score = score_in.has_value() ? score_in->contiguous() : at::Tensor();
  const at::Tensor size = size_in.contiguous();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      match_image(c, needs_sim ? sim.data_ptr<float>() + b * sim_rows * N : nullptr,
                  score.defined() ? score.data_ptr<float>() + b * N : nullptr,
                  size.data_ptr<float>() + b * N, dst.data_ptr<int64_t>() + b * N * K,
                  weight.data_ptr<float>() + b * N * K);
  });
  return {dst, weight};
}

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("match", &match_cpu); }

}  // namespace tt
