// Autocast kernels of the tt operators. The ops take x, metric, q and k each in fp32, fp16 or
// bf16, accumulate in fp32 and return x's dtype, so autocast has nothing to cast: it is switched
// off for the call, which also keeps the ATen ops inside the kernels (the CPU similarity GEMM, the
// class-attention GEMV) in the fp32 those kernels read their results in.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace tt {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* op : {"match", "apply", "untransform", "transform", "cls_attention"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(tt, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(tt, AutocastCUDA, m) { register_without_autocast(m); }

}  // namespace tt
