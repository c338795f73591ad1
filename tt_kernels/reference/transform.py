"""Reference transform: one reduction step, T from a construction (``match.py``), then X' = T X."""
from .apply import apply
from .match import match


def transform(x, size, metric, score, r, method, k=1, tau=0.1, alpha=0.0, targets="all", prefix=1,
              mode="mean", cost="cosine"):
    """One reduction step: T from the construction, then X' = T X.

    Returns x', size', dst, weight."""
    dst, weight = match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
    x_out, size_out = apply(x, size, dst, weight, x.shape[1] - r, mode)
    return x_out, size_out, dst, weight
