// CUDA tt.apply: apply_rows (apply_image.cuh) with a block per range of output rows of an image,
// so that small batches still fill the GPU; 16-byte packs when rows align.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../tt.h"
#include "apply_image.cuh"
#include "block.cuh"
#include "kernels.h"
#include "launch.h"

namespace tt {
namespace {

template <typename x_t, int V>
__global__ void __launch_bounds__(kRowWarps * 32, 2)
    apply_kernel(image::ApplyStep s, image::ApplyImage<x_t> first, int parts) {
  extern __shared__ float4 shared[];
  const int64_t b = blockIdx.x / parts;
  const int row0 = (blockIdx.x % parts) * kRowsPerBlock;
  const int row1 = min(s.n_out, row0 + kRowsPerBlock);
  BlockExec ex;
  image::apply_rows<V>(ex, s, first.image(s, b), row0, row1, shared);
}

std::tuple<at::Tensor, at::Tensor> apply_cuda(const at::Tensor& x, const at::Tensor& size,
                                              const at::Tensor& dst, const at::Tensor& weight,
                                              int64_t n_out, c10::string_view mode) {
  const Mode how = check_apply("tt.apply", x, size, dst, weight, n_out, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  return apply_cuda_impl(x.contiguous(), size.contiguous(), dst.contiguous(),
                         weight.contiguous(), n_out, how);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_cuda_impl(const at::Tensor& x, const at::Tensor& size,
                                                   const at::Tensor& dst, const at::Tensor& weight,
                                                   int64_t n_out, Mode mode) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = dst.size(2);
  TORCH_CHECK(N * K < (int64_t{1} << 31), "tt.apply: N * K must fit in int32, got ", N * K);
  auto out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::empty({B, n_out}, size.options());
  if (B == 0 || n_out == 0) return {out, size_out};
  const image::ApplyStep s{static_cast<int>(N), static_cast<int>(K), static_cast<int>(C),
                           static_cast<int>(n_out), mode};
  // As many warps (each with a row buffer of C floats) as the shared memory holds, up to
  // kRowWarps.
  const int64_t lists = 4 * static_cast<int64_t>(image::apply_words(s, kRowsPerBlock, 0));
  const int64_t limit = shared_memory_limit(x.device().index());
  const int warps =
      static_cast<int>(C > 0 ? std::min<int64_t>(kRowWarps, (limit - lists) / (4 * C)) : kRowWarps);
  TORCH_CHECK(warps >= 1, "tt.apply: C = ", C, " channels and N * K = ", N * K,
              " entries need more shared memory than this GPU gives a block (", limit,
              " bytes); use backend=\"triton\"");
  const int64_t bytes = 4 * static_cast<int64_t>(image::apply_words(s, kRowsPerBlock, warps));
  const int parts = ceil_div(n_out, kRowsPerBlock);
  TT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tt_apply_cuda", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool packed = image::pack_width<scalar_t>(x.data_ptr(), C) == V;
    const auto kernel = packed ? apply_kernel<scalar_t, V> : apply_kernel<scalar_t, 1>;
    allow_shared_memory(reinterpret_cast<const void*>(kernel), x.device().index(), bytes);
    kernel<<<B * parts, warps * 32, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        s, image::make_apply_image<scalar_t>(x, size, dst, weight, out, size_out), parts);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, size_out};
}

TORCH_LIBRARY_IMPL(tt, CUDA, m) { m.impl("apply", &apply_cuda); }

}  // namespace tt
