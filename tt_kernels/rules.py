"""The rules every layer shares: which operators there are, how many tokens a step may remove and
keeps, which tokens may leave, and the guards against dividing by zero. Written once here and once
in C++ (csrc/tt.h); tests/test_rules.py keeps the two equal.
"""

# The operators of torch.ops.tt, in the order of their schemas (csrc/ops.cpp); every backend, test
# and benchmark iterates over this one tuple.
OPS = ("match", "apply", "untransform", "transform", "cls_attention")

NORM_EPS = 1e-12  # a zero vector's norm is clamped to this: its cosine is 0, not NaN
SCORE_EPS = 1e-30  # an all-zero score (or sum of sizes) must not divide by zero


def first_a(prefix):
    """The first of ToMe's A tokens (the even unprotected ones, the only ones that may leave when
    the choice is by redundancy)."""
    return prefix + prefix % 2


def a_count(n, prefix):
    """How many A tokens n tokens have."""
    return max(n - first_a(prefix) + 1, 0) // 2


def max_r(method, n, prefix=1, by_importance=False):
    """Largest r a construction can remove from n tokens with static shapes: ToMe's bipartite cap
    when only A tokens may leave, one output row for evit's fused token, and at least one token
    left."""
    if method == "evit":
        r = n - prefix - 1
    elif method == "prune" or by_importance:
        r = n - prefix
    else:
        r = (n - prefix) // 2
    return max(min(r, n - 1), 0)


def n_keep(method, n, r, prefix=1):
    """Unprotected tokens kept by a step removing r of n (evit's fused token is not one of them)."""
    return n - r - prefix - (1 if method == "evit" and r > 0 else 0)
