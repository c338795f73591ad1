"""Triton untransform: each input token gathers the weight-normalised mix of the rows it went to."""
import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fixes triton 3.6's interpreter under NumPy 2.4)


@triton.jit
def untransform_kernel(y_ptr, dst_ptr, weight_ptr, out_ptr, N, N_Y, C, s_yb, s_yn, s_yc,
                       K: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0)
    b = t // N
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    total = 0.0
    for k in tl.static_range(K):
        total += tl.load(weight_ptr + t * K + k)
    acc = tl.zeros((BC,), tl.float32)
    for k in tl.static_range(K):
        w = tl.load(weight_ptr + t * K + k)
        d = tl.load(dst_ptr + t * K + k)
        coef = tl.where(total > 0, w / total, 0.0)
        acc += coef * tl.load(y_ptr + b * s_yb + d * s_yn + c * s_yc, mask=c < C,
                              other=0.0).to(tl.float32)
    tl.store(out_ptr + t * C + c, acc.to(out_ptr.dtype.element_ty), mask=c < C)


def untransform(y, dst, weight):
    """tt.untransform on the Triton kernels."""
    torch.ops.tt.check_untransform(y, dst, weight)
    B, N, K = dst.shape
    C = y.shape[-1]
    out = y.new_empty(B, N, C)
    if out.numel() == 0:
        return out
    BC = min(triton.next_power_of_2(C), 256)
    untransform_kernel[(B * N, triton.cdiv(C, BC))](
        y, dst.contiguous(), weight.contiguous(), out, N, y.shape[1], C,
        y.stride(0), y.stride(1), y.stride(2), K=K, BC=BC)
    return out
