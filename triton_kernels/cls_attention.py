"""Triton importance score: the class query's attention row per head, softmax with the
log(size) bias, averaged over heads in a fixed order (one program per image)."""
import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fixes triton 3.6's interpreter under NumPy 2.4)


@triton.jit
def cls_attention_kernel(q_ptr, k_ptr, size_ptr, out_ptr, H, N, D, scale, s_qb, s_qh, s_qd,
                         s_kb, s_kh, s_kn, s_kd, HAS_SIZE: tl.constexpr, NP: tl.constexpr,
                         DC: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, NP)
    valid = j < N
    bias = tl.zeros((NP,), tl.float32)
    if HAS_SIZE:
        bias = tl.log(tl.load(size_ptr + b * N + j, mask=valid, other=1.0))
    mean = tl.zeros((NP,), tl.float32)
    for h in range(H):
        logits = tl.zeros((NP,), tl.float32)
        for d0 in range(0, D, DC):
            d = d0 + tl.arange(0, DC)
            q = tl.load(q_ptr + b * s_qb + h * s_qh + d * s_qd, mask=d < D, other=0.0)
            kt = tl.load(k_ptr + b * s_kb + h * s_kh + j[:, None] * s_kn + d[None, :] * s_kd,
                         mask=valid[:, None] & (d[None, :] < D), other=0.0)
            logits += tl.sum(kt.to(tl.float32) * q.to(tl.float32)[None, :], axis=1)
        logits = tl.where(valid, logits * scale + bias, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        mean += p / tl.sum(p, axis=0)
    tl.store(out_ptr + b * N + j, mean / H, mask=valid)


def cls_attention(q, k, size=None, scale=None):
    """tt.cls_attention on the Triton kernels."""
    torch.ops.tt.check_cls_attention(q, k, size, scale)
    B, H, N, D = k.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(B, N, dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    size_arg = size.contiguous() if size is not None else out
    NP = max(triton.next_power_of_2(N), 16)
    # Each d-step loads a [NP, 16] tile of k: 8 warps from NP = 2048 keep it in registers (with 4
    # warps triton 3.6 spilled 264 bytes a thread for DINOv2 at 518 px, sm_90).
    cls_attention_kernel[(B,)](
        q, k, size_arg, out, H, N, D, float(scale), q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        HAS_SIZE=size is not None, NP=NP, DC=16, num_warps=8 if NP >= 2048 else 4)
    return out
