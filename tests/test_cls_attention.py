"""tt.cls_attention, the class token's attention as importance score, against
tt_kernels.reference.cls_attention, for every backend of the `tt` fixture (tests/conftest.py)."""
import pytest
import torch

from conftest import cls_attention_tol
from tt_kernels import reference


@pytest.mark.interpreted
@pytest.mark.parametrize("with_size,scale", [(False, None), (True, None), (True, 0.3)])
@pytest.mark.parametrize("dtype,B,N", [(torch.float32, 1, 17), (torch.float16, 3, 197),
                                       (torch.bfloat16, 3, 257)])
def test_cls_attention(tt, dtype, B, N, with_size, scale):
    g = torch.Generator().manual_seed(N)
    q = torch.randn(B, 3, N, 32, generator=g).to(dtype)
    k = torch.randn(B, 3, N, 32, generator=g).to(dtype)
    size = torch.randint(1, 6, (B, N), generator=g).float() if with_size else None
    got = tt.cls_attention(q, k, size, scale)
    want = reference.cls_attention(q, k, size, scale)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    torch.testing.assert_close(got, want, **cls_attention_tol(q, k, scale))
