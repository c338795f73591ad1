"""The Python entry points: one reduction step, its transformation T, and the way back."""
import numbers
from dataclasses import dataclass

import torch

from .backends import implementation
from .rules import max_r  # noqa: F401  (part of the API)

SOURCES = {"redundancy": 0.0, "importance": 1.0, "mix": 0.5}


@dataclass(frozen=True)
class SparseT:
    """One reduction step's sparse T, stored by input token.

    Input token j sends share ``weight[b, j, k]`` of itself to output row ``dst[b, j, k]``.
    """

    dst: torch.Tensor  # int64 [B, N, K]
    weight: torch.Tensor  # fp32 [B, N, K]
    n_out: int

    @property
    def n_in(self):
        return self.dst.shape[1]


def removal_alpha(source, alpha):
    """Maps the removal-source name to the ops' alpha (0 redundancy, 1 importance)."""
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {tuple(SOURCES)}, got {source!r}")
    if alpha is None:
        return SOURCES[source]
    if source != "mix":
        raise ValueError(f"`alpha` is only for source='mix', got source={source!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be a number in [0, 1] or None, got {alpha!r}")
    return float(alpha)


def match(metric, r, *, score=None, size=None, method="spread", k=1, tau=0.1,
          source="redundancy", alpha=None, targets="all", prefix=1, cost="cosine", backend=None):
    """Build T for removing r tokens; returns a SparseT."""
    alpha = removal_alpha(source, alpha)
    ref = metric if metric is not None else score
    if ref is None:
        raise ValueError("tt.match: give `metric` or `score`")
    dst, weight = implementation("match", backend, ref.device)(
        metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
    return SparseT(dst, weight, dst.shape[1] - r)


def transform(x, metric, r, *, size=None, score=None, method="spread", k=1, tau=0.1,
              source="redundancy", alpha=None, targets="all", prefix=1, mode="mean",
              cost="cosine", backend=None):
    """One Token Transforming step: remove r of the N tokens of x [B, N, C].

    metric [B, N, D] gives the similarities (tome, spread), or per head [B, H, N, D] their sum over
    heads (the attention's keys as they lie: ToMe's metric); score [B, N] the importance
    (prune, evit, source="importance"/"mix"); size [B, N] how many patches each token stands for
    (default ones). cost="ward" ranks merges by Ward's cost instead of the cosine; mode="norm"
    keeps each merged token's norm at the size-weighted mean of its inputs'. These defaults are
    the plain operator's (cosine, mean); tt_kernels.patch defaults to the measured best (Ward's
    cost, mode "norm", the full keys as metric). Returns (x_out [B, N - r, C], size_out [B, N - r], T); untransform(y, T)
    brings per-token outputs back to the N input tokens.
    """
    alpha = removal_alpha(source, alpha)
    if size is None:
        size = torch.ones(x.shape[:2], device=x.device)
    step = implementation("transform", backend, x.device)
    x_out, size_out, dst, weight = step(x, size, metric, score, r, method, k, tau, alpha, targets,
                                        prefix, mode, cost)
    return x_out, size_out, SparseT(dst, weight, x.shape[1] - r)


def apply(x, T, size=None, mode="mean", backend=None):
    """X' = T X with sizes; returns (x_out, size_out)."""
    if size is None:
        size = torch.ones(x.shape[:2], device=x.device)
    return implementation("apply", backend, x.device)(x, size, T.dst, T.weight, T.n_out, mode)


def untransform(y, T, backend=None):
    """Back to T's input tokens: each gets the weight-normalised mix of the rows it went to
    (pruned tokens get zeros)."""
    return implementation("untransform", backend, y.device)(y, T.dst, T.weight)


def restore(y, steps, backend=None):
    """Undo several steps (oldest first in `steps`): y on the last step's output grid comes back
    on the first step's input grid, e.g. the full patch grid for a dense head."""
    for T in reversed(steps):
        y = untransform(y, T, backend)
    return y


def cls_attention(q, k, size=None, scale=None, backend=None):
    """Importance score [B, N] fp32: the class query's attention over the keys, averaged over
    heads, with the proportional bias log(size). q, k: [B, H, N, Dh]."""
    return implementation("cls_attention", backend, q.device)(q, k, size, scale)
