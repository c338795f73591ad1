// The CUDA launches on validated, contiguous inputs that tt.transform's CUDA kernel composes
// (transform.cu) besides its fused kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "../tt.h"

namespace tt {
namespace image {
struct Step;
}

// tt.match's kernel (match.cu) on the metric as the kernels read it (image::kernel_metric; or
// undefined), into dst and weight. `op` names the operator in errors.
void match_cuda_impl(const char* op, const Construction& c, const at::Tensor& metric,
                     const at::Tensor& score, const at::Tensor& size, const at::Tensor& dst,
                     const at::Tensor& weight);

// A batch too small to fill the GPU with one block per image first spreads each image's removal
// keys (its A x B affinities) over several blocks (match.cu's keys_kernel): key and best [B, N],
// which match_image reads. Undefined when the batch fills the GPU (or the step chooses by
// importance): each image's block computes its own.
std::tuple<at::Tensor, at::Tensor> removal_keys_cuda(const char* op, const image::Step& s,
                                                     const at::Tensor& metric,
                                                     const at::Tensor& size);

// tt.apply's kernel (apply.cu): tt.transform's fallback when the apply does not fit in the fused
// block.
std::tuple<at::Tensor, at::Tensor> apply_cuda_impl(const at::Tensor& x, const at::Tensor& size,
                                                   const at::Tensor& dst, const at::Tensor& weight,
                                                   int64_t n_out, Mode mode);

}  // namespace tt
