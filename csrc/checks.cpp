// Argument checks shared by every backend: each failure names the operator and the argument.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#ifdef TT_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include "tt.h"

namespace tt {
namespace {

bool is_float_dtype(const at::Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

void check_tokens(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": `", name, "` must have ", dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(is_float_dtype(t), op, ": `", name, "` must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

void check_fp32(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                const char* like = nullptr) {
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` must have shape ", shape,
              (like ? " (B, N of `" : ""), (like ? like : ""), (like ? "`)" : ""), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ",
              t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

// Whether `t`'s stream is being captured into a CUDA graph, where nothing may synchronise.
bool capturing(const at::Tensor& t) {
#ifdef TT_WITH_CUDA
  return t.is_cuda() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  (void)t;
  return false;
#endif
}

// A check of tensor values: it raises at once, which on a GPU costs a synchronisation. During CUDA
// graph capture the condition is asserted on the device instead, without the message (as PyTorch's
// own kernels do in graphs).
void check_values(const at::Tensor& ok, const std::string& message) {
  if (capturing(ok)) {
    at::_assert_async(ok, message);
  } else {
    TORCH_CHECK_VALUE(ok.item<bool>(), message);
  }
}

// Whether every value of `t` satisfies `pred`, for a CPU float32 tensor, in one pass: on the CPU
// this replaces the vectorised tests below, whose temporaries cost more than a reduction step's
// own work at a ViT's sizes.
template <typename Pred>
bool all_values(const at::Tensor& t, Pred pred) {
  const at::Tensor c = t.contiguous();
  const float* v = c.data_ptr<float>();
  return std::all_of(v, v + c.numel(), pred);
}

bool on_cpu_fp32(const at::Tensor& t) { return t.is_cpu() && t.scalar_type() == at::kFloat; }

void check_finite(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  if (on_cpu_fp32(t)) {
    TORCH_CHECK_VALUE(all_values(t, [](float v) { return std::isfinite(v); }), op, ": `", name,
                      "` contains NaN or infinite values");
    return;
  }
  check_values(at::isfinite(t).all(),
               c10::str(op, ": `", name, "` contains NaN or infinite values"));
}

// Sizes count original patches: finite and non-negative.
void check_size_values(const char* op, const at::Tensor& size) {
  if (size.numel() == 0) return;
  check_finite(op, "size", size);
  if (on_cpu_fp32(size)) {
    TORCH_CHECK_VALUE(all_values(size, [](float v) { return v >= 0; }), op,
                      ": `size` must be non-negative");
    return;
  }
  check_values((size >= 0).all(), c10::str(op, ": `size` must be non-negative"));
}

void check_sparse(const char* op, const at::Tensor& dst, const at::Tensor& weight, int64_t batch,
                  int64_t tokens, int64_t n_out, const at::Tensor& ref) {
  TORCH_CHECK(dst.dim() == 3 && dst.size(0) == batch && dst.size(1) == tokens, op,
              ": `dst` must have shape [B, N, K] = [", batch, ", ", tokens, ", K], got ",
              dst.sizes());
  TORCH_CHECK(dst.scalar_type() == at::kLong, op, ": `dst` must be int64, got ",
              dst.scalar_type());
  check_fp32(op, "weight", weight, dst.sizes());
  check_device(op, "dst", dst, ref);
  check_device(op, "weight", weight, ref);
  check_finite(op, "weight", weight);
  if (dst.numel() == 0) return;
  if (capturing(dst)) {
    check_values(at::logical_and(dst >= 0, dst < n_out).all(),
                 c10::str(op, ": `dst` entries must lie in [0, ", n_out, ")"));
    return;
  }
  auto [lo, hi] = at::aminmax(dst);
  TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n_out, op,
                    ": `dst` entries must lie in [0, ", n_out, "), got [", lo.item<int64_t>(),
                    ", ", hi.item<int64_t>(), "]");
}

}  // namespace

Construction check_match(const char* op, const std::optional<at::Tensor>& metric,
                         const std::optional<at::Tensor>& score,
                         const std::optional<at::Tensor>& size, int64_t r,
                         c10::string_view method, int64_t k, double tau, double alpha,
                         c10::string_view targets, int64_t prefix, c10::string_view cost) {
  Construction c{};
  c.method = parse_method(op, method);
  const bool needs_metric = c.method == Method::Tome || c.method == Method::Spread;
  TORCH_CHECK_VALUE(!needs_metric || metric.has_value(), op, ": method '", std::string(method),
                    "' needs `metric`");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0 && alpha <= 1, op,
                    ": `alpha` must lie in [0, 1], got ", alpha);
  c.alpha = c.method == Method::Spread ? alpha : 0.0;
  const bool needs_score = c.method == Method::Prune || c.method == Method::Evit ||
                           (c.method == Method::Spread && alpha > 0);
  TORCH_CHECK_VALUE(!needs_score || score.has_value(), op, ": method '", std::string(method),
                    "'", (c.method == Method::Spread ? " with alpha > 0" : ""),
                    " needs `score`");
  TORCH_CHECK_VALUE(metric.has_value() || score.has_value(), op, ": give `metric` or `score`");
  const at::Tensor& ref = metric.has_value() ? *metric : *score;
  if (metric.has_value()) {
    // [B, N, D], or per head [B, H, N, D]: the tokens are then compared by their sum over heads
    TORCH_CHECK(metric->dim() == 3 || metric->dim() == 4, op,
                ": `metric` must have shape [B, N, D] or [B, H, N, D], got shape ",
                metric->sizes());
    check_tokens(op, "metric", *metric, metric->dim());
    c.batch = metric->size(0);
    c.tokens = metric->size(-2);
  } else {
    TORCH_CHECK(score->dim() == 2, op, ": `score` must have shape [B, N], got ", score->sizes());
    c.batch = score->size(0);
    c.tokens = score->size(1);
  }
  const char* like = metric.has_value() ? "metric" : "score";
  if (score.has_value()) {
    check_fp32(op, "score", *score, {c.batch, c.tokens}, like);
    check_device(op, "score", *score, ref);
    check_finite(op, "score", *score);
  }
  if (size.has_value()) {
    check_fp32(op, "size", *size, {c.batch, c.tokens}, like);
    check_device(op, "size", *size, ref);
    check_size_values(op, *size);
  }
  const int64_t n = c.tokens;
  TORCH_CHECK_VALUE(prefix >= 0 && prefix <= n, op, ": `prefix` must lie in [0, N = ", n,
                    "], got ", prefix);
  c.prefix = prefix;
  TORCH_CHECK_VALUE(c.method == Method::Spread || k == 1, op,
                    ": `k` applies only to method 'spread'; got k = ", k, " with '",
                    std::string(method), "'");
  TORCH_CHECK_VALUE(k >= 1 && k <= std::max<int64_t>(n, 1), op, ": `k` must lie in [1, N = ", n,
                    "], got ", k);
  c.k = k;
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": `tau` must be positive, got ", tau);
  c.tau = tau;
  TORCH_CHECK_VALUE(targets == "all" || targets == "b", op,
                    ": `targets` must be 'all' or 'b', got '", std::string(targets), "'");
  c.targets_b = targets == "b";
  TORCH_CHECK_VALUE(cost == "cosine" || cost == "ward", op,
                    ": `cost` must be 'cosine' or 'ward', got '", std::string(cost), "'");
  TORCH_CHECK_VALUE(c.method == Method::Spread || cost == "cosine", op,
                    ": `cost` applies only to method 'spread'; got '", std::string(cost),
                    "' with '", std::string(method), "'");
  c.ward = cost == "ward";
  // Largest r each construction can honour with static shapes (N' = N - r), and why.
  const int64_t r_max = max_r(c.method, n, prefix, c.by_importance());
  const char* why = c.method == Method::Evit ? "N - prefix - 1 (one output row is the fused token)"
                    : !c.by_importance()     ? "(N - prefix) // 2 (ToMe's bipartite cap)"
                    : r_max < n - prefix     ? "N - 1 (at least one token remains)"
                                             : "N - prefix";
  TORCH_CHECK_VALUE(r >= 0 && r <= r_max, op, ": `r` must lie in [0, ", r_max, "] = [0, ", why,
                    "] for method '", std::string(method), "' with N = ", n,
                    " and prefix = ", prefix, ", got ", r);
  c.r = r;
  return c;
}

Mode check_apply(const char* op, const at::Tensor& x, const at::Tensor& size, const at::Tensor& dst,
                 const at::Tensor& weight, int64_t n_out, c10::string_view mode) {
  check_tokens(op, "x", x, 3);
  const int64_t batch = x.size(0), tokens = x.size(1);
  check_fp32(op, "size", size, {batch, tokens});
  check_device(op, "size", size, x);
  check_size_values(op, size);
  TORCH_CHECK_VALUE(n_out >= 0, op, ": `n_out` must be non-negative, got ", n_out);
  check_sparse(op, dst, weight, batch, tokens, n_out, x);
  return parse_mode(op, mode);
}

Mode check_transform(const at::Tensor& x, const at::Tensor& size, const Construction& c,
                     c10::string_view mode) {
  const char* op = "tt.transform";
  check_tokens(op, "x", x, 3);
  TORCH_CHECK(x.size(0) == c.batch && x.size(1) == c.tokens, op,
              ": `x` must have shape [B, N, C] with B = ", c.batch, " and N = ", c.tokens,
              " as in metric/score, got ", x.sizes());
  check_device(op, "x", x, size);
  return parse_mode(op, mode);
}

void check_untransform(const at::Tensor& y, const at::Tensor& dst, const at::Tensor& weight) {
  const char* op = "tt.untransform";
  check_tokens(op, "y", y, 3);
  TORCH_CHECK(dst.dim() == 3, op, ": `dst` must have shape [B, N, K], got ", dst.sizes());
  check_sparse(op, dst, weight, y.size(0), dst.size(1), y.size(1), y);
}

double check_cls_attention(const at::Tensor& q, const at::Tensor& k,
                           const std::optional<at::Tensor>& size, std::optional<double> scale) {
  const char* op = "tt.cls_attention";
  check_tokens(op, "q", q, 4);
  check_tokens(op, "k", k, 4);
  TORCH_CHECK(q.size(2) >= 1, op, ": `q` must hold the class token (N >= 1)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": `k` must have shape [B, H, N, Dh] matching q ", q.sizes(), ", got ", k.sizes());
  check_device(op, "k", k, q);
  if (size.has_value()) {
    check_fp32(op, "size", *size, {k.size(0), k.size(2)});
    check_device(op, "size", *size, q);
    check_size_values(op, *size);
  }
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  TORCH_CHECK_VALUE(std::isfinite(s), op, ": `scale` must be finite, got ", s);
  return s;
}

}  // namespace tt

namespace tt {
namespace {

void check_match_op(const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& score,
                    const std::optional<at::Tensor>& size, int64_t r, c10::string_view method,
                    int64_t k, double tau, double alpha, c10::string_view targets,
                    int64_t prefix, c10::string_view cost) {
  check_match("tt.match", metric, score, size, r, method, k, tau, alpha, targets, prefix, cost);
}

void check_apply_op(const at::Tensor& x, const at::Tensor& size, const at::Tensor& dst,
                    const at::Tensor& weight, int64_t n_out, c10::string_view mode) {
  check_apply("tt.apply", x, size, dst, weight, n_out, mode);
}

void check_transform_op(const at::Tensor& x, const at::Tensor& size,
                        const std::optional<at::Tensor>& metric,
                        const std::optional<at::Tensor>& score, int64_t r,
                        c10::string_view method, int64_t k, double tau, double alpha,
                        c10::string_view targets, int64_t prefix, c10::string_view mode,
                        c10::string_view cost) {
  const Construction c = check_match("tt.transform", metric, score, size, r, method, k, tau, alpha,
                                     targets, prefix, cost);
  check_transform(x, size, c, mode);
}

void check_cls_attention_op(const at::Tensor& q, const at::Tensor& k,
                            const std::optional<at::Tensor>& size, std::optional<double> scale) {
  check_cls_attention(q, k, size, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CompositeExplicitAutograd, m) {
  m.impl("check_match", &check_match_op);
  m.impl("check_apply", &check_apply_op);
  m.impl("check_untransform", &check_untransform);
  m.impl("check_transform", &check_transform_op);
  m.impl("check_cls_attention", &check_cls_attention_op);
}

}  // namespace tt
