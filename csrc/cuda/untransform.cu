// CUDA tt.untransform: untransform_rows (untransform_image.cuh) with a block per range of tokens
// of an image, so that small batches still fill the GPU; 16-byte packs when rows align.
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
#include "untransform_image.cuh"

namespace tt {
namespace {

template <typename x_t, int V>
__global__ void __launch_bounds__(kRowWarps * 32, 2)
    untransform_kernel(int N, int K, int C, int n_y, const x_t* y, const int64_t* dst,
                       const float* weight, x_t* out, int parts) {
  const int64_t b = blockIdx.x / parts;
  const int t0 = (blockIdx.x % parts) * kRowsPerBlock;
  BlockExec ex;
  image::untransform_rows<V>(ex, K, C, y + b * n_y * C, dst + b * N * K, weight + b * N * K,
                             out + b * N * C, t0, min(N, t0 + kRowsPerBlock));
}

at::Tensor untransform_cuda(const at::Tensor& y_in, const at::Tensor& dst_in,
                            const at::Tensor& weight_in) {
  check_untransform(y_in, dst_in, weight_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto dst = dst_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = dst.size(0), N = dst.size(1), K = dst.size(2), C = y.size(2);
  auto out = at::empty({B, N, C}, y.options());
  if (out.numel() == 0) return out;
  const int parts = ceil_div(N, kRowsPerBlock);
  TT_DISPATCH_FLOAT_TYPES(y.scalar_type(), "tt_untransform_cuda", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool packed = image::pack_width<scalar_t>(y.data_ptr(), C) == V;
    const auto kernel = packed ? untransform_kernel<scalar_t, V> : untransform_kernel<scalar_t, 1>;
    kernel<<<B * parts, kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        N, K, C, y.size(1), y.data_ptr<scalar_t>(), dst.data_ptr<int64_t>(),
        weight.data_ptr<float>(), out.data_ptr<scalar_t>(), parts);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, CUDA, m) { m.impl("untransform", &untransform_cuda); }

}  // namespace tt
