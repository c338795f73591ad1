"""The case grid of the per-op suites (tests/test_<op>.py) and their checks against
tt_kernels.reference, for every backend of the `tt` fixture (tests/conftest.py).

dst must agree exactly, weights to fp32 rounding, x outputs to one unit in the last place of x's
dtype. The grid is a covering design, not a cartesian product: every construction meets every r
kind (0, 1, max) and every dtype, and the geometries (B, N, prefix, duplicate tokens) rotate through
the cases. A third of it, every construction at one r kind, is marked `interpreted`: the cases the
Triton backend also runs without a GPU.
"""
import pytest
import torch

from conftest import DTYPES, WEIGHT_TOL, construction_kwargs, make_tokens, r_for, sum_tol, x_tol
from tt_kernels import reference, verify

# (method, k, alpha, targets); the spread rows cover every pair of k x alpha, k x targets and
# alpha x targets.
CONSTRUCTIONS = [
    ("prune", 1, 0.0, "all"),
    ("evit", 1, 0.0, "all"),
    ("tome", 1, 0.0, "all"),
    ("spread", 1, 0.0, "all"),
    ("spread", 1, 0.5, "b"),
    ("spread", 1, 1.0, "all"),
    ("spread", 2, 0.0, "b"),
    ("spread", 2, 0.5, "all"),
    ("spread", 2, 1.0, "b"),
    ("spread", 4, 0.0, "all"),
    ("spread", 4, 0.5, "b"),
    ("spread", 4, 1.0, "all"),
]
R_KINDS = [0, 1, "max"]
# The r kind at which the Triton backend also runs each construction without a GPU (`interpreted`):
# over transform every k and every alpha meet every r kind (a Latin square), the twelve cases
# still meet every dtype, mode, cost, N, B and duplicates or not, and of such choices the one with
# the fewest tokens (B x N summed): the interpreter runs a program per output row in turn. Larger
# steps by redundancy are interpreted in tests/test_every_op.py (mixed dtypes, non-contiguous).
INTERPRETED_R_KINDS = [0, "max", 1, "max", 1, 0, 1, 0, "max", 0, "max", 1]
# (B, N, prefix, duplicates): N never a power of two.
GEOMETRIES = [
    (1, 17, 0, True),
    (3, 197, 1, False),
    (3, 257, 2, True),
    (1, 197, 5, False),
    (3, 17, 1, True),
    (1, 257, 1, True),
    (3, 17, 5, False),
]


def inputs(case):
    """The case's tokens and the keyword arguments of its construction."""
    t = make_tokens(case["B"], case["N"], dtype=case["dtype"], seed=case["seed"],
                    duplicates=case["duplicates"])
    kw = construction_kwargs(case["method"], case["k"], case["alpha"], case["targets"],
                             cost=case["cost"])
    return t, dict(r=case["r"], method=case["method"], prefix=case["prefix"], **kw)


def _clear_of_near_ties(case):
    """Whether no choice in the case's inputs compares affinities closer than twice their fp32
    error bound (tt_kernels.verify.near_ties): then every fp32 kernel, on every CPU and BLAS path,
    must make the float64 reference's choices, and dst's exact agreement is a property of the
    kernels, not of the machine."""
    t, args = inputs(case)
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", cost="cosine"), **args}
    return not bool(verify.near_ties(t["metric"], t["score"], t["size"], a["r"], a["method"],
                                     a["k"], a["tau"], a["alpha"], a["targets"], a["prefix"],
                                     a["cost"]).any())


def _cases():
    cases = []
    for c, (method, k, alpha, targets) in enumerate(CONSTRUCTIONS):
        for i, r_kind in enumerate(R_KINDS):
            n = len(cases)
            dtype = DTYPES[(c + i) % len(DTYPES)]
            B, N, prefix, dup = GEOMETRIES[n % len(GEOMETRIES)]
            r = r_for(r_kind, method, N, prefix, alpha)
            r = min(r, N - 1)  # N' = 0 (prefix 0, everything pruned) has its own test
            mode = ("mean", "sum", "norm")[n % 3]
            cost = ("cosine", "ward")[(n // 3) % 2] if method == "spread" else "cosine"
            case = dict(method=method, k=k, alpha=alpha, targets=targets, r=r, dtype=dtype, B=B,
                        N=N, prefix=prefix, duplicates=dup, mode=mode, cost=cost, seed=n)
            while not _clear_of_near_ties(case):  # other random tokens, a seed no case uses
                case["seed"] += len(CONSTRUCTIONS) * len(R_KINDS)
            name = (f"{method}" + (f"-k{k}-a{alpha}-{targets}-{cost}" if method == "spread"
                                   else "")
                    + f"-{mode}"
                    + f"-r{r}-{str(dtype)[6:]}-B{B}-N{N}-P{prefix}" + ("-dup" if dup else ""))
            marks = [pytest.mark.interpreted] if r_kind == INTERPRETED_R_KINDS[c] else []
            cases.append(pytest.param(case, id=name, marks=marks))
    return cases


CASES = _cases()


def ref_match(t, args):
    """The reference's T for a case's tokens and construction arguments."""
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", prefix=1, cost="cosine"), **args}
    return reference.match(t["metric"], t["score"], t["size"], a["r"], a["method"], a["k"],
                           a["tau"], a["alpha"], a["targets"], a["prefix"], a["cost"])


def assert_same_T(got, want, tol=WEIGHT_TOL):
    (dst, weight), (want_dst, want_weight) = got, want
    assert dst.dtype == torch.int64 and weight.dtype == torch.float32
    assert dst.shape == want_dst.shape and weight.shape == want_weight.shape
    assert torch.equal(dst, want_dst)
    torch.testing.assert_close(weight, want_weight, **tol)


def assert_step(got, x, size, metric, score, args, mode="mean"):
    """tt.transform's (x_out, size_out, dst, weight): T is the reference's by tt_kernels.verify's
    rule (dst exactly, but for rows where the float64 reference meets a near tie that fp32 may
    round either way, on any CPU or GPU; weights within their bound), and x_out, size_out are the
    reference's apply of the T returned, so that their tolerance is the apply's own rounding, not
    T's."""
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", prefix=1, cost="cosine"), **args}
    ok, details = verify.check_T(got[2], got[3], metric, score, size, a["r"], a["method"], a["k"],
                                 a["tau"], a["alpha"], a["targets"], a["prefix"], a["cost"])
    assert ok, details
    N, C = x.shape[1:]
    want_x, want_size = reference.apply(x, size, got[2], got[3], N - args["r"], mode)
    assert got[0].dtype == x.dtype and got[0].shape == want_x.shape
    torch.testing.assert_close(got[1], want_size, **sum_tol(N))
    torch.testing.assert_close(got[0], want_x, **x_tol(x.dtype, N, C, float(x.abs().max())))
