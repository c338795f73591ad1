"""tt.match against tt_kernels.reference.match: T = (dst, weight) of every construction, for every
backend of the `tt` fixture (tests/conftest.py) on the case grid of tests/reference_cases.py."""
import pytest

from conftest import construction_kwargs, make_tokens
from reference_cases import CASES, assert_same_T, inputs, ref_match
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
