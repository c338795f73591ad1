"""torch.ops.tt.* against tt_kernels.reference on the same inputs, for every compiled backend.

dst must agree exactly, weights to fp32 rounding, x outputs to one unit in the last place of x's
dtype. The grid is a covering design, not a cartesian product: every construction meets every r
kind (0, 1, max) and every dtype, and the geometries (B, N, prefix, duplicate tokens) rotate through
the cases.

Backends (the `tt` fixture), all called on the same CPU inputs:
  cpu                 the C++ CPU kernels
  cuda                the CUDA kernels, on a GPU (skipped without one)
  cuda-on-host[-...]  the CUDA kernels' per-image code (csrc/cuda/*_image.cuh) run on the CPU by
                      tests/cuda_on_host, under each plan a launch may choose: affinity rows per
                      chunk (and output rows per block of apply/untransform), metric staged in
                      shared memory or read in place, 16-byte packs or element by element; and
                      either serially or by a block of 64 host threads with CUDA's semantics.
"""
import functools
from types import SimpleNamespace

import pytest
import torch

from conftest import (DTYPES, SIZE_TOL, WEIGHT_TOL, apply_magnitude, cls_attention_tol,
                      construction_kwargs, cuda_kernels_on_host, host_ops, make_tokens,
                      non_contiguous, r_for, sum_tol, x_tol)
from tt_kernels import reference, verify

ops = torch.ops.tt

# (rows per chunk or block, metric staged, 16-byte packs, threads: 0 serial, else a block of host
# threads with 32-lane warps, removal keys from that many blocks an image first: 0 none) of each
# host run of the CUDA code.
HOST_PLANS = {"cuda-on-host": (32, True, True, 0, 0), "cuda-on-host-rows3": (3, False, False, 0, 0),
              "cuda-on-host-rows1": (1, True, True, 0, 0),
              "cuda-on-host-threads": (8, True, True, 64, 0),
              "cuda-on-host-keys3": (8, True, True, 64, 3)}
ALL = ["cpu", "cuda", *HOST_PLANS]


def _to_cuda(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def _on_cuda(fn):
    """fn on CUDA copies of its tensor arguments, with its outputs back on the CPU."""
    def run(*args, **kwargs):
        out = fn(*map(_to_cuda, args), **{k: _to_cuda(v) for k, v in kwargs.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return run


@pytest.fixture(params=ALL)
def tt(request):
    """The backend under test, with torch.ops.tt's signatures."""
    if request.param == "cpu":
        return ops
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return SimpleNamespace(**{op: _on_cuda(getattr(ops, op)) for op in
                                  ("match", "apply", "untransform", "transform", "cls_attention")})
    return host_ops(*HOST_PLANS[request.param])


# (method, k, alpha, targets); the transform rows cover every pair of k x alpha, k x targets and
# alpha x targets.
CONSTRUCTIONS = [
    ("prune", 1, 0.0, "all"),
    ("evit", 1, 0.0, "all"),
    ("tome", 1, 0.0, "all"),
    ("transform", 1, 0.0, "all"),
    ("transform", 1, 0.5, "b"),
    ("transform", 1, 1.0, "all"),
    ("transform", 2, 0.0, "b"),
    ("transform", 2, 0.5, "all"),
    ("transform", 2, 1.0, "b"),
    ("transform", 4, 0.0, "all"),
    ("transform", 4, 0.5, "b"),
    ("transform", 4, 1.0, "all"),
]
R_KINDS = [0, 1, "max"]
# (B, N, prefix, duplicates): N never a power of two.
GEOMETRIES = [
    (1, 17, 0, True),
    (3, 197, 1, False),
    (3, 257, 2, True),
    (1, 197, 5, False),
    (3, 17, 1, True),
    (1, 257, 1, True),
    (3, 17, 5, False),
]


def _inputs(case):
    t = make_tokens(case["B"], case["N"], dtype=case["dtype"], seed=case["seed"],
                    duplicates=case["duplicates"])
    kw = construction_kwargs(case["method"], case["k"], case["alpha"], case["targets"],
                             cost=case["cost"])
    return t, dict(r=case["r"], method=case["method"], prefix=case["prefix"], **kw)


def _clear_of_near_ties(case):
    """Whether no choice in the case's inputs compares affinities closer than twice their fp32
    error bound (tt_kernels.verify.near_ties): then every fp32 kernel, on every CPU and BLAS path,
    must make the float64 reference's choices, and dst's exact agreement is a property of the
    kernels, not of the machine."""
    t, args = _inputs(case)
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", cost="cosine"), **args}
    return not bool(verify.near_ties(t["metric"], t["score"], t["size"], a["r"], a["method"],
                                     a["k"], a["tau"], a["alpha"], a["targets"], a["prefix"],
                                     a["cost"]).any())


def _cases():
    cases = []
    for c, (method, k, alpha, targets) in enumerate(CONSTRUCTIONS):
        for i, r_kind in enumerate(R_KINDS):
            n = len(cases)
            dtype = DTYPES[(c + i) % len(DTYPES)]
            B, N, prefix, dup = GEOMETRIES[n % len(GEOMETRIES)]
            r = r_for(r_kind, method, N, prefix, alpha)
            r = min(r, N - 1)  # N' = 0 (prefix 0, everything pruned) has its own test below
            mode = ("mean", "sum", "norm")[n % 3]
            cost = ("cosine", "ward")[(n // 3) % 2] if method == "transform" else "cosine"
            case = dict(method=method, k=k, alpha=alpha, targets=targets, r=r, dtype=dtype, B=B,
                        N=N, prefix=prefix, duplicates=dup, mode=mode, cost=cost, seed=n)
            while not _clear_of_near_ties(case):  # other random tokens, a seed no case uses
                case["seed"] += len(CONSTRUCTIONS) * len(R_KINDS)
            name = (f"{method}" + (f"-k{k}-a{alpha}-{targets}-{cost}" if method == "transform"
                                   else "")
                    + f"-{mode}"
                    + f"-r{r}-{str(dtype)[6:]}-B{B}-N{N}-P{prefix}" + ("-dup" if dup else ""))
            cases.append(pytest.param(case, id=name))
    return cases


CASES = _cases()


def _ref_match(t, args):
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", prefix=1, cost="cosine"), **args}
    return reference.match(t["metric"], t["score"], t["size"], a["r"], a["method"], a["k"],
                           a["tau"], a["alpha"], a["targets"], a["prefix"], a["cost"])


def _assert_same_T(got, want, tol=WEIGHT_TOL):
    (dst, weight), (want_dst, want_weight) = got, want
    assert dst.dtype == torch.int64 and weight.dtype == torch.float32
    assert dst.shape == want_dst.shape and weight.shape == want_weight.shape
    assert torch.equal(dst, want_dst)
    torch.testing.assert_close(weight, want_weight, **tol)


def _assert_step(got, x, size, metric, score, args, mode="mean"):
    """tt.transform's (x_out, size_out, dst, weight): T is the reference's by tt_kernels.verify's
    rule (dst exactly, but for rows where the float64 reference meets a near tie that fp32 may
    round either way, on any CPU or GPU; weights within their bound), and x_out, size_out are the
    reference's apply of the T returned, so that their tolerance is the apply's own rounding, not
    T's."""
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", prefix=1, cost="cosine"), **args}
    ok, details = verify.check_T(got[2], got[3], metric, score, size, a["r"], a["method"], a["k"],
                                 a["tau"], a["alpha"], a["targets"], a["prefix"], a["cost"])
    assert ok, details
    N, C = x.shape[1:]
    want_x, want_size = reference.apply(x, size, got[2], got[3], N - args["r"], mode)
    assert got[0].dtype == x.dtype and got[0].shape == want_x.shape
    torch.testing.assert_close(got[1], want_size, **sum_tol(N))
    torch.testing.assert_close(got[0], want_x, **x_tol(x.dtype, N, C, float(x.abs().max())))


@pytest.mark.parametrize("case", CASES)
def test_match(tt, case):
    t, args = _inputs(case)
    got = tt.match(t["metric"], t["score"], t["size"], **args)
    _assert_same_T(got, _ref_match(t, args))


@pytest.mark.parametrize("case", CASES)
def test_transform(tt, case):
    t, args = _inputs(case)
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], mode=case["mode"], **args)
    assert got[0].shape[1] == case["N"] - case["r"]
    _assert_step(got, t["x"], t["size"], t["metric"], t["score"], args, case["mode"])


@pytest.mark.parametrize("mode", ["mean", "sum", "norm"])
@pytest.mark.parametrize("case", CASES)
def test_apply(tt, case, mode):
    t, args = _inputs(case)
    dst, weight = _ref_match(t, args)
    n_out = case["N"] - case["r"]
    x_out, size_out = tt.apply(t["x"], t["size"], dst, weight, n_out, mode)
    want_x, want_size = reference.apply(t["x"], t["size"], dst, weight, n_out, mode)
    assert x_out.dtype == t["x"].dtype and size_out.dtype == torch.float32
    torch.testing.assert_close(size_out, want_size, **SIZE_TOL)
    torch.testing.assert_close(x_out, want_x, **x_tol(case["dtype"],
                                                      magnitude=apply_magnitude(t["x"], t["size"], dst, weight)))


@pytest.mark.parametrize("case", CASES)
def test_untransform(tt, case):
    t, args = _inputs(case)
    dst, weight = _ref_match(t, args)
    y = torch.randn(case["B"], case["N"] - case["r"], 24).to(case["dtype"])
    got = tt.untransform(y, dst, weight)
    want = reference.untransform(y, dst, weight)
    assert got.dtype == y.dtype and got.shape == (case["B"], case["N"], 24)
    torch.testing.assert_close(got, want, **x_tol(case["dtype"], terms=dst.shape[-1],
                                                  magnitude=float(y.abs().max())))


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


# --- edge cases ------------------------------------------------------------------------------

EDGE_CONSTRUCTIONS = [("prune", 1, 0.0, "all"), ("evit", 1, 0.0, "all"), ("tome", 1, 0.0, "all"),
                      ("transform", 2, 0.5, "all"), ("transform", 4, 1.0, "b")]


def _empty_batch(method, k, alpha, targets):
    t = make_tokens(0, 17)
    args = dict(r=3, method=method, prefix=1, **construction_kwargs(method, k, alpha, targets))
    return t, args


@pytest.mark.parametrize("method,k,alpha,targets", EDGE_CONSTRUCTIONS)
def test_empty_batch(tt, method, k, alpha, targets):
    t, args = _empty_batch(method, k, alpha, targets)
    x_out, size_out, dst, weight = tt.transform(t["x"], t["size"], t["metric"], t["score"],
                                                **args)
    assert x_out.shape == (0, 14, 24) and size_out.shape == (0, 14)
    assert dst.shape == weight.shape == (0, 17, k) and dst.dtype == torch.int64
    m_dst, m_weight = tt.match(t["metric"], t["score"], t["size"], **args)
    assert m_dst.shape == m_weight.shape == (0, 17, k)
    assert tt.untransform(x_out, dst, weight).shape == (0, 17, 24)
    assert tt.apply(t["x"], t["size"], dst, weight, 14)[0].shape == (0, 14, 24)
    q = torch.randn(0, 2, 17, 8)
    assert tt.cls_attention(q, q).shape == (0, 17)


@pytest.mark.parametrize("method,k,alpha,targets", EDGE_CONSTRUCTIONS)
def test_empty_batch_reference(method, k, alpha, targets):
    t, args = _empty_batch(method, k, alpha, targets)
    got = ops.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    want = reference.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype


# One output token: everything but the prefix removed (prune, transform by importance: nothing is
# left to merge into), or everything fused into evit's extra token.
@pytest.mark.parametrize("method,k,alpha,prefix", [
    ("prune", 1, 0.0, 1), ("evit", 1, 0.0, 0), ("transform", 2, 1.0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_output_token(tt, method, k, alpha, prefix, dtype):
    N = 17
    t = make_tokens(3, N, dtype=dtype, duplicates=True)
    r = r_for("max", method, N, prefix, alpha)
    assert N - r == 1
    args = dict(r=r, method=method, prefix=prefix, **construction_kwargs(method, k, alpha))
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    assert got[0].shape == (3, 1, 24)
    _assert_step(got, t["x"], t["size"], t["metric"], t["score"], args)
    y = torch.randn(3, 1, 24).to(dtype)
    torch.testing.assert_close(ops.untransform(y, got[2], got[3]),
                               reference.untransform(y, got[2], got[3]),
                               **x_tol(dtype, terms=k, magnitude=float(y.abs().max())))


@pytest.mark.parametrize("method,k,alpha", [
    ("prune", 1, 0.0), ("tome", 1, 0.0), ("transform", 2, 0.0), ("transform", 2, 0.5),
])
def test_prefix_covers_all_tokens(tt, method, k, alpha):
    """prefix = N: nothing may leave (r = 0); both sides return the identity."""
    t = make_tokens(2, 17)
    args = dict(r=0, method=method, prefix=17, **construction_kwargs(method, k, alpha))
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    want = reference.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    _assert_same_T(got[2:], want[2:])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("method,alpha", [("prune", 0.0), ("transform", 1.0)])
def test_remove_every_token_is_rejected(tt, method, alpha):
    """prefix 0 and r = N would leave T without an output row: at least one token remains."""
    t = make_tokens(2, 17)
    args = dict(r=17, method=method, prefix=0, **construction_kwargs(method, alpha=alpha))
    with pytest.raises(ValueError, match="`r`"):
        tt.match(t["metric"], t["score"], t["size"], **args)
    args["r"] = 16
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    want = reference.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    _assert_same_T(got[2:], want[2:])
    assert got[0].shape == want[0].shape == (2, 1, 24)


# --- non-contiguous inputs give the same as contiguous ones ----------------------------------

def _op_calls(dtype, tt=ops):
    """Each op with its tensor arguments (positional) and the rest (keywords)."""
    t = make_tokens(3, 197, dtype=dtype, seed=7, duplicates=True)
    dst, weight = ops.match(t["metric"], t["score"], t["size"], 40, "transform", k=4, alpha=0.5)
    y = torch.randn(3, 157, 24).to(dtype)
    q = torch.randn(3, 4, 197, 16).to(dtype)
    kk = torch.randn(3, 4, 197, 16).to(dtype)
    return {
        "match": (tt.match, (t["metric"], t["score"], t["size"]),
                  dict(r=40, method="transform", k=4, alpha=0.5)),
        "match_evit": (tt.match, (t["metric"], t["score"], t["size"]), dict(r=40, method="evit")),
        "transform": (tt.transform, (t["x"], t["size"], t["metric"], t["score"]),
                      dict(r=40, method="transform", k=2, alpha=0.5, targets="b")),
        "apply": (tt.apply, (t["x"], t["size"], dst, weight), dict(n_out=157)),
        "untransform": (tt.untransform, (y, dst, weight), {}),
        "cls_attention": (tt.cls_attention, (q, kk, t["size"]), {}),
    }


@pytest.mark.parametrize("op,dtype,kind", [
    (op, dtype, kind)
    for op in ["match", "match_evit", "transform", "apply", "untransform", "cls_attention"]
    for dtype, kind in [("float32", "sliced"), ("float32", "transposed"), ("bfloat16", "sliced")]])
def test_non_contiguous_inputs(tt, op, dtype, kind):
    fn, tensors, kwargs = _op_calls(getattr(torch, dtype), tt)[op]
    want = fn(*tensors, **kwargs)
    views = [non_contiguous(t, kind) for t in tensors]
    assert not any(v.is_contiguous() for v in views)
    got = fn(*views, **kwargs)
    for g, w in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
        assert torch.equal(g, w)


@pytest.mark.parametrize("op", ["match", "transform", "apply", "untransform", "cls_attention"])
def test_same_result_on_one_thread(op):
    """The kernels are deterministic whatever the thread count."""
    fn, tensors, kwargs = _op_calls(torch.float32)[op]
    want = fn(*tensors, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = fn(*tensors, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for g, w in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
        assert torch.equal(g, w)


@pytest.mark.parametrize("D,C", [(5, 7), (24, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_counts_off_the_vector_width(tt, D, C, dtype):
    """Metric and x channels that are not (5, 7) or are (24, 40) whole 16-byte packs."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 37, C, generator=g).to(dtype)
    metric = (torch.randn(2, 37, D, generator=g) + 2).to(dtype)
    size = torch.randint(1, 4, (2, 37), generator=g).float()
    args = dict(r=9, method="transform", k=2, targets="b", cost="ward")
    got = tt.transform(x, size, metric, None, mode="norm", **args)
    _assert_step(got, x, size, metric, None, args, "norm")


# (x or q, metric or k): autocast gives bf16/fp16 queries and keys beside an fp32 residual stream,
# and fp16/bf16 weights give the reverse under fp32 operands.
MIXED_DTYPES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,metric_dtype", MIXED_DTYPES)
def test_mixed_dtypes(tt, x_dtype, metric_dtype):
    """Each of x, metric, q and k in its own dtype; results in x's (scores in fp32)."""
    t = make_tokens(3, 197, seed=11)
    x, metric = t["x"].to(x_dtype), t["metric"].to(metric_dtype)
    args = dict(r=40, method="transform", k=2, alpha=0.5, targets="b", cost="ward")
    got = tt.transform(x, t["size"], metric, t["score"], mode="norm", **args)
    _assert_step(got, x, t["size"], metric, t["score"], args, "norm")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 197, 16, generator=g).to(x_dtype)
    k = torch.randn(3, 4, 197, 16, generator=g).to(metric_dtype)
    score = tt.cls_attention(q, k, t["size"])
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, reference.cls_attention(q, k, t["size"]),
                               **cls_attention_tol(q, k))


@pytest.mark.parametrize("op", ["match", "match_evit", "transform", "apply", "untransform",
                                "cls_attention"])
def test_autocast_changes_nothing(op):
    """The ops take each input in its own dtype, so autocast has nothing to cast, and the GEMMs
    inside the CPU kernels stay fp32 (csrc/autocast.cpp)."""
    fn, tensors, kwargs = _op_calls(torch.float32)[op]
    want = fn(*tensors, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*tensors, **kwargs)
    for g, w in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
        assert torch.equal(g, w)


@functools.cache
def _vit_tokens():
    """Tokens and attention queries entering every block of a timm ViT-S/16 (random weights, no
    download), for 8 random images. The model runs in float64, rounded to fp32 after: an fp32
    forward would give other tokens on each CPU's GEMM path."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval().double()
    seen = []
    hooks = [b.attn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
             for b in model.blocks]
    with torch.no_grad():
        model(torch.randn(8, 3, 224, 224).double())
        queries = [blk.attn.qkv(t)[..., :384] for blk, t in zip(model.blocks, seen)]
    for h in hooks:
        h.remove()
    return [(t.float(), q.float()) for t, q in zip(seen, queries)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_tokens_default_construction(tt, dtype):
    """patch()'s default step (queries, Ward, targets b, norm) on real ViT tokens of every block:
    T equals the reference's but for rows at near ties (thousands here: real queries of one image
    are close), x_out its apply."""
    size = torch.ones(8, 197)
    args = dict(r=16, method="transform", targets="b", cost="ward")
    for tokens, queries in _vit_tokens():
        x, metric = tokens.to(dtype), queries.to(dtype)
        got = tt.transform(x, size, metric, None, mode="norm", **args)
        _assert_step(got, x, size, metric, None, args, "norm")


# transform.cu's budget on an H100 or H200: 227 KiB a block, less 1 KiB of static shared memory.
HOPPER_SHARED = 227 * 1024 - 1024


@pytest.mark.parametrize("N,D,dtype", [
    (197, 384, torch.bfloat16),  # queries of DeiT-S: metric staged
    (197, 384, torch.float32),  # too big to stage: read in place
    (577, 64, torch.float16),  # ViT-L/16 at 384 px
    (1370, 64, torch.float32),  # DINOv2 at 518 px: fewer affinity rows per chunk
])
def test_cuda_shared_memory_plans(N, D, dtype):
    """The CUDA kernel's per-image code under the plan it makes on a Hopper GPU (transform.cu),
    with canaries after the planned shared memory: the layout holds all it writes."""
    host = cuda_kernels_on_host()
    t = make_tokens(2, N, C=40, D=D, dtype=dtype, seed=N)
    args = dict(r=N // 4, method="transform", k=2, tau=0.1, alpha=0.0, targets="all", prefix=1,
                cost="ward")
    got = host.transform(t["x"], t["size"], t["metric"], None, args["r"], "transform", 2, 0.1, 0.0,
                         "all", 1, "norm", "ward", 0, False, False, 0, HOPPER_SHARED)
    _assert_step(got, t["x"], t["size"], t["metric"], None, args, "norm")


# The largest image transform.cu plans for on a Hopper GPU: the metric read in place and one
# affinity row per chunk take 7 N + 2 K words of shared memory, 28 N + 8 K bytes <= HOPPER_SHARED.
CUDA_MAX_TOKENS = 8192


def test_cuda_largest_image():
    """N = CUDA_MAX_TOKENS runs under the Hopper plan and agrees with the reference; an N past
    what any plan fits is refused with a message, not run out of bounds."""
    host = cuda_kernels_on_host()
    N, r = CUDA_MAX_TOKENS, CUDA_MAX_TOKENS // 8
    t = make_tokens(1, N, C=8, D=16, seed=3)
    args = dict(r=r, method="transform", k=2, tau=0.1, alpha=0.0, targets="b", prefix=1,
                cost="cosine")
    got = host.transform(t["x"], t["size"], t["metric"], None, r, "transform", 2, 0.1, 0.0, "b",
                         1, "mean", "cosine", 0, False, False, 0, HOPPER_SHARED)
    _assert_step(got, t["x"], t["size"], t["metric"], None, args, "mean")
    N = HOPPER_SHARED // 28 + 1
    t = make_tokens(1, N, C=8, D=16, seed=4)
    with pytest.raises(RuntimeError, match=f"no plan fits {HOPPER_SHARED} bytes"):
        host.transform(t["x"], t["size"], t["metric"], None, 1, "transform", 2, 0.1, 0.0, "b", 1,
                       "mean", "cosine", 0, False, False, 0, HOPPER_SHARED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kwargs", [
    ("transform", dict(k=1, targets="b", cost="ward", alpha=0.0)),  # patch()'s default
    ("transform", dict(k=4, targets="all", cost="cosine", alpha=0.5)),
    ("tome", {}),
])
def test_small_batch_keys_split_changes_nothing(method, kwargs, dtype):
    """Small batches spread each image's removal keys over several blocks (transform.cu's
    keys_kernel): every affinity is computed by the same code in the same order, so T and x' are
    bit-equal to the one-block step's, for any number of blocks (up to one per A row)."""
    host = cuda_kernels_on_host()
    tokens, queries = list(_vit_tokens())[6]  # a middle block's
    x, metric = tokens.to(dtype), queries.to(dtype)
    if method == "tome":
        metric = metric[..., :64]  # a head's width, as ToMe's keys
    B, N = x.shape[:2]
    size = torch.randint(1, 4, (B, N), generator=torch.Generator().manual_seed(0)).float()
    score = torch.rand(B, N, generator=torch.Generator().manual_seed(1)).softmax(-1)
    a = {**dict(k=1, tau=0.1, alpha=0.0, targets="all", cost="cosine"), **kwargs}
    args = (48, method, a["k"], a["tau"], a["alpha"], a["targets"], 1, "norm", a["cost"])
    whole = host.transform(x, size, metric, score, *args, 8, True, True, 0)
    for parts in (2, 7, (N - 1) // 2):
        split = host.transform(x, size, metric, score, *args, 8, True, True, 0, 0, parts)
        for got, want in zip(split, whole):
            assert torch.equal(got, want), parts
