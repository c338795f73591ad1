"""Properties every construction must have, for the C++ kernels and the reference alike:
size conservation, output order, transform(k=1, targets="b") == tome, r = 0 is the identity, and
ties go to the lower index."""
import pytest
import torch

from conftest import SIZE_TOL, U32, construction_kwargs, make_tokens, r_for
from tt_kernels import reference

BACKENDS = {"cpu": torch.ops.tt.transform, "reference": reference.transform}


@pytest.fixture(params=list(BACKENDS))
def step(request):
    """One reduction step, by the backend: (x_out, size_out, dst, weight)."""
    fn = BACKENDS[request.param]

    def run(t, r, method, prefix=1, mode="mean", **construction):
        return fn(t["x"], t["size"], t["metric"], t["score"], r, method,
                  prefix=prefix, mode=mode, **construction_kwargs(method, **construction))
    return run


# Constructions that conserve size (every one but prune), at their largest r. With alpha = 1 the
# removal is by importance and can take every token; r = max_r // 2 leaves targets to merge into.
CONSERVING = [
    ("evit", {}, "max"), ("tome", {}, "max"),
    ("spread", dict(k=1), "max"), ("spread", dict(k=2, alpha=0.5, targets="b"), "max"),
    ("spread", dict(k=4, targets="b"), 1), ("spread", dict(k=4, alpha=1.0), "half"),
    ("spread", dict(k=2, alpha=1.0, targets="b"), "half"),
]


def _r(kind, method, construction, n, prefix):
    alpha = construction.get("alpha", 0.0)
    if kind == "half":
        return r_for("max", method, n, prefix, alpha) // 2
    return r_for(kind, method, n, prefix, alpha)


@pytest.mark.parametrize("method,construction,r_kind", CONSERVING)
@pytest.mark.parametrize("prefix", [1, 2])
def test_size_is_conserved(step, method, construction, r_kind, prefix):
    t = make_tokens(3, 197, seed=prefix, duplicates=True)
    r = _r(r_kind, method, construction, 197, prefix)
    _, size_out, _, _ = step(t, r, method, prefix, **construction)
    assert size_out.shape == (3, 197 - r)
    torch.testing.assert_close(size_out.sum(1), t["size"].sum(1), **SIZE_TOL)


def test_prune_loses_exactly_the_pruned_sizes(step):
    t = make_tokens(3, 197, seed=3)
    _, size_out, _, weight = step(t, 60, "prune")
    kept = weight[..., 0] == 1
    assert (kept.sum(1) == 137).all()
    torch.testing.assert_close(size_out.sum(1), (t["size"] * kept).sum(1), **SIZE_TOL)


def _kept(method, dst, weight, n_out, prefix):
    """Which input tokens own an output row, from T alone (method by method)."""
    N = dst.shape[1]
    idx = torch.arange(N)
    pure = (weight[..., 0] == 1) & (weight[..., 1:] == 0).all(-1)
    if method == "evit":  # the fused token is the last row
        return pure & (dst[..., 0] < n_out - 1)
    if method == "tome":  # every B token stays; an A token stays unless it shares a B token's row
        is_b = (idx >= prefix) & (idx % 2 == 1)
        shares = (dst[:, :, None, 0] == dst[:, None, :, 0]) & is_b
        return (idx < prefix) | is_b | ~shares.any(-1)
    return pure  # prune; transform with k >= 2 (removed tokens split their weight)


@pytest.mark.parametrize("method,construction,r", [
    ("prune", {}, 50), ("evit", {}, 50), ("tome", {}, 98), ("spread", dict(k=2), 98),
    ("spread", dict(k=4, alpha=1.0, targets="b"), 120),
])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_output_order_prefix_then_kept_ascending(step, method, construction, r, prefix):
    N = 197
    t = make_tokens(3, N, seed=prefix, duplicates=True)
    r = min(r, _r("max", method, construction, N, prefix))
    _, _, dst, weight = step(t, r, method, prefix, **construction)
    n_out = N - r
    kept = _kept(method, dst, weight, n_out, prefix)
    n_rows = n_out - (1 if method == "evit" and r > 0 else 0)
    for b in range(3):
        owners = kept[b].nonzero()[:, 0]
        assert owners[:prefix].tolist() == list(range(prefix))
        assert len(owners) == n_rows
        # owners in ascending index own rows 0, 1, 2, ... in turn
        assert dst[b, owners, 0].tolist() == list(range(n_rows))
    # Protected tokens are never targets of anything else.
    sends = weight > 0
    assert not (sends & (dst < prefix) & (torch.arange(N)[None, :, None] >= prefix)).any()
    if method == "evit":
        assert (dst[~kept][:, 0] == n_out - 1).all()


@pytest.mark.parametrize("seed,B,N,prefix,duplicates", [
    (0, 3, 197, 1, True), (1, 1, 17, 0, True), (2, 3, 257, 2, False), (3, 2, 197, 5, True)])
def test_transform_k1_targets_b_is_tome(step, seed, B, N, prefix, duplicates):
    t = make_tokens(B, N, seed=seed, duplicates=duplicates)
    r = r_for("max", "tome", N, prefix) - seed  # a few r, up to the cap
    tome = step(t, r, "tome", prefix)
    spread = step(t, r, "spread", prefix, k=1, alpha=0.0, targets="b")
    assert torch.equal(spread[2], tome[2])
    assert torch.equal(spread[3], tome[3])
    assert torch.equal(spread[0], tome[0]) and torch.equal(spread[1], tome[1])


IDENTITY_CONSTRUCTIONS = [
    ("prune", {}), ("evit", {}), ("tome", {}), ("spread", dict(k=1)),
    ("spread", dict(k=4, alpha=0.5, targets="b")), ("spread", dict(k=2, alpha=1.0)),
]


@pytest.mark.parametrize("method,construction", IDENTITY_CONSTRUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_r0_is_identity(step, method, construction, dtype, mode):
    t = make_tokens(2, 197, dtype=getattr(torch, dtype), duplicates=True, unit_size=True)
    x_out, size_out, dst, weight = step(t, 0, method, 1, mode, **construction)
    assert torch.equal(x_out, t["x"])
    assert torch.equal(size_out, t["size"])
    assert torch.equal(dst[..., 0], torch.arange(197).expand(2, -1))
    assert (weight[..., 0] == 1).all() and (weight[..., 1:] == 0).all()


@pytest.mark.parametrize("method", ["prune", "tome", "spread"])
def test_r0_is_identity_with_sizes(step, method):
    """Non-unit sizes: x * size / size rounds twice: (1 + u)^2 - 1 < 3 u of x."""
    t = make_tokens(2, 197, seed=5)
    x_out, size_out, _, _ = step(t, 0, method, 1)
    assert torch.equal(size_out, t["size"])
    torch.testing.assert_close(x_out, t["x"], rtol=3 * U32, atol=0)


# --- exact ties: all tokens identical (one-hot metric: every cosine is exactly 1, equal scores) --

N_TIE, P_TIE, R_TIE = 17, 1, 4


def _tied_tokens():
    t = make_tokens(2, N_TIE, seed=9, unit_size=True)
    t["metric"] = torch.zeros_like(t["metric"])
    t["metric"][..., 3] = 1
    t["score"] = torch.full_like(t["score"], 1 / N_TIE)
    return t


def _expected_ties(method, construction):
    """dst/weight of slot 0 (and slot 1) with ties to the lower index, from the definitions."""
    N, r = N_TIE, R_TIE
    rows = torch.arange(N)
    if method == "prune":  # the lowest indices stay
        kept = rows < N - r
        return torch.where(kept, rows, 0), kept.float(), None
    if method == "evit":  # the lowest N - r - 1 stay, the rest fuse (equal shares: weight 1)
        kept = rows < N - r - 1
        return torch.where(kept, rows, N - r - 1), torch.ones(N), None
    if construction.get("alpha") == 1.0:  # the highest indices leave, into the first B token (1)
        kept = rows < N - r
        return torch.where(kept, rows, 1), torch.ones(N), None
    # redundancy: the r lowest A tokens (2, 4, 6, 8) leave
    removed = {2, 4, 6, 8}
    own = [0, 1, 0, 2, 0, 3, 0, 4, 0] + list(range(5, 13))  # rows of the kept tokens
    if method == "tome" or construction.get("k") == 1:  # into B token 1 (row 1)
        return torch.tensor([1 if j in removed else own[j] for j in range(N)]), torch.ones(N), None
    # k = 2 over all kept unprotected tokens: tokens 1 and 3 (rows 1, 2), half each
    slot0 = torch.tensor([1 if j in removed else own[j] for j in range(N)])
    w0 = torch.tensor([0.5 if j in removed else 1.0 for j in range(N)])
    slot1 = torch.tensor([2 if j in removed else 0 for j in range(N)])
    return slot0, w0, slot1


@pytest.mark.parametrize("method,construction", [
    ("prune", {}), ("evit", {}), ("tome", {}), ("spread", dict(k=1)),
    ("spread", dict(k=2)), ("spread", dict(k=1, alpha=1.0, targets="b")),
])
def test_ties_go_to_the_lower_index(step, method, construction):
    t = _tied_tokens()
    _, _, dst, weight = step(t, R_TIE, method, P_TIE, **construction)
    slot0, w0, slot1 = _expected_ties(method, construction)
    for b in range(2):
        assert dst[b, :, 0].tolist() == slot0.tolist()
        assert weight[b, :, 0].tolist() == w0.tolist()
        if slot1 is not None:
            assert dst[b, :, 1].tolist() == slot1.tolist()


# B tokens (index i: token 1 + 2 i) sharing the A tokens' direction, per image, placed so that the
# first of them lies in every kind of place the CPU's argmax (8 interleaved lanes, then a tail)
# can hold it: the tail only; lane 7 of two blocks; a lower lane before a higher one; a higher
# lane before a lower one.
TIED_B = [(26, 29), (7, 15, 27), (21, 10), (13, 19)]


def test_the_first_of_tied_best_b_tokens_wins_wherever_it_lies(step):
    """ToMe, N = 61: 30 B tokens, three blocks of lanes and a tail of six; every A token's best B
    tokens (cosine exactly 1, the rest 0) are TIED_B, and each removed one goes to the first."""
    N, r = 61, 4
    t = make_tokens(len(TIED_B), N, seed=5, unit_size=True)
    t["metric"] = torch.zeros_like(t["metric"])
    t["metric"][:, 0::2, 3] = 1  # the class token and the A tokens
    t["metric"][:, 1::2, 5] = 1  # the B tokens, but for the tied ones:
    for image, tied in enumerate(TIED_B):
        t["metric"][image, [1 + 2 * i for i in tied], 3] = 1
        t["metric"][image, [1 + 2 * i for i in tied], 5] = 0
    _, _, dst, _ = step(t, r, "tome")
    removed = [2, 4, 6, 8]  # all A tokens tie at 1: the lowest leave
    for image, tied in enumerate(TIED_B):
        first = 1 + 2 * min(tied)
        row = first - sum(j < first for j in removed)
        assert dst[image, removed, 0].tolist() == [row] * r
