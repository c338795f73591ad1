"""Bad input gets a RuntimeError or ValueError whose message names the argument (DESIGN.md §3):
from torch.ops.tt.* directly and from the Python API with either backend."""
import pytest
import torch

import tt_kernels
from conftest import make_tokens

ops = torch.ops.tt
B, N, R = 2, 17, 4  # prefix 1: ToMe's cap is (17 - 1) // 2 = 8
NAN = float("nan")


class Inputs:
    """Good inputs of every op; each bad case changes one of them."""

    def __init__(self):
        t = make_tokens(B, N, C=8, D=4)
        self.x, self.size, self.metric, self.score = t["x"], t["size"], t["metric"], t["score"]
        self.dst, self.weight = ops.match(self.metric, self.score, self.size, R, "spread", k=2)
        self.y = torch.randn(B, N - R, 8)
        self.q = torch.randn(B, 3, N, 8)
        self.k = torch.randn(B, 3, N, 8)

    def match(self, **kw):
        args = dict(metric=self.metric, score=self.score, size=self.size, r=R, method="spread")
        args.update(kw)
        return ops.match(args.pop("metric"), args.pop("score"), args.pop("size"), **args)

    def transform(self, **kw):
        args = dict(x=self.x, size=self.size, metric=self.metric, score=self.score, r=R,
                    method="spread")
        args.update(kw)
        return ops.transform(args.pop("x"), args.pop("size"), args.pop("metric"),
                             args.pop("score"), **args)

    def apply(self, **kw):
        args = dict(x=self.x, size=self.size, dst=self.dst, weight=self.weight, n_out=N - R)
        args.update(kw)
        return ops.apply(args.pop("x"), args.pop("size"), args.pop("dst"), args.pop("weight"),
                         **args)

    def untransform(self, **kw):
        args = dict(y=self.y, dst=self.dst, weight=self.weight)
        args.update(kw)
        return ops.untransform(args["y"], args["dst"], args["weight"])

    def cls_attention(self, **kw):
        args = dict(q=self.q, k=self.k, size=None, scale=None)
        args.update(kw)
        return ops.cls_attention(args["q"], args["k"], args["size"], args["scale"])


def _with_nan(t):
    t = t.clone()
    t.view(-1)[3] = NAN
    return t


# (id, call on Inputs, the argument the message must name)
OP_CASES = [
    # wrong rank
    ("match-metric-rank", lambda g: g.match(metric=g.metric[..., 0]), "metric"),
    ("match-metric-rank-5", lambda g: g.match(metric=g.metric[:, None, :, None]), "metric"),
    ("match-score-rank", lambda g: g.match(metric=None, score=g.score[0], method="prune"), "score"),
    ("transform-x-rank", lambda g: g.transform(x=g.x[0]), "x"),
    ("apply-x-rank", lambda g: g.apply(x=g.x[..., 0]), "x"),
    ("apply-dst-rank", lambda g: g.apply(dst=g.dst[..., 0], weight=g.weight[..., 0]), "dst"),
    ("untransform-y-rank", lambda g: g.untransform(y=g.y[0]), "y"),
    ("untransform-dst-rank", lambda g: g.untransform(dst=g.dst[..., 0]), "dst"),
    ("cls_attention-q-rank", lambda g: g.cls_attention(q=g.q[0]), "q"),
    ("cls_attention-k-rank", lambda g: g.cls_attention(k=g.k[0]), "k"),
    # mismatched B / N
    ("match-score-N", lambda g: g.match(score=g.score[:, 1:]), "score"),
    ("match-score-B", lambda g: g.match(score=g.score[:1]), "score"),
    ("match-size-N", lambda g: g.match(size=g.size[:, 1:]), "size"),
    ("transform-x-N", lambda g: g.transform(x=g.x[:, 1:]), "x"),
    ("transform-x-B", lambda g: g.transform(x=g.x[:1]), "x"),
    ("transform-size-N", lambda g: g.transform(size=g.size[:, 1:]), "size"),
    ("transform-metric-N", lambda g: g.transform(metric=g.metric[:, 1:]), "metric"),
    ("apply-size-N", lambda g: g.apply(size=g.size[:, 1:]), "size"),
    ("apply-dst-B", lambda g: g.apply(dst=g.dst[:1], weight=g.weight[:1]), "dst"),
    ("apply-dst-N", lambda g: g.apply(dst=g.dst[:, 1:], weight=g.weight[:, 1:]), "dst"),
    ("untransform-dst-B", lambda g: g.untransform(dst=g.dst[:1], weight=g.weight[:1]), "dst"),
    ("cls_attention-k-B", lambda g: g.cls_attention(k=g.k[:1]), "k"),
    ("cls_attention-k-H", lambda g: g.cls_attention(k=g.k[:, :2]), "k"),
    ("cls_attention-k-Dh", lambda g: g.cls_attention(k=g.k[..., :4]), "k"),
    ("cls_attention-size-N", lambda g: g.cls_attention(size=g.size[:, 1:]), "size"),
    # r out of range, ToMe's cap included
    ("r-negative", lambda g: g.match(r=-1), "r"),
    ("r-tome-cap", lambda g: g.match(r=9, method="tome"), "r"),
    ("r-transform-cap", lambda g: g.transform(r=9, alpha=0.5), "r"),
    ("r-transform-importance", lambda g: g.match(r=17, alpha=1.0), "r"),
    ("r-prune", lambda g: g.match(r=17, method="prune"), "r"),
    ("r-evit", lambda g: g.match(r=16, method="evit"), "r"),
    ("prefix-range", lambda g: g.match(r=0, prefix=18), "prefix"),
    # the sparse T: K mismatch, dst out of range, wrong dtypes, NaN weights
    ("apply-K", lambda g: g.apply(weight=g.weight[..., :1]), "weight"),
    ("untransform-K", lambda g: g.untransform(weight=g.weight[..., :1]), "weight"),
    ("apply-dst-high", lambda g: g.apply(n_out=N - R - 1), "dst"),
    ("apply-dst-negative", lambda g: g.apply(dst=g.dst - 1), "dst"),
    ("untransform-dst-high", lambda g: g.untransform(y=g.y[:, :-1]), "dst"),
    ("apply-dst-int32", lambda g: g.apply(dst=g.dst.int()), "dst"),
    ("untransform-dst-int32", lambda g: g.untransform(dst=g.dst.int()), "dst"),
    ("apply-weight-f64", lambda g: g.apply(weight=g.weight.double()), "weight"),
    ("untransform-weight-f16", lambda g: g.untransform(weight=g.weight.half()), "weight"),
    ("apply-weight-nan", lambda g: g.apply(weight=_with_nan(g.weight)), "weight"),
    ("apply-n_out-negative", lambda g: g.apply(n_out=-1), "n_out"),
    # sizes: NaN, infinite, negative, wrong dtype
    ("apply-size-nan", lambda g: g.apply(size=_with_nan(g.size)), "size"),
    ("transform-size-nan", lambda g: g.transform(size=_with_nan(g.size)), "size"),
    ("match-size-inf", lambda g: g.match(size=g.size / 0), "size"),
    ("cls_attention-size-nan", lambda g: g.cls_attention(size=_with_nan(g.size)), "size"),
    ("apply-size-negative", lambda g: g.apply(size=-g.size), "size"),
    ("apply-size-f64", lambda g: g.apply(size=g.size.double()), "size"),
    ("transform-size-f16", lambda g: g.transform(size=g.size.half()), "size"),
    ("match-size-int", lambda g: g.match(size=g.size.long()), "size"),
    ("cls_attention-size-f64", lambda g: g.cls_attention(size=g.size.double()), "size"),
    # other dtypes and values
    ("apply-x-f64", lambda g: g.apply(x=g.x.double()), "x"),
    ("transform-x-int", lambda g: g.transform(x=g.x.long()), "x"),
    ("untransform-y-f64", lambda g: g.untransform(y=g.y.double()), "y"),
    ("match-metric-int", lambda g: g.match(metric=g.metric.long()), "metric"),
    ("match-score-f64", lambda g: g.match(score=g.score.double(), method="prune"), "score"),
    ("match-score-nan", lambda g: g.match(score=_with_nan(g.score), method="evit"), "score"),
    ("cls_attention-k-f64", lambda g: g.cls_attention(k=g.k.double()), "k"),
    ("cls_attention-scale-inf", lambda g: g.cls_attention(scale=float("inf")), "scale"),
    # unknown names
    ("match-method", lambda g: g.match(method="merge"), "method"),
    ("transform-method", lambda g: g.transform(method="Tome"), "method"),
    ("transform-mode", lambda g: g.transform(mode="max"), "mode"),
    ("apply-mode", lambda g: g.apply(mode="avg"), "mode"),
    ("match-targets", lambda g: g.match(targets="a"), "targets"),
    ("match-cost", lambda g: g.match(cost="euclid"), "cost"),
    ("transform-cost", lambda g: g.transform(cost="l2"), "cost"),
    ("tome-with-ward", lambda g: g.match(method="tome", cost="ward"), "cost"),
    # k, tau, alpha
    ("k-with-tome", lambda g: g.match(method="tome", k=2), "k"),
    ("k-with-prune", lambda g: g.transform(method="prune", k=4), "k"),
    ("k-with-evit", lambda g: g.match(method="evit", k=2), "k"),
    ("k-zero", lambda g: g.match(k=0), "k"),
    ("k-above-N", lambda g: g.match(k=N + 1), "k"),
    ("tau-zero", lambda g: g.match(tau=0.0), "tau"),
    ("tau-negative", lambda g: g.transform(tau=-0.1), "tau"),
    ("tau-nan", lambda g: g.match(tau=NAN), "tau"),
    ("alpha-above-1", lambda g: g.match(alpha=1.5), "alpha"),
    ("alpha-negative", lambda g: g.transform(alpha=-0.1), "alpha"),
    ("alpha-nan", lambda g: g.match(alpha=NAN), "alpha"),
    # missing metric / score
    ("tome-without-metric", lambda g: g.match(metric=None, method="tome"), "metric"),
    ("transform-without-metric", lambda g: g.transform(metric=None), "metric"),
    ("prune-without-score", lambda g: g.match(score=None, method="prune"), "score"),
    ("evit-without-score", lambda g: g.transform(score=None, method="evit"), "score"),
    ("mix-without-score", lambda g: g.match(score=None, alpha=0.5), "score"),
    ("neither-metric-nor-score", lambda g: g.match(metric=None, score=None, method="prune"),
     "score"),
]


def _params(cases):
    """pytest params from (id, *values) tuples."""
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


def _assert_names(call, arg):
    with pytest.raises((RuntimeError, ValueError)) as info:
        call()
    assert f"`{arg}`" in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def good():
    return Inputs()


def test_good_inputs_pass(good):
    good.match(), good.transform(), good.apply(), good.untransform(), good.cls_attention()


@pytest.mark.parametrize("call,arg", _params(OP_CASES))
def test_op_rejects(good, call, arg):
    _assert_names(lambda: call(good), arg)


@pytest.mark.parametrize("method,alpha", [("prune", 0.0), ("evit", 0.0), ("tome", 0.0),
                                          ("spread", 0.5), ("spread", 1.0)])
@pytest.mark.parametrize("n,prefix", [(17, 0), (18, 1), (17, 2), (18, 5)])
def test_r_range_is_max_r(method, alpha, n, prefix):
    """tt_kernels.max_r is exactly the largest r the op accepts."""
    t = make_tokens(1, n)
    r_max = tt_kernels.max_r(method, n, prefix, by_importance=method == "spread" and alpha == 1)
    args = dict(method=method, prefix=prefix, alpha=alpha) if method == "spread" else dict(
        method=method, prefix=prefix)
    dst, _ = ops.match(t["metric"], t["score"], None, r_max, **args)
    assert dst.shape == (1, n, 1)
    _assert_names(lambda: ops.match(t["metric"], t["score"], None, r_max + 1, **args), "r")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("moved", ["size", "dst", "weight"])
def test_op_rejects_device_mix(good, moved):
    args = dict(x=good.x.cuda(), size=good.size.cuda(), dst=good.dst.cuda(),
                weight=good.weight.cuda())
    args[moved] = args[moved].cpu()
    _assert_names(lambda: good.apply(**args), moved)


# --- the Python API, with the reference and the C++ backend ------------------------------------

def _api_transform(g, backend, **kw):
    args = dict(x=g.x, metric=g.metric, r=R, size=g.size, score=g.score)
    args.update(kw)
    return tt_kernels.transform(args.pop("x"), args.pop("metric"), args.pop("r"),
                                backend=backend, **args)


def _api_match(g, backend, **kw):
    args = dict(metric=g.metric, r=R, size=g.size, score=g.score)
    args.update(kw)
    return tt_kernels.match(args.pop("metric"), args.pop("r"), backend=backend, **args)


# (id, api function, keyword changes, the argument to name)
API_CASES = [
    ("x-rank", _api_transform, dict(x=lambda g: g.x[..., 0]), "x"),
    ("metric-rank", _api_transform, dict(metric=lambda g: g.metric[..., 0]), "metric"),
    ("x-N", _api_transform, dict(x=lambda g: g.x[:, 1:]), "x"),
    ("score-N", _api_transform, dict(score=lambda g: g.score[:, 1:]), "score"),
    ("metric-N", _api_transform, dict(metric=lambda g: g.metric[:, 1:]), "metric"),
    ("per-head-metric-N", _api_transform, dict(metric=lambda g: g.metric[:, None, 1:]), "metric"),
    ("size-N", _api_transform, dict(size=lambda g: g.size[:, 1:]), "size"),
    ("size-nan", _api_transform, dict(size=lambda g: _with_nan(g.size)), "size"),
    ("size-f64", _api_transform, dict(size=lambda g: g.size.double()), "size"),
    ("metric-int", _api_transform, dict(metric=lambda g: g.metric.long()), "metric"),
    ("r-tome-cap", _api_transform, dict(r=9, method="tome"), "r"),
    ("r-negative", _api_transform, dict(r=-1), "r"),
    ("r-evit", _api_match, dict(r=16, method="evit"), "r"),
    ("prefix", _api_match, dict(r=0, prefix=-1), "prefix"),
    ("method", _api_transform, dict(method="bipartite"), "method"),
    ("mode", _api_transform, dict(mode="max"), "mode"),
    ("targets", _api_match, dict(targets="B"), "targets"),
    ("cost", _api_match, dict(cost="ward2"), "cost"),
    ("k-with-tome", _api_transform, dict(method="tome", k=2), "k"),
    ("k-zero", _api_match, dict(k=0), "k"),
    ("tau", _api_transform, dict(tau=0.0), "tau"),
    ("alpha", _api_match, dict(source="mix", alpha=1.5), "alpha"),
    ("alpha-without-mix", _api_match, dict(alpha=0.5), "alpha"),
    ("source", _api_transform, dict(source="random"), "source"),
    ("tome-without-metric", _api_transform, dict(metric=None, method="tome"), "metric"),
    ("prune-without-score", _api_transform, dict(score=None, method="prune"), "score"),
    ("mix-without-score", _api_match, dict(score=None, source="mix", alpha=0.5), "score"),
    ("match-metric-rank", _api_match, dict(metric=lambda g: g.metric[..., 0], method="tome"),
     "metric"),
    ("match-size-nan", _api_match, dict(size=lambda g: _with_nan(g.size), method="evit"), "size"),
    ("match-neither-metric-nor-score", _api_match, dict(metric=None, score=None), "metric"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("fn,changes,arg", _params(API_CASES))
def test_api_rejects(good, fn, changes, arg, backend):
    kw = {key: v(good) if callable(v) else v for key, v in changes.items()}
    _assert_names(lambda: fn(good, backend, **kw), arg)


# --- backend names ---------------------------------------------------------------------------

def _api_calls(g, backend):
    T = tt_kernels.match(g.metric, R, backend="cpu")
    return {
        "transform": lambda: tt_kernels.transform(g.x, g.metric, R, backend=backend),
        "match": lambda: tt_kernels.match(g.metric, R, backend=backend),
        "apply": lambda: tt_kernels.apply(g.x, T, backend=backend),
        "untransform": lambda: tt_kernels.untransform(g.y, T, backend=backend),
        "restore": lambda: tt_kernels.restore(g.y, [T], backend=backend),
        "cls_attention": lambda: tt_kernels.cls_attention(g.q, g.k, backend=backend),
    }


@pytest.mark.parametrize("backend", ["numpy", "CPU", "triton", "cuda"])
@pytest.mark.parametrize("fn", ["transform", "match", "apply", "untransform", "restore",
                                "cls_attention"])
def test_unavailable_backend(good, fn, backend, monkeypatch):
    """Unknown names, and backends that cannot run on CPU tensors (Triton without its interpreter,
    CUDA): ValueError."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as info:
        _api_calls(good, backend)[fn]()
    if backend in ("numpy", "CPU"):
        assert "`backend`" in str(info.value)
