// Shared declarations of the tt operators: the constructions and apply modes, and the argument
// checks (used by every backend).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "cuda/portable.h"

// The dtypes of x, metric, q and k (the checks reject others), for AT_DISPATCH_SWITCH: no kernel
// is compiled for double.
#define TT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace tt {

enum class Method { Prune, Evit, Tome, Spread };

// How apply combines what an output row receives: plain sum (T X), size-weighted mean, or that
// mean rescaled to the size-weighted mean of its inputs' norms.
enum class Mode { Sum, Mean, Norm };

inline Method parse_method(const char* op, c10::string_view method) {
  if (method == "prune") return Method::Prune;
  if (method == "evit") return Method::Evit;
  if (method == "tome") return Method::Tome;
  if (method == "spread") return Method::Spread;
  TORCH_CHECK_VALUE(false, op, ": `method` must be one of prune, evit, tome, spread, got '",
                    std::string(method), "'");
}

inline Mode parse_mode(const char* op, c10::string_view mode) {
  if (mode == "sum") return Mode::Sum;
  if (mode == "mean") return Mode::Mean;
  if (mode == "norm") return Mode::Norm;
  TORCH_CHECK_VALUE(false, op, ": `mode` must be 'mean', 'norm' or 'sum', got '",
                    std::string(mode), "'");
}

// The rules every layer shares: how many tokens a step may remove and keeps, which tokens may
// leave, and the guards against dividing by zero. Written once here and once in Python
// (tt_kernels/rules.py); tests/test_rules.py keeps the two equal. Host and device code.
constexpr float NORM_EPS = 1e-12f;   // a zero vector's norm is clamped to this: its cosine is 0
constexpr float SCORE_EPS = 1e-30f;  // an all-zero score (or sum of sizes) must not divide by 0

// The first of ToMe's A tokens (the even unprotected ones, the only ones that may leave when the
// choice is by redundancy).
TT_HOST_DEVICE constexpr int64_t first_a(int64_t prefix) { return prefix + prefix % 2; }

// How many A tokens n tokens have.
TT_HOST_DEVICE constexpr int64_t a_count(int64_t n, int64_t prefix) {
  return (n - first_a(prefix) + 1 > 0 ? n - first_a(prefix) + 1 : 0) / 2;
}

// Largest r a construction can remove from n tokens with static shapes: ToMe's bipartite cap when
// only A tokens may leave, one output row for evit's fused token, and at least one token left.
TT_HOST_DEVICE constexpr int64_t max_r(Method method, int64_t n, int64_t prefix,
                                       bool by_importance) {
  const int64_t r = method == Method::Evit                      ? n - prefix - 1
                    : method == Method::Prune || by_importance ? n - prefix
                                                               : (n - prefix) / 2;
  const int64_t capped = r < n - 1 ? r : n - 1;
  return capped > 0 ? capped : 0;
}

// Unprotected tokens kept by a step removing r of n (evit's fused token is not one of them).
TT_HOST_DEVICE constexpr int64_t n_keep(Method method, int64_t n, int64_t r, int64_t prefix) {
  return n - r - prefix - (method == Method::Evit && r > 0 ? 1 : 0);
}

// A construction of T, validated. K is the number of slots per input token.
struct Construction {
  Method method;
  int64_t batch, tokens, r, k, prefix;
  double tau, alpha;
  bool targets_b;  // targets restricted to ToMe's B set
  bool ward;       // affinity = -Ward's merge cost instead of the cosine
  int64_t slots() const { return method == Method::Spread ? k : 1; }
  bool by_importance() const {
    return method == Method::Prune || method == Method::Evit || alpha == 1.0;
  }
};

Construction check_match(const char* op, const std::optional<at::Tensor>& metric,
                         const std::optional<at::Tensor>& score,
                         const std::optional<at::Tensor>& size, int64_t r,
                         c10::string_view method, int64_t k, double tau, double alpha,
                         c10::string_view targets, int64_t prefix, c10::string_view cost);
Mode check_apply(const char* op, const at::Tensor& x, const at::Tensor& size, const at::Tensor& dst,
                 const at::Tensor& weight, int64_t n_out, c10::string_view mode);
Mode check_transform(const at::Tensor& x, const at::Tensor& size, const Construction& c,
                     c10::string_view mode);
void check_untransform(const at::Tensor& y, const at::Tensor& dst, const at::Tensor& weight);
double check_cls_attention(const at::Tensor& q, const at::Tensor& k,
                           const std::optional<at::Tensor>& size, std::optional<double> scale);

}  // namespace tt
