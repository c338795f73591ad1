// CPU tt.match: the constructions of T (prune, evit, tome, spread), one image at a time. Which
// tokens leave comes first (by importance or by redundancy), then where each one goes. The
// cosine similarities come from fp32 GEMMs of the raw metric over only the pairs a construction
// reads: ToMe's choice compares the A tokens with the B tokens (one batched GEMM), and spread
// compares each removed token with its allowed targets (a small GEMM per image, once the image's
// choice is made). Each dot product is scaled by both tokens' inverse norms (no normalised copy of
// the metric is written; the rounding stays within verify.cosine_error), and every affinity
// follows the reference's formula, so selections are the reference's (float64) except between
// affinities within fp32 rounding of each other; exact ties (twins: tokens with equal metric rows)
// go to the lower index in both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// The tokens start, start + step, ...: the rows or the columns of affinities.
struct Tokens {
  int64_t start, step, count;
  int64_t token(int64_t i) const { return start + step * i; }
  std::vector<int64_t> list() const {
    std::vector<int64_t> tokens(count);
    for (int64_t i = 0; i < count; ++i) tokens[i] = token(i);
    return tokens;
  }
};

Tokens a_tokens(int64_t N, int64_t P) { return {first_a(P), 2, a_count(N, P)}; }
Tokens b_tokens(int64_t N, int64_t P) {
  return {first_b(P), 2, std::max<int64_t>(N - first_b(P) + 1, 0) / 2};
}

// The tokens a removed token may spread to, if kept: the B tokens with targets "b", else every
// token after the prefix.
Tokens targets(const Construction& c) {
  return c.targets_b ? b_tokens(c.tokens, c.prefix) : Tokens{c.prefix, 1, c.tokens - c.prefix};
}

// The metric's rows `tokens`, [B, count, D], read where they lie (the model's queries are a
// strided view).
at::Tensor rows_of(const at::Tensor& metric, const Tokens& tokens) {
  return metric.slice(1, tokens.start, tokens.start + tokens.step * tokens.count, tokens.step);
}

// A per-head metric [B, H, N, D] (channels contiguous) summed over its heads, in head order in
// fp32, into [B, N, D], in one pass over each token's heads: torch's sum over the strided head
// dimension of the attention's keys took 1.6 to 3.7 times as long at DeiT-S's sizes (2-core Xeon).
template <typename scalar_t>
at::Tensor head_sum(const at::Tensor& metric) {
  const int64_t B = metric.size(0), H = metric.size(1), N = metric.size(2), D = metric.size(3);
  auto out = at::empty({B, N, D}, metric.options().dtype(at::kFloat));
  const scalar_t* in = metric.data_ptr<scalar_t>();
  float* sum = out.data_ptr<float>();
  const int64_t image = metric.stride(0), head = metric.stride(1), token = metric.stride(2);
  const int64_t grain = at::internal::GRAIN_SIZE / std::max<int64_t>(H * D, 1) + 1;  // tokens
  at::parallel_for(0, B * N, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* __restrict__ heads = in + t / N * image + t % N * token;
      float* __restrict__ row = sum + t * D;
      std::fill_n(row, D, 0.f);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) row[d] += static_cast<float>(heads[h * head + d]);
    }
  });
  return out;
}

// The metric as the loops read it: fp32, each token's channels contiguous (a per-head metric
// summed over its heads).
at::Tensor fp32_rows(const at::Tensor& metric_in) {
  if (metric_in.dim() == 4) {
    const at::Tensor metric = metric_in.stride(3) == 1 ? metric_in : metric_in.contiguous();
    at::Tensor sum;
    TT_DISPATCH_FLOAT_TYPES(metric.scalar_type(), "tt_head_sum",
                            [&] { sum = head_sum<scalar_t>(metric); });
    return sum;
  }
  auto metric = metric_in.scalar_type() == at::kFloat ? metric_in : metric_in.to(at::kFloat);
  return metric.stride(2) == 1 ? metric : metric.contiguous();
}

// Sorts `tokens` by key, descending; equal keys keep ascending token order.
void sort_descending(std::vector<int64_t>& tokens, const std::vector<float>& key) {
  std::stable_sort(tokens.begin(), tokens.end(),
                   [&](int64_t a, int64_t b) { return key[a] > key[b]; });
}

// The affinities in place of the dot products sim [rows.size(), cols.count]: the cosine
// dot inv_norm_i inv_norm_j, and for Ward's cost -(size_i size_j / (size_i + size_j)) (1 - cosine),
// as the reference. The columns' inverse norms and sizes are gathered side by side first, so that
// each row's loop is elementwise over contiguous arrays and vectorises (the same operations in the
// same order).
void affinities(float* sim, const std::vector<int64_t>& rows, const Tokens& cols,
                const float* inv_norm, const float* size, bool ward) {
  std::vector<float> col_inv(cols.count), col_size(cols.count);
  for (int64_t j = 0; j < cols.count; ++j) {
    col_inv[j] = inv_norm[cols.token(j)];
    col_size[j] = size[cols.token(j)];
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const float inv_i = inv_norm[rows[i]], s_i = size[rows[i]];
    float* row = sim + i * cols.count;
    if (ward) {
      for (int64_t j = 0; j < cols.count; ++j) {
        const float cosine = row[j] * inv_i * col_inv[j];
        row[j] = -(s_i * col_size[j] / std::max(s_i + col_size[j], SCORE_EPS) * (1.f - cosine));
      }
    } else {
      for (int64_t j = 0; j < cols.count; ++j) row[j] = row[j] * inv_i * col_inv[j];
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

// The first of the largest of v[0..n) (NaN is never the largest) and its value; (-1, -inf) where
// none exceeds -inf. Two passes: the largest, as kLanes interleaved maxima (branch-free
// comparisons, which vectorise, where one pass that tracks the first largest compares and
// branches element by element), then the first index that holds it.
std::pair<int64_t, float> first_max(const float* v, int64_t n) {
  constexpr int kLanes = 8;
  float part[kLanes];
  std::fill_n(part, kLanes, kNegInf);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] = v[j + l] > part[l] ? v[j + l] : part[l];
  float best = kNegInf;
  for (; j < n; ++j) best = v[j] > best ? v[j] : best;
  for (int l = 0; l < kLanes; ++l) best = part[l] > best ? part[l] : best;
  if (!(best > kNegInf)) return {-1, kNegInf};
  return {std::find(v, v + n, best) - v, best};
}

// Who leaves by redundancy (ToMe's bipartite choice): the r A tokens most similar to a B token,
// their similarity optionally mixed with unimportance (alpha > 0); best_b[a]: A token a's most
// similar B token. sim: the affinities of the A tokens (rows) with the B tokens (columns).
void choose_by_redundancy(const Construction& c, const float* sim, const float* score,
                          std::vector<char>& keep, std::vector<int64_t>& best_b) {
  const int64_t N = c.tokens, P = c.prefix;
  const Tokens a = a_tokens(N, P), b = b_tokens(N, P);
  std::vector<int64_t> order;
  std::vector<float> key(N, kNegInf);
  float top_score = SCORE_EPS;
  if (c.alpha > 0)
    for (int64_t j = P; j < N; ++j) top_score = std::max(top_score, score[j]);
  const float w_red = static_cast<float>(1.0 - c.alpha), w_imp = static_cast<float>(c.alpha);
  for (int64_t i = 0; i < a.count; ++i) {
    const auto [col, best] = first_max(sim + i * b.count, b.count);
    const int64_t t = a.token(i);
    if (col >= 0) best_b[t] = b.token(col);
    key[t] = c.alpha > 0 ? best * w_red + (1.f - score[t] / top_score) * w_imp : best;
    order.push_back(t);
  }
  sort_descending(order, key);
  for (int64_t i = 0; i < c.r; ++i) keep[order[i]] = 0;
}

// spread: a removed token's slots d/w, its k most similar kept targets, weighted
// softmax(affinity / tau); none found: pruned (weights stay 0). row: its affinities with
// targets(c); top/val: k entries of scratch.
void spread(const Construction& c, const float* row, const std::vector<char>& keep,
            const std::vector<int64_t>& row_of, std::vector<int64_t>& top,
            std::vector<float>& val, int64_t* d, float* w) {
  const int64_t K = c.k;
  const Tokens allowed = targets(c);
  // The kept targets in ascending order, inserted into a descending list (strict > keeps the
  // lower index on ties).
  int64_t found = 0;
  for (int64_t col = 0; col < allowed.count; ++col) {
    const int64_t t = allowed.token(col);
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

// Twins: tokens whose metric rows (and, with Ward's cost, sizes) are equal bit for bit. Their
// affinities are equal, and the reference breaks such exact ties by the lower index; but a GEMM
// may round equal columns differently by their position (MKL's AVX2 kernels do), and two GEMMs of
// other shapes round differently. So every affinity with a twin is copied from the first twin
// compared: equal inputs, equal values. first_twin[t]: the lowest of t's twins (t itself if none).
struct Twins {
  std::vector<int64_t> first_twin;
  bool any = false;

  Twins() = default;  // none: the construction compares no affinities

  // Each token looked up in ascending order in a hash table of the first twins so far, keyed by
  // the inverse norm (equal rows have equal norms), rows compared only where the norms are equal.
  Twins(const Metric& m, const std::vector<float>& inv_norm, const float* size, bool ward,
        int64_t N)
      : first_twin(N) {
    const auto bits = [](float v) {
      uint32_t u;
      std::memcpy(&u, &v, sizeof u);
      return u;
    };
    const auto equal = [&](int64_t a, int64_t b) {
      return bits(inv_norm[a]) == bits(inv_norm[b]) && (!ward || bits(size[a]) == bits(size[b])) &&
             std::memcmp(m.data + a * m.stride, m.data + b * m.stride, m.D * sizeof(float)) == 0;
    };
    int64_t slots = 1;
    while (slots < 2 * N) slots *= 2;
    std::vector<int64_t> table(slots, -1);
    for (int64_t t = 0; t < N; ++t) {
      first_twin[t] = t;
      int64_t h = (bits(inv_norm[t]) * 2654435761u) & (slots - 1);
      for (; table[h] >= 0; h = (h + 1) & (slots - 1))
        if (equal(table[h], t)) {
          first_twin[t] = table[h];
          any = true;
          break;
        }
      if (first_twin[t] == t) table[h] = t;
    }
  }

  // For each of `tokens`, the index (among them) of its first twin there.
  std::vector<int64_t> first_of(const Tokens& tokens) const {
    std::vector<int64_t> first(tokens.count), seen(first_twin.size(), -1);
    for (int64_t i = 0; i < tokens.count; ++i) {
      int64_t& at = seen[first_twin[tokens.token(i)]];
      first[i] = at < 0 ? (at = i) : at;
    }
    return first;
  }

  // Copies each value of a row from its column's first twin's (first: first_of the columns).
  static void tie_row(float* row, const std::vector<int64_t>& first) {
    for (size_t i = 0; i < first.size(); ++i) row[i] = row[first[i]];
  }

  // sim [rows.count, cols.count]: every value from its row's and its column's first twins'.
  void tie(float* sim, const Tokens& rows, const Tokens& cols) const {
    if (!any) return;
    const std::vector<int64_t> first_row = first_of(rows), first_col = first_of(cols);
    for (int64_t i = 0; i < rows.count; ++i) tie_row(sim + i * cols.count, first_col);
    for (int64_t i = 0; i < rows.count; ++i)
      if (first_row[i] != i)
        std::copy_n(sim + first_row[i] * cols.count, cols.count, sim + i * cols.count);
  }
};

// The affinities of the removed tokens (rows, ascending) with the tokens `cols`: their metric
// rows gathered, times the columns' rows where they lie. One small GEMM of r rows where only the
// removed tokens spread.
std::vector<float> removed_affinities(const Metric& m, const std::vector<int64_t>& removed,
                                      const Tokens& cols, const float* inv_norm,
                                      const float* size, bool ward) {
  const int64_t R = static_cast<int64_t>(removed.size());
  std::vector<float> rows(R * m.D), sim(R * cols.count);
  if (R == 0 || cols.count == 0) return sim;
  for (int64_t i = 0; i < R; ++i)
    std::copy_n(m.data + removed[i] * m.stride, m.D, rows.data() + i * m.D);
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(sim.data(), {R, cols.count}, fp32);
  at::mm_out(out, at::from_blob(rows.data(), {R, m.D}, fp32),
             at::from_blob(const_cast<float*>(m.data) + cols.start * m.stride, {m.D, cols.count},
                           {1, cols.step * m.stride}, fp32));
  affinities(sim.data(), removed, cols, inv_norm, size, ward);
  return sim;
}

// Where each removed token's affinities with targets(c) are read. Chosen by redundancy, the
// removed tokens are A tokens whose affinities with the B tokens the choice already holds: only
// targets "all" needs more, their affinities with the A tokens (a GEMM of r x A). Chosen by
// importance, any token may leave: a GEMM of r x targets.
class SpreadAffinities {
 public:
  SpreadAffinities(const Construction& c, const float* choice, const Metric& m,
                   const std::vector<int64_t>& removed, const float* inv_norm, const float* size,
                   const Twins& twins)
      : a_(a_tokens(c.tokens, c.prefix)),
        b_(b_tokens(c.tokens, c.prefix)),
        choice_(choice),
        from_choice_(choice && c.targets_b) {
    if (c.method != Method::Spread || from_choice_) return;
    const Tokens allowed = targets(c);
    cols_ = allowed.count;
    rows_ = removed_affinities(m, removed, choice ? a_ : allowed, inv_norm, size, c.ward);
    if (choice) {  // targets "all": the removed tokens' A columns beside the choice's B columns
      std::vector<float> with_a = std::move(rows_);
      rows_.resize(removed.size() * cols_);
      for (size_t i = 0; i < removed.size(); ++i)
        for (int64_t col = 0; col < cols_; ++col) {
          const int64_t t = allowed.token(col);
          rows_[i * cols_ + col] = (t - a_.start) % 2 == 0
                                       ? with_a[i * a_.count + (t - a_.start) / 2]
                                       : with_b(removed[i])[(t - b_.start) / 2];
        }
    }
    if (twins.any) {
      const std::vector<int64_t> first = twins.first_of(allowed);
      for (size_t i = 0; i < removed.size(); ++i) Twins::tie_row(rows_.data() + i * cols_, first);
    }
  }

  // Removed token j's affinities with targets(c); i: j's rank among the removed.
  const float* row(int64_t j, int64_t i) const {
    return from_choice_ ? with_b(j) : rows_.data() + i * cols_;
  }

 private:
  // A token j's row of the choice: its affinities with the B tokens (twins tied already).
  const float* with_b(int64_t j) const { return choice_ + (j - a_.start) / 2 * b_.count; }

  const Tokens a_, b_;
  const float* choice_;
  const bool from_choice_;  // targets "b" by redundancy: the rows are the choice's
  int64_t cols_ = 0;
  std::vector<float> rows_;  // [removed, targets(c)] otherwise
};

// One image: fills dst/weight [N, K] from its metric (data null when the construction reads
// none), `choice` (the dot products of its A tokens with its B tokens, null unless the choice is
// by redundancy), `score` [N] and `size` [N].
void match_image(const Construction& c, float* choice, const Metric& metric, const float* score,
                 const float* size, int64_t* dst, float* weight) {
  const int64_t N = c.tokens, K = c.slots();
  const Tokens a = a_tokens(N, c.prefix), b = b_tokens(N, c.prefix);
  const std::vector<float> inv_norm = metric.data ? inverse_norms(metric, N) : std::vector<float>();
  const Twins twins = metric.data ? Twins(metric, inv_norm, size, c.ward, N) : Twins();

  std::vector<char> keep(N, 1);
  std::vector<int64_t> best_b(N, 0);  // each A token's most similar B token (tome)
  if (c.by_importance()) {
    choose_by_importance(c, score, keep);
  } else {
    affinities(choice, a.list(), b, inv_norm.data(), size, c.ward);
    twins.tie(choice, a, b);
    choose_by_redundancy(c, choice, score, keep, best_b);
  }
  std::vector<int64_t> row_of(N);  // output row of each kept token (of the one before, if not)
  std::vector<int64_t> removed;
  for (int64_t j = 0, kept = 0; j < N; ++j) {
    row_of[j] = keep[j] ? kept++ : kept - 1;
    if (!keep[j]) removed.push_back(j);
  }
  SpreadAffinities spread_sim(c, choice, metric, removed, inv_norm.data(), size, twins);

  // Kept tokens send weight 1 to their own row; removed ones go where the construction says.
  std::fill(dst, dst + N * K, 0);
  std::fill(weight, weight + N * K, 0.f);
  float fused_mass = 0, fused_score_mass = 0;  // evit: sum(size), sum(score * size) of the fused
  if (c.method == Method::Evit)
    for (int64_t j : removed) fused_mass += size[j], fused_score_mass += score[j] * size[j];
  std::vector<int64_t> top(K);
  std::vector<float> val(K);
  for (int64_t j = 0, i = 0; j < N; ++j) {  // i: j's rank among the removed
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
        spread(c, spread_sim.row(j, i), keep, row_of, top, val, d, w);
        break;
    }
    ++i;
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
  const bool by_redundancy = !c.by_importance();
  const bool reads_metric = by_redundancy || c.method == Method::Spread;
  const at::Tensor m = reads_metric ? fp32_rows(*metric) : at::Tensor();  // [B, N, D]
  const Tokens a = a_tokens(N, c.prefix), b = b_tokens(N, c.prefix);
  // The choice's dot products, batched: one GEMM of every image's A x B tokens.
  const at::Tensor choice =
      by_redundancy ? at::bmm(rows_of(m, a), rows_of(m, b).transpose(1, 2)) : at::Tensor();
  const int64_t m_stride = reads_metric ? m.stride(1) : 0, D = reads_metric ? m.size(2) : 0;
  const at::Tensor score = score_in.has_value() ? score_in->contiguous() : at::Tensor();
  const at::Tensor size = size_in.contiguous();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i)
      match_image(c, by_redundancy ? choice.data_ptr<float>() + i * a.count * b.count : nullptr,
                  {reads_metric ? m.data_ptr<float>() + i * m.stride(0) : nullptr, m_stride, D},
                  score.defined() ? score.data_ptr<float>() + i * N : nullptr,
                  size.data_ptr<float>() + i * N, dst.data_ptr<int64_t>() + i * N * K,
                  weight.data_ptr<float>() + i * N * K);
  });
  return {dst, weight};
}

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("match", &match_cpu); }

}  // namespace tt
