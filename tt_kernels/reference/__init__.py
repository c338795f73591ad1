"""Pure-PyTorch reference of every operator: readable, batched, and the ground truth in tests."""
import torch

from . import match as constructions
from .importance import cls_attention
from .sparse import apply, untransform


def match(metric, score, size, r, method, k=1, tau=0.1, alpha=0.0, targets="all", prefix=1,
          cost="cosine"):
    """Build T = (dst, weight) with one of the constructions (same arguments as ``tt.match``).

    T is a constant of the step, as in every backend: gradients reach x through apply, never
    metric, score or size through T's weights."""
    with torch.no_grad():
        if method == "prune":
            return constructions.prune(score, r, prefix)
        if method == "evit":
            return constructions.evit(score, size, r, prefix)
        if method == "tome":
            return constructions.tome(metric, r, prefix)
        return constructions.transform(metric, r, prefix, k, tau, alpha, targets, score, size,
                                       cost)


def transform(x, size, metric, score, r, method, k=1, tau=0.1, alpha=0.0, targets="all", prefix=1,
              mode="mean", cost="cosine"):
    """One reduction step: T from the construction, then X' = T X. Returns x', size', dst, weight."""
    dst, weight = match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
    x_out, size_out = apply(x, size, dst, weight, x.shape[1] - r, mode)
    return x_out, size_out, dst, weight
