"""Gradients of the differentiable ops (apply and transform in x, untransform in y) against torch
autograd through the reference implementation. The ops take no float64, so instead of gradcheck
the analytic gradient is compared in fp32 with a random upstream gradient."""
import pytest
import torch

from conftest import construction_kwargs, make_tokens, r_for, x_tol
from tt_kernels import reference

ops = torch.ops.tt

# (method, construction, r kind, B, N, prefix): pruned rows (no gradient), evit's fused row,
# many-to-many spreading, removed tokens with nowhere to go (alpha = 1, targets "b", r max).
CASES = [
    ("prune", {}, "max", 2, 17, 1),
    ("evit", {}, 1, 3, 197, 1),
    ("tome", {}, "max", 2, 197, 2),
    ("spread", dict(k=1), 1, 1, 17, 0),
    ("spread", dict(k=4, alpha=0.5, targets="b"), "max", 3, 197, 1),
    ("spread", dict(k=2, alpha=1.0, targets="b"), "max", 2, 17, 5),
]
IDS = [f"{m}-{'-'.join(f'{k}{v}' for k, v in c.items())}-r{r}-B{b}-N{n}-P{p}"
       for m, c, r, b, n, p in CASES]


def _setup(method, construction, r_kind, B, N, prefix):
    t = make_tokens(B, N, seed=N + B, duplicates=True)
    kw = construction_kwargs(method, **construction)
    r = r_for(r_kind, method, N, prefix, kw.get("alpha", 0.0))
    dst, weight = reference.match(t["metric"], t["score"], t["size"], r, method, prefix=prefix,
                                  **kw)
    args = dict(r=r, method=method, prefix=prefix, **kw)
    return t, r, dst, weight, args


def _grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(out, x, upstream)
    return g


def _grad_tol(ref_fn, x, upstream):
    """Both gradients are fp32 sums of the same products in other orders: x_tol's bound, with the
    largest |x| replaced by the largest sum of |products|, the gradient taken against |upstream|
    (exact for the linear modes, where every coefficient is non-negative)."""
    magnitude = float(_grad(ref_fn, x, upstream.abs()).abs().max())
    return x_tol(torch.float32, terms=x.shape[1], channels=x.shape[2], magnitude=magnitude)


def _assert_grads_agree(op_fn, ref_fn, x, n_out):
    upstream = torch.randn(x.shape[0], n_out, x.shape[2])
    got = _grad(op_fn, x, upstream)
    want = _grad(ref_fn, x, upstream)
    torch.testing.assert_close(got, want, **_grad_tol(ref_fn, x, upstream))


@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_apply_gradient(case, mode):
    t, r, dst, weight, _ = _setup(*case)
    n_out = t["x"].shape[1] - r
    _assert_grads_agree(lambda x: ops.apply(x, t["size"], dst, weight, n_out, mode),
                        lambda x: reference.apply(x, t["size"], dst, weight, n_out, mode),
                        t["x"], n_out)


@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_transform_gradient(case, mode):
    t, r, _, _, args = _setup(*case)
    _assert_grads_agree(
        lambda x: ops.transform(x, t["size"], t["metric"], t["score"], mode=mode, **args),
        lambda x: reference.transform(x, t["size"], t["metric"], t["score"], mode=mode, **args),
        t["x"], t["x"].shape[1] - r)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_untransform_gradient(case):
    t, r, dst, weight, _ = _setup(*case)
    B, N, C = t["x"].shape
    y = torch.randn(B, N - r, C)
    _assert_grads_agree(lambda v: ops.untransform(v, dst, weight),
                        lambda v: reference.untransform(v, dst, weight), y, N)


def test_gradient_flows_through_successive_steps():
    """Two transform steps then a restore: the ops' chain rule equals the reference's."""
    t = make_tokens(2, 197, seed=11)

    def chain(step, untransform, x):
        x1, s1, d1, w1 = step(x, t["size"], t["metric"], t["score"], 30, "spread", k=2)
        x2, _, d2, w2 = step(x1, s1, t["metric"][:, :167], None, 40, "tome")
        return untransform(untransform(x2.tanh(), d2, w2), d1, w1)

    def reference_chain(x):
        return chain(reference.transform, reference.untransform, x)

    upstream = torch.randn(2, 197, 24)
    got = _grad(lambda x: chain(ops.transform, ops.untransform, x), t["x"], upstream)
    want = _grad(reference_chain, t["x"], upstream)
    torch.testing.assert_close(got, want, **_grad_tol(reference_chain, t["x"], upstream))
