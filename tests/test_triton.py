"""The Triton kernels against the reference: on CUDA tensors when a GPU is present, otherwise on
CPU tensors through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch

from conftest import (DTYPES, SIZE_TOL, WEIGHT_TOL, cls_attention_tol, construction_kwargs,
                      make_tokens, non_contiguous, r_for, x_tol)
from tt_kernels import reference
from tt_kernels.triton_kernels import kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (method, k, alpha, targets, B, N, prefix, r kind, dtype): every construction, every r kind and
# dtype, N in {17, 197, 257}, B in {1, 3}, k in {1, 2, 4}; the interpreter makes each case costly.
CASES = [
    ("prune", 1, 0.0, "all", 3, 17, 1, "max", torch.float32),
    ("prune", 1, 0.0, "all", 1, 197, 1, 1, torch.bfloat16),
    ("evit", 1, 0.0, "all", 3, 17, 2, 1, torch.float16),
    ("evit", 1, 0.0, "all", 1, 257, 1, "max", torch.float32),
    ("tome", 1, 0.0, "all", 3, 197, 1, "max", torch.float32),
    ("tome", 1, 0.0, "all", 1, 17, 0, 0, torch.bfloat16),
    ("transform", 1, 0.0, "all", 1, 257, 1, 1, torch.float16),
    ("transform", 2, 0.5, "b", 3, 17, 5, "max", torch.bfloat16),
    ("transform", 4, 0.0, "all", 3, 197, 1, 1, torch.float32),
    ("transform", 4, 1.0, "b", 1, 17, 1, "max", torch.float32),
    ("transform", 2, 0.0, "all", 1, 197, 2, 0, torch.float16),
    ("transform", 4, 0.5, "all", 1, 257, 1, "max", torch.bfloat16),
]


def _inputs(B, N, dtype, contiguous=True):
    t = make_tokens(B, N, dtype=dtype, duplicates=True)
    t = {name: v.to(DEVICE) for name, v in t.items()}
    if not contiguous:
        t = {name: non_contiguous(v) for name, v in t.items()}
    return t


@pytest.mark.parametrize("method,k,alpha,targets,B,N,prefix,r_kind,dtype", CASES)
def test_transform_and_match_equal_reference(method, k, alpha, targets, B, N, prefix, r_kind,
                                             dtype):
    t = _inputs(B, N, dtype, contiguous=(N != 17))
    r = r_for(r_kind, method, N, prefix, alpha)
    kw = construction_kwargs(method, k, alpha, targets)
    args = (t["x"], t["size"], t["metric"], t["score"], r, method)
    want = reference.transform(*args, **kw, prefix=prefix)
    got = kernel("transform")(*args, **kw, prefix=prefix)
    assert torch.equal(got[2], want[2]), "dst differs"
    torch.testing.assert_close(got[3], want[3], **WEIGHT_TOL)
    # x and sizes: the reference's apply of the T the kernel returned (T is checked above)
    want_x, want_size = reference.apply(t["x"], t["size"], got[2], got[3], N - r)
    torch.testing.assert_close(got[0], want_x, **x_tol(dtype))
    torch.testing.assert_close(got[1], want_size, **SIZE_TOL)
    dst, weight = kernel("match")(t["metric"], t["score"], t["size"], r, method, **kw,
                                  prefix=prefix)
    assert torch.equal(dst, want[2])
    torch.testing.assert_close(weight, want[3], **WEIGHT_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
@pytest.mark.parametrize("B,N,r,k", [(1, 17, 0, 1), (1, 197, 16, 4), (0, 17, 1, 2)])
def test_apply_and_untransform_equal_reference(dtype, mode, B, N, r, k):
    t = _inputs(B, N, dtype, contiguous=False)
    dst, weight = reference.match(t["metric"], None, None, r, "transform", k=k)
    got, got_size = kernel("apply")(t["x"], t["size"], dst, weight, N - r, mode)
    want, want_size = reference.apply(t["x"], t["size"], dst, weight, N - r, mode)
    torch.testing.assert_close(got, want, **x_tol(dtype))
    torch.testing.assert_close(got_size, want_size, **SIZE_TOL)
    y = non_contiguous(want)
    torch.testing.assert_close(kernel("untransform")(y, dst, weight),
                               reference.untransform(y, dst, weight), **x_tol(dtype))


@pytest.mark.parametrize("k,alpha,targets,dtype", [(1, 0.0, "all", torch.float32),
                                                   (2, 0.5, "b", torch.bfloat16)])
def test_ward_cost_and_norm_mode_equal_reference(k, alpha, targets, dtype):
    """The default Token Transforming step of tt_kernels.patch: Ward's cost, norm-keeping merge."""
    t = _inputs(1, 197, dtype)
    kw = dict(k=k, alpha=alpha, targets=targets, cost="ward", mode="norm", prefix=1)
    args = (t["x"], t["size"], t["metric"], t["score"], 40, "transform")
    want = reference.transform(*args, **kw)
    got = kernel("transform")(*args, **kw)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[3], want[3], **WEIGHT_TOL)
    torch.testing.assert_close(got[0], want[0], **x_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_size", [True, False])
def test_cls_attention_equals_reference(dtype, with_size):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 37, 24, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    size = (torch.rand(2, 37, generator=g) * 3 + 1).to(DEVICE) if with_size else None
    torch.testing.assert_close(kernel("cls_attention")(non_contiguous(q), k, size),
                               reference.cls_attention(q, k, size), **cls_attention_tol(q, k))


@pytest.mark.parametrize("method", ["tome", "prune", "evit"])
def test_alpha_is_ignored_outside_transform(method):
    """alpha only steers transform: other constructions give the same T with any alpha."""
    t = _inputs(1, 37, torch.float32)
    want = reference.match(t["metric"], t["score"], t["size"], 4, method)
    for alpha in (0.5, 1.0):
        dst, weight = kernel("match")(t["metric"], t["score"], t["size"], 4, method, alpha=alpha)
        assert torch.equal(dst, want[0])
        torch.testing.assert_close(weight, want[1], **WEIGHT_TOL)


def test_bad_input_is_rejected_by_name():
    t = _inputs(1, 17, torch.float32)
    with pytest.raises(ValueError, match="`r`"):
        kernel("transform")(t["x"], t["size"], t["metric"], None, 9, "tome")
    with pytest.raises(RuntimeError, match="`dst`"):
        kernel("apply")(t["x"], t["size"], torch.zeros(1, 16, 1, dtype=torch.long),
                        torch.ones(1, 16, 1), 17)
