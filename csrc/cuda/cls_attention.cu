// CUDA tt.cls_attention: one block per image runs cls_attention_image.cuh; only the class query's
// row of attention is ever formed.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tt.h"
#include "block.cuh"
#include "launch.h"
#include "cls_attention_image.cuh"

namespace tt {
namespace {

constexpr int kThreads = 256;

template <typename q_t, typename k_t>
__global__ void __launch_bounds__(kThreads, 1)
    cls_attention_kernel(int H, int N, int Dh, float scale, image::Heads<q_t, k_t> first,
                         int64_t q_sb, int64_t k_sb) {
  extern __shared__ float logits[];
  const int64_t b = blockIdx.x;
  image::Heads<q_t, k_t> im = first;
  im.q += b * q_sb;
  im.k += b * k_sb;
  if (im.size) im.size += b * N;
  im.out += b * N;
  BlockExec ex;
  image::cls_attention_image(ex, H, N, Dh, scale, im, logits);
}

at::Tensor cls_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                              const std::optional<at::Tensor>& size_in,
                              std::optional<double> scale) {
  const float logit_scale = static_cast<float>(check_cls_attention(q, k, size_in, scale));
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), Dh = k.size(3);
  auto out = at::empty({B, N}, k.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  const int64_t bytes = N * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(bytes <= shared_memory_limit(q.device().index()), "tt.cls_attention: N = ", N,
              " keys do not fit in a block's shared memory; use backend=\"triton\"");
  const at::Tensor queries = image::kernel_queries(q, k);
  image::dispatch_heads(queries, k, [&](auto q_zero, auto k_zero) {
    using q_t = decltype(q_zero);
    using k_t = decltype(k_zero);
    const auto kernel = cls_attention_kernel<q_t, k_t>;
    allow_shared_memory(reinterpret_cast<const void*>(kernel), q.device().index(), bytes);
    const image::Heads<q_t, k_t> first{
        queries.data_ptr<q_t>(), queries.stride(1), queries.stride(3), k.data_ptr<k_t>(),
        k.stride(1), k.stride(2), k.stride(3), size.defined() ? size.data_ptr<float>() : nullptr,
        out.data_ptr<float>()};
    kernel<<<B, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        H, N, Dh, logit_scale, first, queries.stride(0), k.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CUDA, m) { m.impl("cls_attention", &cls_attention_cuda); }

}  // namespace tt
