// tt_host.rules: csrc/tt.h's shared rules, which every C++ layer reads, for tests/test_rules.py to
// compare with tt_kernels/rules.py.
#include <torch/library.h>

#include <tuple>

#include "tt.h"

namespace tt {
namespace {

// (NORM_EPS, SCORE_EPS, first_a, a_count, max_r, n_keep) for one step.
std::tuple<double, double, int64_t, int64_t, int64_t, int64_t> rules_on_host(
    c10::string_view method, int64_t n, int64_t r, int64_t prefix, bool by_importance) {
  const Method m = parse_method("tt_host.rules", method);
  return {NORM_EPS,         SCORE_EPS, first_a(prefix), a_count(n, prefix),
          max_r(m, n, prefix, by_importance), n_keep(m, n, r, prefix)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def(
      "rules(str method, int n, int r, int prefix, bool by_importance) "
      "-> (float, float, int, int, int, int)",
      &rules_on_host);  // no tensor arguments: one kernel for every dispatch key
}

}  // namespace tt
