"""Reference untransform: the full token grid back from a reduced one, through the transpose of
T (in the format of ``match.py``). Accumulated in fp32, written in y's dtype.
"""
import torch


def untransform(y, dst, weight):
    """The column-normalised transpose of T: x_full[j] = sum_k weight * y[dst] / sum_k weight.

    Pruned tokens (all weights zero) come back as zeros.
    """
    B, N, K = dst.shape
    C = y.shape[-1]
    gathered = y.float().gather(1, dst.reshape(B, N * K, 1).expand(B, N * K, C)).reshape(B, N, K, C)
    total = weight.sum(-1, keepdim=True)
    coef = torch.where(total > 0, weight / total, 0.0)
    return (gathered * coef[..., None]).sum(2).to(y.dtype)
