"""tt.match against tt_kernels.reference.match: T = (dst, weight) of every construction, for every
backend of the `tt` fixture (tests/conftest.py) on the case grid of tests/reference_cases.py."""
import pytest
import torch

from conftest import DTYPES, construction_kwargs, make_tokens
from reference_cases import CASES, assert_same_T, assert_step, inputs, ref_match
from tt_kernels import reference, verify


@pytest.mark.parametrize("case", CASES)
def test_match(tt, case):
    t, args = inputs(case)
    got = tt.match(t["metric"], t["score"], t["size"], **args)
    assert_same_T(got, ref_match(t, args))


@pytest.mark.interpreted
@pytest.mark.parametrize("D", [5, 13, 27])
@pytest.mark.parametrize("method,cost", [("tome", "cosine"), ("spread", "ward")])
def test_metric_widths_off_every_vector_width(tt, D, method, cost):
    """The case grid's metric is 16 channels wide, while the kernels read channels in groups (the
    CPU's 8 partial sums of squares, CUDA's 16-byte packs, Triton's power-of-two blocks) and
    finish the rest by a tail or a mask, which only widths off every group size run through.
    Seeds clear of near ties: dst must be the reference's."""
    args = dict(r=9, method=method, cost=cost, prefix=1)
    seed = D
    while True:
        t = make_tokens(2, 37, D=D, seed=seed)
        if not verify.near_ties(t["metric"], t["score"], t["size"], **args).any():
            break
        seed += 100
    got = tt.match(t["metric"], t["score"], t["size"], **args)
    assert_same_T(got, ref_match(t, args))


def per_head_keys(B, N, H, D, dtype, seed):
    """make_tokens' keys [B, H, N, D] laid out as a ViT's attention holds them: a strided view of
    [B, N, H, D], each token's heads side by side."""
    k = make_tokens(B, N, dtype=dtype, seed=seed, heads=H, head_dim=D)["k"]
    return k.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,k,cost", [("tome", 1, "cosine"), ("spread", 2, "ward")])
def test_per_head_metric_is_compared_by_its_head_sum(tt, dtype, method, k, cost):
    """A metric [B, H, N, D] is compared by its sum over heads: the reference's T is its T of the
    sum (exact, float64), and the kernels', whose fp32 sum verify.head_sum_error bounds, is the
    reference's (seeds clear of near ties: dst exactly), in tt.match and tt.transform."""
    args = dict(r=9, method=method, prefix=1, **construction_kwargs(method, k=k, cost=cost))
    size = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) * 2 + 1
    seed = 0
    while verify.near_ties(keys := per_head_keys(2, 37, 3, 16, dtype, seed), None, size,
                           **args).any():
        seed += 1
    assert keys.dim() == 4 and not keys.is_contiguous()
    want = reference.match(keys, None, size, **args)
    assert_same_T(want, reference.match(keys.double().sum(1), None, size, **args))
    assert_same_T(tt.match(keys, None, size, **args), want)
    x = make_tokens(2, 37, dtype=dtype)["x"]
    assert_step(tt.transform(x, size, keys, None, **args), x, size, keys, None, args)


@pytest.mark.interpreted
@pytest.mark.parametrize("method,alpha", [("prune", 0.0), ("spread", 1.0)])
def test_remove_every_token_is_rejected(tt, method, alpha):
    """prefix 0 and r = N would leave T without an output row: at least one token remains."""
    t = make_tokens(2, 17)
    args = dict(r=17, method=method, prefix=0, **construction_kwargs(method, alpha=alpha))
    with pytest.raises(ValueError, match="`r`"):
        tt.match(t["metric"], t["score"], t["size"], **args)
    args["r"] = 16
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    want = reference.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    assert_same_T(got[2:], want[2:])
    assert got[0].shape == want[0].shape == (2, 1, 24)


@pytest.mark.interpreted
@pytest.mark.parametrize("tt", ["triton"], indirect=True)
@pytest.mark.parametrize("method", ["tome", "prune", "evit"])
def test_alpha_is_ignored_outside_transform(tt, method):
    """alpha only steers transform: other constructions give the same T with any alpha."""
    t = make_tokens(1, 37, duplicates=True)
    want = reference.match(t["metric"], t["score"], t["size"], 4, method)
    for alpha in (0.5, 1.0):
        got = tt.match(t["metric"], t["score"], t["size"], 4, method, alpha=alpha)
        assert_same_T(got, want)


def _twin_tokens():
    """3 images of 197 tokens, 384 channels (a model's queries: the GEMMs' full paths), prefix 1.
    Twins (equal metric rows) that are removed tokens' best targets, across ToMe's sets (A: even
    tokens, B: odd) and within them: 40 (A) = 41 (B) near token 60; 71 (B) = 194 (A, in the
    GEMMs' last column tile, which MKL's AVX2 path rounds differently) near 90; 33 = 35 (B) near
    100; 44 = 46 (A) near 120. And A twins 140 = 142 that a step by redundancy mixed with
    unimportance (alpha 0.5) ranks fifth: scores 0 for 60, 90, 100, 120, 0.2 for the twins, else
    1; 120 and the twins lean towards B tokens 85 and 77. Those tokens have size 1, the others 2
    to 4 (under Ward's cost larger groups merge last: the choices stay the cosine's)."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 197, 384, generator=g)
    size = torch.randint(2, 5, (3, 197), generator=g).float()
    size[:, [33, 35, 40, 41, 44, 46, 60, 71, 77, 85, 90, 100, 120, 140, 142, 194]] = 1.0
    score = torch.ones(3, 197)

    def near(token, scale):
        return metric[:, token] + scale * torch.randn(3, 384, generator=g)

    for first, twin, token in ((40, 41, 60), (71, 194, 90), (33, 35, 100), (44, 46, 120)):
        metric[:, twin] = metric[:, first]
        metric[:, token], score[:, token] = near(first, 0.5), 0.0
    metric[:, 120] += 0.5 * metric[:, 85]
    metric[:, 140] = metric[:, 142] = near(77, 3.0)
    score[:, [140, 142]] = 0.2
    return metric, score, size


# The Triton backend interprets each of the four constructions once (a few seconds each), two of
# them under each cost.
@pytest.mark.parametrize("method,k,targets,cost", [
    pytest.param("tome", 1, "all", "cosine", marks=pytest.mark.interpreted),
    pytest.param("spread", 1, "all", "cosine", marks=pytest.mark.interpreted),
    ("spread", 1, "all", "ward"),
    ("spread", 2, "all", "cosine"),
    pytest.param("spread", 2, "all", "ward", marks=pytest.mark.interpreted),
    ("spread", 1, "b", "cosine"),
    pytest.param("spread", 1, "b", "ward", marks=pytest.mark.interpreted)])
def test_twins_tie_to_the_lower_index(tt, method, k, targets, cost):
    """Twins have equal affinities with every token: an exact tie, which goes to the lower index.
    A GEMM may round equal columns differently by their position (MKL's AVX2 kernels do), and two
    GEMMs of different shapes round differently, so a kernel must give twins equal values. T must
    be the reference's, whose choices show that every tie was met (a kept token's slot 0 holds its
    own output row)."""
    metric, score, size = _twin_tokens()
    args = dict(r=5, method=method, k=k, targets=targets, prefix=1, cost=cost,
                alpha=0.5 if method == "spread" else 0.0)
    assert not verify.near_ties(metric, score, size, **args).any()
    want = reference.match(metric, score, size, **args)
    assert_same_T(tt.match(metric, score, size, **args), want)
    dst = want[0]
    ties = {60: (40, 41), 90: (71, 194), 100: (33, 35), 120: (44, 46)}
    if method == "tome" or targets == "b":
        ties = {60: (41,), 90: (71,), 100: (33, 35)}
    for token, targets_met in ties.items():
        for slot, target in enumerate(targets_met[:k]):
            assert torch.equal(dst[:, token, slot], dst[:, target, 0])
    if method == "spread":  # the A twins tie at the fifth removal: 140 leaves, 142 stays
        assert torch.equal(dst[:, 142, 0], dst[:, 141, 0] + 1)
