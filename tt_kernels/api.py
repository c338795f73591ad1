"""The Python entry points: one reduction step, its transformation T, and the way back."""
from dataclasses import dataclass

import torch

from . import backends, reference
from .ops import ops

METHODS = ("prune", "evit", "tome", "transform")
SOURCES = {"redundancy": 0.0, "importance": 1.0, "mix": 0.5}


@dataclass(frozen=True)
class Transform:
    """One reduction step's sparse T, stored by input token.

    Input token j sends share ``weight[b, j, k]`` of itself to output row ``dst[b, j, k]``.
    """

    dst: torch.Tensor  # int64 [B, N, K]
    weight: torch.Tensor  # fp32 [B, N, K]
    n_out: int

    @property
    def n_in(self):
        return self.dst.shape[1]


def _removal_alpha(source, alpha):
    """Maps the removal-source name to the ops' alpha (0 redundancy, 1 importance)."""
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {tuple(SOURCES)}, got {source!r}")
    if alpha is None:
        return SOURCES[source]
    if source != "mix":
        raise ValueError(f"`alpha` is only for source='mix', got source={source!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}")
    return float(alpha)


def _check_reference_args(method, x, metric, score, r, prefix, k, tau, alpha, targets, mode):
    """The checks the ops make in C++, for the pure-PyTorch path."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    ref = metric if metric is not None else score
    if ref is None:
        raise ValueError(f"method {method!r} needs `metric` or `score`")
    B, N = ref.shape[:2]
    for name, t in (("x", x), ("metric", metric), ("score", score)):
        if t is not None and tuple(t.shape[:2]) != (B, N):
            raise RuntimeError(f"`{name}` must start with [B, N] = [{B}, {N}], got {tuple(t.shape)}")
    if not 0 <= prefix <= N:
        raise ValueError(f"`prefix` must lie in [0, N = {N}], got {prefix}")
    if method != "transform" and k != 1:
        raise ValueError(f"`k` applies only to method 'transform'; got k = {k} with {method!r}")
    if not 1 <= k <= max(N, 1):
        raise ValueError(f"`k` must lie in [1, N = {N}], got {k}")
    if not tau > 0:
        raise ValueError(f"`tau` must be positive, got {tau}")
    if targets not in ("all", "b"):
        raise ValueError(f"`targets` must be 'all' or 'b', got {targets!r}")
    if mode not in ("mean", "sum"):
        raise ValueError(f"`mode` must be 'mean' or 'sum', got {mode!r}")
    needs_score = method in ("prune", "evit") or (method == "transform" and alpha > 0)
    if needs_score and score is None:
        raise ValueError(f"method {method!r} (with this source) needs `score`")
    if method in ("tome", "transform") and metric is None:
        raise ValueError(f"method {method!r} needs `metric`")
    r_max = max_r(method, N, prefix, by_importance=alpha == 1)
    if not 0 <= r <= r_max:
        raise ValueError(f"`r` must lie in [0, {r_max}] for method {method!r} "
                         f"with N = {N} and prefix = {prefix}, got {r}")


def max_r(method, n, prefix=1, by_importance=False):
    """Largest r a construction can remove from n tokens (ToMe's cap for bipartite choices)."""
    if method == "evit":
        return max(n - prefix - 1, 0)
    if method == "prune" or (method == "transform" and by_importance):
        return n - prefix
    return (n - prefix) // 2


def match(metric, r, *, score=None, size=None, method="transform", k=1, tau=0.1,
          source="redundancy", alpha=None, targets="all", prefix=1, backend=None):
    """Build T for removing r tokens; returns a Transform."""
    alpha = _removal_alpha(source, alpha)
    ref = metric if metric is not None else score
    which = backends.resolve("match", backend, ref.device)
    if which == "reference":
        _check_reference_args(method, None, metric, score, r, prefix, k, tau, alpha, targets,
                              "mean")
        if size is None:
            size = torch.ones(ref.shape[:2], device=ref.device)
        dst, weight = reference.match(metric, score, size, r, method, k, tau, alpha, targets, prefix)
    else:
        dst, weight = ops.match(metric, score, size, r, method, k, tau, alpha, targets, prefix)
    return Transform(dst, weight, ref.shape[1] - r)


def transform(x, metric, r, *, size=None, score=None, method="transform", k=1, tau=0.1,
              source="redundancy", alpha=None, targets="all", prefix=1, mode="mean",
              backend=None):
    """One Token Transforming step: remove r of the N tokens of x [B, N, C].

    metric [B, N, D] gives the similarities (tome, transform); score [B, N] the importance
    (prune, evit, source="importance"/"mix"); size [B, N] how many patches each token stands for
    (default ones). Returns (x_out [B, N - r, C], size_out [B, N - r], T); untransform(y, T)
    brings per-token outputs back to the N input tokens.
    """
    alpha = _removal_alpha(source, alpha)
    if size is None:
        size = torch.ones(x.shape[:2], device=x.device)
    which = backends.resolve("transform", backend, x.device)
    if which == "reference":
        _check_reference_args(method, x, metric, score, r, prefix, k, tau, alpha, targets, mode)
        step = reference.transform
    else:
        step = ops.transform
    x_out, size_out, dst, weight = step(x, size, metric, score, r, method, k, tau, alpha, targets,
                                        prefix, mode)
    return x_out, size_out, Transform(dst, weight, x.shape[1] - r)


def apply(x, T, size=None, mode="mean", backend=None):
    """X' = T X with sizes; returns (x_out, size_out)."""
    if size is None:
        size = torch.ones(x.shape[:2], device=x.device)
    which = backends.resolve("apply", backend, x.device)
    impl = reference.apply if which == "reference" else ops.apply
    return impl(x, size, T.dst, T.weight, T.n_out, mode)


def untransform(y, T, backend=None):
    """Back to T's input tokens: each gets the weight-normalised mix of the rows it went to
    (pruned tokens get zeros)."""
    which = backends.resolve("untransform", backend, y.device)
    impl = reference.untransform if which == "reference" else ops.untransform
    return impl(y, T.dst, T.weight)


def restore(y, steps, backend=None):
    """Undo several steps (oldest first in `steps`): y on the last step's output grid comes back
    on the first step's input grid, e.g. the full patch grid for a dense head."""
    for T in reversed(steps):
        y = untransform(y, T, backend)
    return y


def cls_attention(q, k, size=None, scale=None, backend=None):
    """Importance score [B, N] fp32: the class query's attention over the keys, averaged over
    heads, with the proportional bias log(size). q, k: [B, H, N, Dh]."""
    which = backends.resolve("cls_attention", backend, q.device)
    impl = reference.cls_attention if which == "reference" else ops.cls_attention
    return impl(q, k, size, scale)
