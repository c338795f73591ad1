"""tt.untransform, the column-normalised transpose of T, against tt_kernels.reference.untransform,
for every backend of the `tt` fixture (tests/conftest.py) with the reference's T of each case of
tests/reference_cases.py."""
import pytest
import torch

from conftest import x_tol
from reference_cases import CASES, inputs, ref_match
from tt_kernels import reference


@pytest.mark.parametrize("case", CASES)
def test_untransform(tt, case):
    t, args = inputs(case)
    dst, weight = ref_match(t, args)
    y = torch.randn(case["B"], case["N"] - case["r"], 24).to(case["dtype"])
    got = tt.untransform(y, dst, weight)
    want = reference.untransform(y, dst, weight)
    assert got.dtype == y.dtype and got.shape == (case["B"], case["N"], 24)
    torch.testing.assert_close(got, want, **x_tol(case["dtype"], terms=dst.shape[-1],
                                                  magnitude=float(y.abs().max())))
