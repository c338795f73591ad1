"""Reference match: how similar tokens are, the four constructions of the sparse transformation T
(prune, evit, tome, spread) and ``match``, which runs one of them (the spec in code).

T is stored by input token ("ELL by column"): input token j sends share ``weight[b, j, k]`` of
itself to output row ``dst[b, j, k]``. Every construction returns ``dst`` int64 [B, N, K] and
``weight`` fp32 [B, N, K]. Output order: the ``prefix`` protected tokens first, then the kept
tokens in ascending original index (evit's fused token last). Ties are broken towards the lower
index, always through stable sorts. Unused slots carry weight 0 and dst 0.

Affinities, keys and softmax weights are computed in float64: the choices are then those of exact
arithmetic on every machine and BLAS path (the fp32 GEMM's rounding differs between CPUs), and
the fp32 kernels make the same choices except between values that tie within their fp32
rounding. Only exact ties (equal inputs) are broken by index.
"""
import torch

from ..rules import NORM_EPS, SCORE_EPS


def token_metric(metric):
    """The metric the tokens are compared by: a per-head metric [B, H, N, D] summed over its heads
    (in float64), [B, N, D] as it is."""
    return metric.double().sum(1) if metric is not None and metric.dim() == 4 else metric


def similarity(metric, rows=None):
    """Cosine similarity of the tokens `rows` (default: all) with every token, [B, R, N] float64.

    Tokens with equal metric rows get equal values, so that their exact ties go to the lower
    index: a GEMM may round a column by its position (MKL's AVX2 kernels do), so each image's
    distinct rows are compared once and the values indexed back."""
    m = metric.double()
    rows = torch.arange(m.shape[1], device=m.device) if rows is None else rows
    sim = m.new_empty(m.shape[0], len(rows), m.shape[1])
    for b, image in enumerate(m):
        distinct, index = torch.unique(image, dim=0, return_inverse=True)
        unit = distinct / torch.linalg.vector_norm(distinct, dim=-1, keepdim=True).clamp_min(
            NORM_EPS)
        sim[b] = (unit @ unit.T)[index[rows]][:, index]
    return sim


def affinity(metric, size, cost="cosine", rows=None):
    """How much the tokens `rows` (default: all) want to merge with each token, [B, R, N] float64
    (higher merges first).

    cost="cosine": their cosine similarity (ToMe). cost="ward": minus Ward's merge cost
    size_i * size_j / (size_i + size_j) * (1 - cosine), the growth of the groups' squared error
    on unit-norm metrics, so that tokens already standing for many patches merge last.
    """
    sim = similarity(metric, rows)
    if cost == "cosine":
        return sim
    s = size.double()
    s_rows = s if rows is None else s[:, rows]
    pair = s_rows[:, :, None] * s[:, None, :] / (s_rows[:, :, None] + s[:, None, :]).clamp_min(
        SCORE_EPS)
    return -(pair * (1 - sim))


def _all_rows(values, rows, n):
    """[B, R, N] rows of the tokens `rows` -> [B, N, N], -inf for the rows not computed."""
    out = values.new_full((values.shape[0], n, values.shape[2]), -torch.inf)
    out[:, rows] = values
    return out


def bipartite_sets(n, prefix, device=None):
    """ToMe's split of the unprotected tokens by index parity: A (even, may leave) and B (odd)."""
    idx = torch.arange(n, device=device)
    free = idx >= prefix
    return free & (idx % 2 == 0), free & (idx % 2 == 1)


def _largest(values, count):
    """Indices of the `count` largest values along the last dim; ties go to the lower index."""
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :count]


def _mask_of(indices, like):
    return torch.zeros_like(like, dtype=torch.bool).scatter_(1, indices, True)


def _keep_by_score(score, n_keep, prefix):
    """The prefix plus the n_keep highest-scoring other tokens."""
    ranked = score.float().clone()
    ranked[:, :prefix] = torch.inf
    return _mask_of(_largest(ranked, prefix + n_keep), ranked)


def _best_b_match(sim, b):
    """Each token's most similar B token: (similarity, index)."""
    masked = sim.masked_fill(~b, -torch.inf)
    best = _largest(masked, 1)
    return masked.gather(-1, best)[..., 0], best[..., 0]


def _unimportance(score, prefix):
    """1 - score / max score over the unprotected tokens, in [0, 1] for non-negative scores."""
    score = score.double()
    free = torch.arange(score.shape[1], device=score.device) >= prefix
    top = score.masked_fill(~free, -torch.inf).amax(1, keepdim=True).clamp_min(SCORE_EPS)
    return 1 - score / top


def _kept_rows(keep):
    return keep.long().cumsum(1) - 1


def _ell(keep, dst, weight):
    """Kept tokens send weight 1 to their own output row (slot 0); removed ones use dst/weight."""
    own = torch.zeros_like(dst)
    own[..., 0] = _kept_rows(keep)
    own_weight = torch.zeros_like(weight)
    own_weight[..., 0] = 1
    return torch.where(keep[..., None], own, dst), torch.where(keep[..., None], own_weight, weight)


def prune(score, r, prefix=1):
    """Keep the N - r - prefix highest-scoring unprotected tokens; the others get weight 0."""
    B, N = score.shape
    keep = _keep_by_score(score, N - r - prefix, prefix)
    zeros = torch.zeros(B, N, 1, dtype=torch.long, device=score.device)
    return _ell(keep, zeros, zeros.float())


def evit(score, size, r, prefix=1):
    """Like prune, but the r + 1 lowest-scoring tokens fuse into one extra, last output token.

    The fused token is their score- and size-weighted mean, and its size is the sum of theirs:
    token j sends weight score_j * sum(size) / sum(score * size). r = 0 changes nothing.
    """
    B, N = score.shape
    if r == 0:
        return prune(score, 0, prefix)
    if size is None:
        size = torch.ones_like(score)
    keep = _keep_by_score(score, N - r - 1 - prefix, prefix)
    fused = ~keep
    s, size = score.double() * fused, size.double()
    mass = (size * fused).sum(1, keepdim=True)
    share = s * mass / (s * size).sum(1, keepdim=True).clamp_min(SCORE_EPS)
    dst = torch.full((B, N, 1), N - r - 1, dtype=torch.long, device=score.device)
    return _ell(keep, dst, share.float()[..., None])


def tome(metric, r, prefix=1):
    """ToMe's bipartite soft matching: the r A tokens most similar to some B token merge into it."""
    B, N, _ = metric.shape
    a, b = bipartite_sets(N, prefix, metric.device)
    rows = a.nonzero()[:, 0]  # only the A tokens may leave: only their rows are needed
    best, match = _best_b_match(_all_rows(similarity(metric, rows), rows, N), b)
    keep = ~_mask_of(_largest(best.masked_fill(~a, -torch.inf), r), best)
    dst = _kept_rows(keep).gather(1, match)[..., None]
    return _ell(keep, dst, torch.ones_like(dst, dtype=torch.float32))


def spread(metric, r, prefix=1, k=1, tau=0.1, alpha=0.0, targets="all", score=None,
           size=None, cost="cosine"):
    """Token Transforming: choose r tokens to remove, spread each over its k closest targets.

    Closeness is the affinity above (cosine, or minus Ward's cost, which needs `size`).
    Removal key: (1 - alpha) * redundancy + alpha * unimportance, over the A tokens, where
    redundancy is the best affinity to a B token (ToMe's choice). alpha = 1 is pure importance
    and chooses among all unprotected tokens (the lowest scores leave, as in prune).
    Targets: the kept unprotected tokens ("all") or only the kept B tokens ("b"). Each removed token
    sends softmax(affinity / tau) over its k closest targets; with none it is pruned.
    """
    B, N, _ = metric.shape
    a, b = bipartite_sets(N, prefix, metric.device)
    if size is None:
        size = torch.ones(B, N, device=metric.device)
    if alpha == 1:  # any unprotected token may leave: every row is needed
        sim = affinity(metric, size, cost)
        keep = _keep_by_score(score, N - r - prefix, prefix)
    else:  # only A tokens leave: only their rows are needed
        rows = a.nonzero()[:, 0]
        sim = _all_rows(affinity(metric, size, cost, rows), rows, N)
        key, _ = _best_b_match(sim, b)
        if alpha > 0:
            key = key * (1 - alpha) + _unimportance(score, prefix) * alpha
        keep = ~_mask_of(_largest(key.masked_fill(~a, -torch.inf), r), key)
    allowed = keep & (b if targets == "b" else torch.arange(N, device=metric.device) >= prefix)
    candidates = sim.masked_fill(~allowed[:, None, :], -torch.inf)
    top = _largest(candidates, k)
    cos = candidates.gather(-1, top)
    used = torch.isfinite(cos)
    weight = torch.where(used, torch.softmax(cos / tau, -1), 0.0).float()
    dst = torch.where(used, _kept_rows(keep).gather(1, top.flatten(1)).reshape(top.shape), 0)
    return _ell(keep, dst, weight)


def match(metric, score, size, r, method, k=1, tau=0.1, alpha=0.0, targets="all", prefix=1,
          cost="cosine"):
    """Build T = (dst, weight) with one of the constructions (same arguments as ``tt.match``).

    T is a constant of the step, as in every backend: gradients reach x through apply, never
    metric, score or size through T's weights."""
    metric = token_metric(metric)
    with torch.no_grad():
        if method == "prune":
            return prune(score, r, prefix)
        if method == "evit":
            return evit(score, size, r, prefix)
        if method == "tome":
            return tome(metric, r, prefix)
        return spread(metric, r, prefix, k, tau, alpha, targets, score, size, cost)
