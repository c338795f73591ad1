"""What every op of torch.ops.tt does alike, for every backend of the `tt` fixture
(tests/conftest.py): empty batches, non-contiguous inputs, each input in its own dtype, the same
result on one thread and under autocast, bad input refused by name."""
import pytest
import torch

from conftest import cls_attention_tol, construction_kwargs, make_tokens, non_contiguous
from reference_cases import assert_step
from tt_kernels import reference
from tt_kernels.ops import ops

EDGE_CONSTRUCTIONS = [("prune", 1, 0.0, "all"), ("evit", 1, 0.0, "all"), ("tome", 1, 0.0, "all"),
                      ("spread", 2, 0.5, "all"), ("spread", 4, 1.0, "b")]


def _empty_batch(method, k, alpha, targets):
    t = make_tokens(0, 17)
    args = dict(r=3, method=method, prefix=1, **construction_kwargs(method, k, alpha, targets))
    return t, args


@pytest.mark.interpreted
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


# --- non-contiguous inputs give the same as contiguous ones ----------------------------------

def _op_calls(dtype, tt=ops):
    """Each op with its tensor arguments (positional) and the rest (keywords)."""
    t = make_tokens(3, 197, dtype=dtype, seed=7, duplicates=True)
    dst, weight = ops.match(t["metric"], t["score"], t["size"], 40, "spread", k=4, alpha=0.5)
    y = torch.randn(3, 157, 24).to(dtype)
    q = torch.randn(3, 4, 197, 16).to(dtype)
    kk = torch.randn(3, 4, 197, 16).to(dtype)
    return {
        "match": (tt.match, (t["metric"], t["score"], t["size"]),
                  dict(r=40, method="spread", k=4, alpha=0.5)),
        "match_evit": (tt.match, (t["metric"], t["score"], t["size"]), dict(r=40, method="evit")),
        "transform": (tt.transform, (t["x"], t["size"], t["metric"], t["score"]),
                      dict(r=40, method="spread", k=2, alpha=0.5, targets="b")),
        "apply": (tt.apply, (t["x"], t["size"], dst, weight), dict(n_out=157)),
        "untransform": (tt.untransform, (y, dst, weight), {}),
        "cls_attention": (tt.cls_attention, (q, kk, t["size"]), {}),
    }


# Interpreted: each Triton kernel's strided reads once (transform runs match's and apply's), in
# each kind.
INTERPRETED_NON_CONTIGUOUS = {("transform", "bfloat16", "sliced"),
                              ("untransform", "float32", "transposed"),
                              ("cls_attention", "float32", "sliced")}


@pytest.mark.parametrize("op,dtype,kind", [
    pytest.param(op, dtype, kind, marks=[pytest.mark.interpreted]
                 if (op, dtype, kind) in INTERPRETED_NON_CONTIGUOUS else [])
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


# (x or q, metric or k): autocast gives bf16/fp16 queries and keys beside an fp32 residual stream,
# and fp16/bf16 weights give the reverse under fp32 operands (interpreted: one of each).
MIXED_DTYPES = [pytest.param(torch.float32, torch.bfloat16, marks=pytest.mark.interpreted),
                (torch.float32, torch.float16),
                pytest.param(torch.bfloat16, torch.float32, marks=pytest.mark.interpreted),
                (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,metric_dtype", MIXED_DTYPES)
def test_mixed_dtypes(tt, x_dtype, metric_dtype):
    """Each of x, metric, q and k in its own dtype; results in x's (scores in fp32)."""
    t = make_tokens(3, 197, seed=11)
    x, metric = t["x"].to(x_dtype), t["metric"].to(metric_dtype)
    args = dict(r=40, method="spread", k=2, alpha=0.5, targets="b", cost="ward")
    got = tt.transform(x, t["size"], metric, t["score"], mode="norm", **args)
    assert_step(got, x, t["size"], metric, t["score"], args, "norm")
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


@pytest.mark.interpreted
@pytest.mark.parametrize("tt", ["triton"], indirect=True)
def test_bad_input_is_rejected_by_name(tt):
    """The Triton launchers run torch.ops.tt's argument checks before any kernel."""
    t = make_tokens(1, 17, duplicates=True)
    with pytest.raises(ValueError, match="`r`"):
        tt.transform(t["x"], t["size"], t["metric"], None, 9, "tome")
    with pytest.raises(RuntimeError, match="`dst`"):
        tt.apply(t["x"], t["size"], torch.zeros(1, 16, 1, dtype=torch.long),
                 torch.ones(1, 16, 1), 17)
