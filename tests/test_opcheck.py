"""torch.library.opcheck for every op on CPU (schema, fake kernel, autograd registration, AOT
dispatch with dynamic shapes), and torch.compile(fullgraph=True) through transform + untransform."""
import pytest
import torch

from conftest import make_tokens, x_tol

ops = torch.ops.tt
B, N, R = 2, 17, 4


def _calls(dtype):
    """name -> (op, args, kwargs); x and y require grad where the op is differentiable."""
    t = make_tokens(B, N, dtype=dtype, duplicates=True)
    x = t["x"].requires_grad_()
    dst, weight = ops.match(t["metric"], t["score"], t["size"], R, "spread", k=2)
    y = torch.randn(B, N - R, 24, dtype=dtype, requires_grad=True)
    q = torch.randn(B, 3, N, 8, dtype=dtype)
    k = torch.randn(B, 3, N, 8, dtype=dtype)
    m, s, size = t["metric"], t["score"], t["size"]
    per_head = torch.randn(B, N, 3, 3, 8, dtype=dtype)[:, :, 1].transpose(1, 2)  # keys in qkv
    return {
        "match_transform": (ops.match, (m, s, size),
                            dict(r=R, method="spread", k=2, alpha=0.5, targets="b")),
        "match_prune_score_only": (ops.match, (None, s), dict(r=R, method="prune")),
        "match_evit": (ops.match, (m, s, size), dict(r=R, method="evit")),
        "match_tome": (ops.match, (m,), dict(r=R, method="tome")),
        "match_tome_per_head": (ops.match, (per_head,), dict(r=R, method="tome")),
        "apply_mean": (ops.apply, (x, size, dst, weight, N - R), {}),
        "apply_sum": (ops.apply, (x, size, dst, weight, N - R, "sum"), {}),
        "apply_norm": (ops.apply, (x, size, dst, weight, N - R, "norm"), {}),
        "untransform": (ops.untransform, (y, dst, weight), {}),
        "transform": (ops.transform, (x, size, m, s),
                      dict(r=R, method="spread", k=4, alpha=0.5)),
        "transform_tome_sum": (ops.transform, (x, size, m), dict(r=R, method="tome", mode="sum")),
        "transform_ward_norm": (ops.transform, (x, size, m),
                                dict(r=R, method="spread", mode="norm", cost="ward")),
        "transform_per_head_ward": (ops.transform, (x, size, per_head),
                                    dict(r=R, method="spread", k=2, cost="ward")),
        "transform_prune": (ops.transform, (x, size, m, s), dict(r=R, method="prune")),
        "cls_attention": (ops.cls_attention, (q, k, size), {}),
        "cls_attention_scale": (ops.cls_attention, (q, k), dict(scale=0.25)),
    }


CALLS = list(_calls(torch.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CALLS)
def test_opcheck(name, dtype):
    op, args, kwargs = _calls(getattr(torch, dtype))[name]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_input_gradient_has_input_dtype(dtype):
    calls = _calls(getattr(torch, dtype))
    for name in ("apply_mean", "apply_sum", "apply_norm", "untransform", "transform",
                 "transform_ward_norm"):
        op, args, kwargs = calls[name]
        out = op(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(out.float().sum(), args[0])
        assert grad.dtype == args[0].dtype and grad.shape == args[0].shape, name


def _reduce_then_restore(x, size, metric, score):
    x_out, size_out, dst, weight = ops.transform(x, size, metric, score, 16, "spread", 2, 0.1,
                                                 0.5, "all", 1, "mean")
    return ops.untransform(torch.tanh(x_out) * size_out[..., None], dst, weight), size_out


def test_compile_fullgraph_matches_eager():
    t = make_tokens(2, 197, duplicates=True)
    compiled = torch.compile(_reduce_then_restore, fullgraph=True)
    args = (t["x"], t["size"], t["metric"], t["score"])
    got, want = compiled(*args), _reduce_then_restore(*args)
    assert got[0].shape == (2, 197, 24) and got[1].shape == (2, 181)
    # The same kernels run; only the fused tanh and product may round once more (u each) before
    # untransform mixes k = 2 rows of them.
    magnitude = float(want[1].max())
    torch.testing.assert_close(got[0], want[0], **x_tol(torch.float32, terms=2, channels=0,
                                                        magnitude=magnitude))
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
