// CPU importance score: the class token's attention row only, never the N x N matrix. The logits
// are one batched GEMV through ATen (vectorised BLAS), the rest is a softmax and a head mean.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../tt.h"

namespace tt {
namespace {

at::Tensor cls_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                             const std::optional<at::Tensor>& size,
                             std::optional<double> scale) {
  const double logit_scale = check_cls_attention(q, k, size, scale);
  // [B, H, 1, Dh] x [B, H, Dh, N] -> [B, H, N]
  // Contiguous operands: a strided view would take another BLAS path and round differently.
  const auto q0 = q.narrow(2, 0, 1).to(at::kFloat).contiguous();
  const auto keys = k.to(at::kFloat).contiguous();
  auto logits = at::matmul(q0, keys.transpose(-1, -2)).squeeze(2) * logit_scale;
  if (size.has_value()) logits = logits + size->log().unsqueeze(1);
  return logits.softmax(-1).mean(1);
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CPU, m) { m.impl("cls_attention", &cls_attention_cpu); }

}  // namespace tt
