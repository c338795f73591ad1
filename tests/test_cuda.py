"""The CUDA kernels against the reference, on a GPU (skipped without one)."""
import pytest
import torch

import tt_kernels
from tt_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,r,k", [(1, 17, 0, 1), (3, 197, 16, 4), (2, 257, 128, 2)])
@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
def test_apply_and_untransform_match_reference(dtype, B, N, r, k, mode):
    torch.manual_seed(0)
    x = torch.randn(B, N, 96, dtype=dtype)
    metric = torch.randn(B, N, 64)
    size = torch.rand(B, N) + 0.5
    T = tt_kernels.match(metric, r, size=size, k=k, backend="reference")
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    cuda = [t.cuda() for t in (x, size, T.dst, T.weight)]
    got, got_size = torch.ops.tt.apply(*cuda, T.n_out, mode)
    want, want_size = reference.apply(x, size, T.dst, T.weight, T.n_out, mode)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_size.cpu(), want_size)
    back = torch.ops.tt.untransform(got, cuda[2], cuda[3])
    torch.testing.assert_close(back.cpu(), reference.untransform(want, T.dst, T.weight), **tol)
