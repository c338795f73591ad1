"""Is a kernel's output the reference's? Bounds from the arithmetic, and the near-tie rule.

Used by the tests, bench/bench_gpu.py and tt_kernels.selftest alike, so that "agrees with the
reference" means one thing everywhere.

Tolerances are bounds, never what one machine printed. u is a dtype's unit roundoff: one rounding
moves a value by at most u of itself. A sum of n fp32 terms, in any order, errs by at most (n - 1) u
times the sum of the terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed., section 3.1), so a kernel and the reference, which sum in other orders (BLAS in another order
on each CPU; nvcc contracting a*b+c into FMAs on a GPU), may differ by twice that. The reference
builds T in float64: its own error is nil beside the kernels' fp32 one.

dst is exact: each row of T equals the reference's, unless a choice that row depends on compares
float64 affinities closer than twice their fp32 error bound (a near tie, which fp32 may round
either way: `near_ties`); such rows' weights are not compared, and x' is always compared with the
reference's apply of the kernel's own T.
"""
import torch

from . import reference

U32 = torch.finfo(torch.float32).eps / 2


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def cosine_error(D):
    """Bound on an fp32 cosine of two D-long vectors against the exact one: D u from the dot
    product's sum (relative to |a| |b|), D u from the two sums of squares (halved by the square
    roots, counted whole), and a few u from the products and quotients."""
    return (2 * D + 6) * U32


def head_sum_error(metric):
    """Bound on what the fp32 sum over heads of a per-head metric [B, H, N, D] adds to a cosine's
    error; 0 for a metric [B, N, D]. Each channel of a token's sum errs by at most (H - 1) u times
    the sum of its terms' magnitudes (in any order): an error vector of relative length delta (of
    the sum's length) turns the token's unit vector by at most 2 delta, so a cosine of two tokens
    errs by at most 2 delta of each, 4 delta of the worst token. A sum that cancels to nothing
    from terms that do not has no bound (inf)."""
    if metric is None or metric.dim() != 4:
        return 0.0
    m = metric.detach().cpu().double()
    terms = torch.linalg.vector_norm(m.abs().sum(1), dim=-1)
    length = torch.linalg.vector_norm(m.sum(1), dim=-1)
    ratio = torch.where(terms > 0, terms / length, 0.0)  # x / 0 = inf: cancelled
    return 4 * (m.shape[1] - 1) * U32 * float(ratio.max()) if ratio.numel() else 0.0


def weight_tol(D=16, tau=0.1, size_max=4.0, N=257, head_sum=0.0):
    """T's fp32 weights against the float64 reference's, dst being equal. A softmax weight moves by
    at most eps / (2 tau) when its affinities move by at most eps (|dw_i| = w_i |da_i - sum_j w_j
    da_j| / tau <= w_i (1 - w_i) 2 eps / tau); an affinity errs by the cosine's error (and the
    head sum's, `head_sum_error`), times Ward's size_i size_j / (size_i + size_j) <= size_max / 2.
    evit's weights are quotients of N-term sums: (2N + 4) u of themselves. Weights of 0 or 1
    (prune, tome, k = 1) come out exact."""
    pair = max(size_max / 2, 1.0)
    return dict(atol=pair * (cosine_error(D) + head_sum) / (2 * tau), rtol=(2 * N + 4) * U32)


def sum_tol(terms):
    """Sums of `terms` non-negative fp32 products (sizes): (terms - 1) u of the sum, per side."""
    return dict(rtol=2 * terms * U32, atol=0.0)


def x_tol(dtype, terms=257, channels=24, magnitude=5.0):
    """Outputs in x's dtype that mix at most `terms` inputs with weights summing to 1 (mode mean;
    norm rescales by norms of `channels`-long rows): both sides' fp32 sums err by (terms + 2
    channels + 4) u of the largest sum of |products| (`magnitude`), and each then rounds once to
    the dtype (u of itself)."""
    fp32 = 2 * (terms + 2 * channels + 4) * U32 * magnitude
    return dict(rtol=2 * unit_roundoff(dtype) + fp32 / magnitude, atol=fp32)


def cls_attention_tol(q, k, scale=None):
    """A logit q.k * scale errs by (D + 2) u of sum_d |q_d k_d| * scale on each side; softmax turns
    logit errors of at most e into relative errors of at most 2 e (the head mean keeps them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    magnitude = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double().abs(), k.double().abs())
    logit = 2 * (q.shape[-1] + 2) * U32 * float(magnitude.max()) * abs(scale)
    return dict(rtol=2 * logit + 4 * U32, atol=0.0)


def apply_magnitude(x, size, dst, weight):
    """The largest sum of |products| an apply of T forms from x (what x_tol scales): T applied to
    |x| in mode sum, where weights need not sum to 1 (evit's exceed 1)."""
    n_out = int(dst.max()) + 1 if dst.numel() else 0
    out, _ = reference.apply(x.abs().float(), size, dst, weight, n_out, "sum")
    return max(float(out.max()) if out.numel() else 0.0,
               float(x.abs().max()) if x.numel() else 0.0)


def near_ties(metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
              targets="all", prefix=1, cost="cosine"):
    """[B, N] bool: the tokens whose row of T fp32 arithmetic may choose differently from the
    float64 reference, because a choice compares affinities closer than `tie_bound`. Every token
    of an image where the r-th removal key nearly ties the (r + 1)-th (the removed set, hence the
    numbering of the kept tokens, may change); each removed token whose k + 1 best targets nearly
    tie (its slots may change). Exact ties (gap 0) are not near ties: tokens with equal metric
    rows get equal values in the reference and in every kernel, whatever their positions in a
    GEMM (tests/test_match.py's twins), and both sides take the lower index. Choices by score
    alone (prune, evit, alpha = 1) compare the same fp32 values on both sides: none. Arguments as
    tt.match's (tau weighs, never chooses)."""
    ref = reference.constructions
    compared = ref.token_metric(metric)
    B, N = (compared if compared is not None else score).shape[:2]
    near = torch.zeros(B, N, dtype=torch.bool)
    if method not in ("tome", "spread") or alpha == 1 or r == 0 or B == 0:
        return near
    score = None if score is None else score.cpu()
    size = torch.ones(B, N) if size is None else size.cpu()
    bound = tie_bound(metric, size, cost)
    is_a, is_b = ref.bipartite_sets(N, prefix)
    aff = ref.affinity(compared.cpu(), size, cost)
    key = aff[:, is_a][:, :, is_b].amax(-1)
    if alpha > 0:
        key = key * (1 - alpha) + ref._unimportance(score, prefix)[:, is_a] * alpha

    def near_tie(gaps):
        return (gaps > 0) & (gaps <= bound)

    ranked = key.sort(-1, descending=True).values
    if r < ranked.shape[1]:
        near |= near_tie(ranked[:, r - 1] - ranked[:, r])[:, None]
    removed = is_a.nonzero()[:, 0][ref._largest(key, r)]  # [B, r]
    keep = torch.ones(B, N, dtype=torch.bool).scatter_(1, removed, False)
    targets_b = method == "tome" or targets == "b"
    allowed = keep & (is_b if targets_b else torch.arange(N) >= prefix)
    slots = k if method == "spread" else 1
    rows = aff.gather(1, removed[..., None].expand(-1, -1, N))
    top = rows.masked_fill(~allowed[:, None], -torch.inf).sort(-1, descending=True).values
    top = top[..., :slots + 1]
    near_target = near_tie(top[..., :-1] - top[..., 1:]).any(-1)  # [B, r]
    return near.scatter_(1, removed, near.gather(1, removed) | near_target)


def tie_bound(metric, size, cost="cosine"):
    """Twice the fp32 error of an affinity: choices between affinities closer than this are near
    ties. Ward's cost scales the cosine's error (and the head sum's) by size_i size_j / (size_i +
    size_j)."""
    pair = max(float(size.max()) / 2, 1.0) if cost == "ward" and size is not None and \
        size.numel() else 1.0
    return 2 * pair * (cosine_error(metric.shape[-1]) + head_sum_error(metric))


def _close(got, want, tol):
    """(ok, max abs difference); shapes must agree, NaN never passes."""
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.numel() == 0:
        return True, 0.0
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    ok = bool(torch.isclose(got, want, **tol).all()) and not bool(got.isnan().any())
    return ok, float((got - want).abs().max())


MATCH_DEFAULTS = dict(score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
                      targets="all", prefix=1, cost="cosine")


def check_T(dst, weight, metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1,
            alpha=0.0, targets="all", prefix=1, cost="cosine"):
    """(ok, details): a kernel's T = (dst, weight) against the reference's, image by image, with
    the near-tie rule of this module's docstring."""
    want_dst, want_weight = reference.match(metric, score, size, r, method, k, tau, alpha,
                                            targets, prefix, cost)
    dst, weight = dst.cpu(), weight.cpu()
    if dst.shape != want_dst.shape or dst.dtype != torch.int64 or weight.dtype != torch.float32:
        return False, {"T": f"dst {tuple(dst.shape)} {dst.dtype}, weight {weight.dtype}; want "
                            f"{tuple(want_dst.shape)} int64, float32"}
    B, N = dst.shape[:2]
    same = (dst == want_dst.cpu()).all(-1)  # [B, N] rows of T
    details = {"rows": B * N, "rows_differ": int((~same).sum())}
    ok = True
    if not bool(same.all()):
        near = near_ties(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
        details["rows_near_tie"] = int((~same & near).sum())
        bad = ~same & ~near
        if bool(bad.any()):
            b, j = bad.nonzero()[0].tolist()
            details["dst_differs"] = {"rows": int(bad.sum()), "image": b, "token": j,
                                      "got": dst[b, j].tolist(), "want": want_dst[b, j].tolist()}
            ok = False
    size_max = float(size.max()) if size is not None and size.numel() else 1.0
    w_ok, details["weight_max_diff"] = _close(
        weight[same], want_weight.cpu()[same],
        weight_tol(metric.shape[-1] if metric is not None else 1, tau, size_max, N,
                   head_sum_error(metric)))
    return ok and w_ok, details


def _check_step(x_out, size_out, x, size, dst, weight, mode):
    """x', size' against the reference's apply of the T given (so T's own check is separate)."""
    want_x, want_size = reference.apply(x.cpu(), size.cpu(), dst.cpu(), weight.cpu(),
                                        x_out.shape[1], mode)
    N, C = x.shape[1:]
    tol = x_tol(x.dtype, N, C, apply_magnitude(x.cpu(), size.cpu(), dst.cpu(), weight.cpu()))
    x_ok, x_diff = _close(x_out, want_x, tol)
    s_ok, s_diff = _close(size_out, want_size, sum_tol(N))
    ok = x_ok and s_ok and x_out.dtype == x.dtype and size_out.dtype == torch.float32
    return ok, {"x_max_diff": x_diff, "size_max_diff": s_diff}


def check(op, out, *args):
    """(ok, details): the output `out` of tt.<op>(*args), args positional as in the op's schema,
    against the reference on the same inputs."""
    out = out if isinstance(out, (tuple, list)) else (out,)
    if op == "match":
        names = ("metric",) + tuple(MATCH_DEFAULTS)
        return check_T(*out, **dict(zip(names, args)))
    if op == "transform":
        x, size, metric, score, r, method, k, tau, alpha, targets, prefix, mode, cost = args
        ok, details = check_T(out[2], out[3], metric, score, size, r, method, k, tau, alpha,
                              targets, prefix, cost)
        step_ok, step = _check_step(out[0], out[1], x, size, out[2], out[3], mode)
        return ok and step_ok, details | step
    if op == "apply":
        x, size, dst, weight, n_out, mode = args
        return _check_step(out[0], out[1], x, size, dst, weight, mode)
    if op == "untransform":
        y, dst, weight = args
        want = reference.untransform(y.cpu(), dst.cpu(), weight.cpu())
        magnitude = float(reference.untransform(y.abs().float().cpu(), dst.cpu(),
                                                weight.abs().cpu()).max()) if want.numel() else 0
        ok, diff = _close(out[0], want, x_tol(y.dtype, dst.shape[-1], 0, max(magnitude, 1e-30)))
        return ok and out[0].dtype == y.dtype, {"x_max_diff": diff}
    if op == "cls_attention":
        q, k, size, scale = args
        want = reference.cls_attention(q.cpu(), k.cpu(), None if size is None else size.cpu(),
                                       scale)
        ok, diff = _close(out[0], want, cls_attention_tol(q.cpu(), k.cpu(), scale))
        return ok and out[0].dtype == torch.float32, {"score_max_diff": diff}
    raise ValueError(f"`op` must be one of match, transform, apply, untransform, cls_attention, "
                     f"got {op!r}")
