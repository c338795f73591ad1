"""The fused reduction step on Triton in two launches: match_kernel builds T and lays it out by
output row in the same program, then gather_kernel applies it."""
import torch

from .apply import launch_gather, row_buffers
from .match import launch_match


def transform(x, size, metric, score=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
              targets="all", prefix=1, mode="mean", cost="cosine"):
    """tt.transform on the Triton kernels."""
    torch.ops.tt.check_transform(x, size, metric, score, r, method, k, tau, alpha, targets, prefix,
                                 mode, cost)
    B, N, _ = x.shape
    K = k if method == "spread" else 1
    size = size.contiguous()
    rows = row_buffers(B, N, K, N - r, x.device)
    dst, weight = launch_match(metric, score, size, r, method, k, tau, alpha, targets, prefix,
                               cost, rows)
    x_out, size_out = launch_gather(x, size, weight, *rows, N - r, mode)
    return x_out, size_out, dst, weight
