"""tt.apply, X' = T X, against tt_kernels.reference.apply in every mode, for every backend of the
`tt` fixture (tests/conftest.py) with the reference's T of each case of tests/reference_cases.py."""
import pytest
import torch

from conftest import SIZE_TOL, apply_magnitude, x_tol
from reference_cases import CASES, inputs, ref_match
from tt_kernels import reference


def _in_every_mode(cases):
    """(case, mode) for every mode; the interpreter runs only each case's own mode."""
    return [pytest.param(p.values[0], mode, id=f"{p.id}-{mode}",
                         marks=p.marks if mode == p.values[0]["mode"] else [])
            for mode in ("mean", "sum", "norm") for p in cases]


@pytest.mark.parametrize("case,mode", _in_every_mode(CASES))
def test_apply(tt, case, mode):
    t, args = inputs(case)
    dst, weight = ref_match(t, args)
    n_out = case["N"] - case["r"]
    x_out, size_out = tt.apply(t["x"], t["size"], dst, weight, n_out, mode)
    want_x, want_size = reference.apply(t["x"], t["size"], dst, weight, n_out, mode)
    assert x_out.dtype == t["x"].dtype and size_out.dtype == torch.float32
    torch.testing.assert_close(size_out, want_size, **SIZE_TOL)
    magnitude = apply_magnitude(t["x"], t["size"], dst, weight)
    torch.testing.assert_close(x_out, want_x, **x_tol(case["dtype"], magnitude=magnitude))
