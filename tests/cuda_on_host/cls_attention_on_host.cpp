// tt_host.cls_attention: csrc/cuda/cls_attention_image.cuh, the CUDA kernel's per-image code, run
// on CPU tensors (host_launch.h). Arguments are validated beforehand by check_cls_attention.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cls_attention_image.cuh"
#include "tt.h"
#include "host_launch.h"

namespace tt {
namespace {

at::Tensor cls_attention_on_host(const at::Tensor& q, const at::Tensor& k,
                                 const std::optional<at::Tensor>& size_in, double scale,
                                 int64_t threads) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), Dh = k.size(3);
  auto out = at::full({B, N}, NAN, k.options().dtype(at::kFloat));
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  const at::Tensor queries = image::kernel_queries(q, k);
  image::dispatch_heads(queries, k, [&](auto q_zero, auto k_zero) {
    using q_t = decltype(q_zero);
    using k_t = decltype(k_zero);
    launch_on_host(B, static_cast<int>(threads), N * sizeof(float),
                   [&](auto& ex, int64_t b, void* logits) {
                     const image::Heads<q_t, k_t> im{
                         queries.data_ptr<q_t>() + b * queries.stride(0), queries.stride(1),
                         queries.stride(3), k.data_ptr<k_t>() + b * k.stride(0), k.stride(1),
                         k.stride(2), k.stride(3),
                         size.defined() ? size.data_ptr<float>() + b * N : nullptr,
                         out.data_ptr<float>() + b * N};
                     image::cls_attention_image(ex, H, N, Dh, static_cast<float>(scale), im,
                                                static_cast<float*>(logits));
                   });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tt_host, m) {
  m.def("cls_attention(Tensor q, Tensor k, Tensor? size, float scale, int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(tt_host, CPU, m) { m.impl("cls_attention", &cls_attention_on_host); }

}  // namespace tt
