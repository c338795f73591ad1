"""The Python API (tt_kernels.transform, match, apply, untransform, restore, cls_attention): the
reference and the C++ backend agree, restore walks back through several steps, build_info."""
import pytest
import torch

import tt_kernels
from conftest import SIZE_TOL, WEIGHT_TOL, apply_magnitude, cls_attention_tol, sum_tol, x_tol
from tt_kernels import reference
from tt_kernels.measure import vit_tokens

# (method, keywords of the API): every source of removal, k and targets
CONSTRUCTIONS = [
    ("prune", {}), ("evit", {}), ("tome", {}),
    ("spread", dict(k=1)),
    ("spread", dict(k=2, source="mix", targets="b")),
    ("spread", dict(k=4, source="importance", tau=0.5)),
    ("spread", dict(k=2, source="mix", alpha=0.25)),
]
IDS = [m + "".join(f"-{k}{v}" for k, v in kw.items()) for m, kw in CONSTRUCTIONS]


def _tokens(dtype=torch.float32, B=3, N=197, seed=0):
    return vit_tokens(B, N, dtype=dtype, seed=seed, duplicates=True)


def _assert_same_T(got, want):
    assert got.n_out == want.n_out and got.n_in == want.n_in
    assert torch.equal(got.dst, want.dst)
    torch.testing.assert_close(got.weight, want.weight, **WEIGHT_TOL)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method,kw", CONSTRUCTIONS, ids=IDS)
def test_transform_and_match_backends_agree(method, kw, dtype):
    dtype = getattr(torch, dtype)
    t = _tokens(dtype)
    r, prefix = 40, 1
    results = {}
    for backend in ("reference", "cpu"):
        results[backend] = tt_kernels.transform(
            t["x"], t["metric"], r, size=t["size"], score=t["score"], method=method,
            prefix=prefix, backend=backend, **kw)
        T = tt_kernels.match(t["metric"], r, score=t["score"], size=t["size"], method=method,
                             prefix=prefix, backend=backend, **kw)
        _assert_same_T(T, results[backend][2])
    (x_ref, s_ref, T_ref), (x_cpu, s_cpu, T_cpu) = results["reference"], results["cpu"]
    assert x_cpu.shape == (3, 157, 24) and x_cpu.dtype == dtype
    _assert_same_T(T_cpu, T_ref)
    # x and sizes: the reference's apply of the T the C++ backend returned (T is checked above)
    x_want, s_want = reference.apply(t["x"], t["size"], T_cpu.dst, T_cpu.weight, T_cpu.n_out,
                                     "mean")
    torch.testing.assert_close(s_cpu, s_want, **SIZE_TOL)
    torch.testing.assert_close(x_cpu, x_want, **x_tol(dtype))


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_untransform_restore_backends_agree(dtype, mode):
    dtype = getattr(torch, dtype)
    t = _tokens(dtype, seed=1)
    T = tt_kernels.match(t["metric"], 50, score=t["score"], k=4, source="mix")
    out = {b: tt_kernels.apply(t["x"], T, t["size"], mode, backend=b) for b in ("reference", "cpu")}
    torch.testing.assert_close(out["cpu"][0], out["reference"][0],
                               **x_tol(dtype, magnitude=apply_magnitude(t["x"], t["size"], T.dst, T.weight)))
    torch.testing.assert_close(out["cpu"][1], out["reference"][1], **SIZE_TOL)
    y = out["cpu"][0]
    back = {b: tt_kernels.untransform(y, T, backend=b) for b in ("reference", "cpu")}
    y_tol = x_tol(dtype, terms=T.dst.shape[-1], magnitude=float(y.abs().max()))
    torch.testing.assert_close(back["cpu"], back["reference"], **y_tol)
    restored = {b: tt_kernels.restore(y, [T], backend=b) for b in ("reference", "cpu")}
    assert torch.equal(restored["cpu"], back["cpu"])
    torch.testing.assert_close(restored["cpu"], restored["reference"], **y_tol)


@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cls_attention_backends_agree(dtype, with_size):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 197, 64, generator=g).to(getattr(torch, dtype))
    k = torch.randn(3, 6, 197, 64, generator=g).to(getattr(torch, dtype))
    size = torch.randint(1, 4, (3, 197), generator=g).float() if with_size else None
    got = tt_kernels.cls_attention(q, k, size, backend="cpu")
    want = tt_kernels.cls_attention(q, k, size, backend="reference")
    torch.testing.assert_close(got, want, **cls_attention_tol(q, k))
    torch.testing.assert_close(got.sum(1), torch.ones(3), **sum_tol(197))  # probabilities


def test_default_backend_on_cpu_is_the_cpp_one():
    t = _tokens()
    default = tt_kernels.transform(t["x"], t["metric"], 30, size=t["size"])
    cpu = tt_kernels.transform(t["x"], t["metric"], 30, size=t["size"], backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(default[:2], cpu[:2]))
    assert torch.equal(default[2].dst, cpu[2].dst) and torch.equal(default[2].weight, cpu[2].weight)


def test_transform_is_match_then_apply():
    t = _tokens(seed=2)
    kw = dict(score=t["score"], size=t["size"], method="spread", k=2, source="mix")
    x_out, size_out, T = tt_kernels.transform(t["x"], t["metric"], 60, **kw)
    T2 = tt_kernels.match(t["metric"], 60, **kw)
    _assert_same_T(T2, T)
    x2, s2 = tt_kernels.apply(t["x"], T2, t["size"])
    assert torch.equal(x2, x_out) and torch.equal(s2, size_out)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_restore_through_three_steps(backend):
    """Three reductions with different constructions; restore brings y back to the N0 tokens."""
    t = _tokens(B=2, N=197, seed=4)
    x, size, steps = t["x"], t["size"], []
    for r, method, kw in [(40, "tome", {}), (30, "spread", dict(k=2)),
                          (20, "spread", dict(k=4, source="mix"))]:
        metric = x[..., :16] + 0.1 * t["metric"][:, : x.shape[1]]
        score = t["score"][:, : x.shape[1]]
        x, size, T = tt_kernels.transform(x, metric, r, size=size, score=score, method=method,
                                          backend=backend, **kw)
        steps.append(T)
    assert x.shape == (2, 197 - 90, 24)
    full = tt_kernels.restore(x, steps, backend=backend)
    assert full.shape == (2, 197, 24)
    # Restoring step by step, newest first, is the same.
    y = x
    for T in reversed(steps):
        y = tt_kernels.untransform(y, T, backend=backend)
    assert torch.equal(y, full)
    # The class token (never merged, never a target) comes back unchanged.
    assert torch.equal(full[:, 0], t["x"][:, 0])
    # Conserved sizes: the total stays the same through the three steps.
    torch.testing.assert_close(size.sum(1), t["size"].sum(1), **SIZE_TOL)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method,kw", CONSTRUCTIONS, ids=IDS)
def test_restore_returns_kept_tokens_exactly(method, kw, backend):
    """A kept token that nothing merged into comes back exactly (default unit sizes)."""
    t = _tokens(seed=5)
    x_out, _, T = tt_kernels.transform(t["x"], t["metric"], 40, score=t["score"], method=method,
                                       backend=backend, **kw)
    back = tt_kernels.restore(x_out, [T], backend=backend)
    pure = (T.weight[..., 0] == 1) & (T.weight[..., 1:] == 0).all(-1)
    # rows that receive exactly one input (with positive weight)
    received = torch.zeros(3, T.n_out).scatter_add_(
        1, T.dst.flatten(1), (T.weight > 0).float().flatten(1))
    alone = pure & (received.gather(1, T.dst[..., 0]) == 1)
    assert alone[:, 0].all() and alone.sum() >= 3 * 50  # the class token and many others
    assert torch.equal(back[alone], t["x"][alone])


def test_transform_dataclass():
    t = _tokens()
    T = tt_kernels.match(t["metric"], 12, k=2)
    assert isinstance(T, tt_kernels.SparseT)
    assert (T.n_in, T.n_out) == (197, 185)
    assert T.dst.shape == T.weight.shape == (3, 197, 2)


def test_build_info_lists_the_cpu_ops():
    info = tt_kernels.build_info()
    assert set(info["cpu_ops"]) == {"match", "apply", "untransform", "transform", "cls_attention"}
    assert set(info["default_backend"]["cpu"].values()) == {"cpu"}
    assert info["torch"] == torch.__version__


# The Triton kernels run on CUDA tensors, and on CPU tensors interpreted (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(tt_kernels.backends.triton_kernels.triton_version() is None,
                    reason="needs Triton")
@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
def test_triton_backend_has_the_gradients_of_the_ops(mode):
    """backend="triton" is differentiable where torch.ops.tt is, with the ops' own formulas: with
    k = 1 (weights exactly 0 or 1) and integer sizes, T and every gradient equal the op's."""
    t = vit_tokens(2, 33, seed=6, duplicates=True)
    t = {name: v.to(TRITON_DEVICE) for name, v in t.items()}
    g = torch.Generator().manual_seed(7)
    up, up_full, y = (torch.randn(2, n, 24, generator=g).to(TRITON_DEVICE) for n in (25, 33, 25))
    ops = torch.ops.tt
    construction = (8, "spread", 1, 0.1, 0.0, "all", 1)  # r, method, k, tau, alpha, ..., prefix

    def grad(fn, leaf, upstream):
        leaf = leaf.detach().clone().requires_grad_()
        out = fn(leaf)
        assert out.requires_grad
        return torch.autograd.grad(out, leaf, upstream)[0]

    def triton_step(x):
        return tt_kernels.transform(x, t["metric"], 8, size=t["size"], mode=mode,
                                    backend="triton")

    _, _, T = triton_step(t["x"])
    want_dst, want_weight = ops.match(t["metric"], None, t["size"], *construction, "cosine")
    assert torch.equal(T.dst, want_dst) and torch.equal(T.weight, want_weight)
    assert torch.equal(grad(lambda x: triton_step(x)[0], t["x"], up), grad(
        lambda x: ops.transform(x, t["size"], t["metric"], None, *construction, mode, "cosine")[0],
        t["x"], up))
    assert torch.equal(
        grad(lambda x: tt_kernels.apply(x, T, t["size"], mode, backend="triton")[0], t["x"], up),
        grad(lambda x: ops.apply(x, t["size"], T.dst, T.weight, 25, mode)[0], t["x"], up))
    assert torch.equal(grad(lambda y: tt_kernels.untransform(y, T, backend="triton"), y, up_full),
                       grad(lambda y: ops.untransform(y, T.dst, T.weight), y, up_full))
