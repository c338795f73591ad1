// Shared declarations of the tt operators: the constructions and apply modes, and the argument
// checks (used by every backend).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

// The dtypes of x, metric, q and k (the checks reject others), for AT_DISPATCH_SWITCH: no kernel
// is compiled for double.
#define TT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace tt {

enum class Method { Prune, Evit, Tome, Transform };

// How apply combines what an output row receives: plain sum (T X), size-weighted mean, or that
// mean rescaled to the size-weighted mean of its inputs' norms.
enum class Mode { Sum, Mean, Norm };

inline Method parse_method(const char* op, c10::string_view method) {
  if (method == "prune") return Method::Prune;
  if (method == "evit") return Method::Evit;
  if (method == "tome") return Method::Tome;
  if (method == "transform") return Method::Transform;
  TORCH_CHECK_VALUE(false, op, ": `method` must be one of prune, evit, tome, transform, got '",
                    std::string(method), "'");
}

inline Mode parse_mode(const char* op, c10::string_view mode) {
  if (mode == "sum") return Mode::Sum;
  if (mode == "mean") return Mode::Mean;
  if (mode == "norm") return Mode::Norm;
  TORCH_CHECK_VALUE(false, op, ": `mode` must be 'mean', 'norm' or 'sum', got '",
                    std::string(mode), "'");
}

// A construction of T, validated. K is the number of slots per input token.
struct Construction {
  Method method;
  int64_t batch, tokens, r, k, prefix;
  double tau, alpha;
  bool targets_b;  // targets restricted to ToMe's B set
  bool ward;       // affinity = -Ward's merge cost instead of the cosine
  int64_t slots() const { return method == Method::Transform ? k : 1; }
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
