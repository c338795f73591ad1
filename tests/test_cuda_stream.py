"""The CUDA kernels inside a GPU program: capture in a CUDA graph (where the value checks become
device-side asserts instead of synchronising), torch.compile. Skipped without a GPU."""
import pytest
import torch

from conftest import make_tokens
from tt_kernels.rules import OPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ops = torch.ops.tt


def _calls():
    """op name -> (function of CUDA tensors, those tensors)."""
    t = {k: v.cuda() for k, v in make_tokens(4, 197, C=96, D=16, dtype=torch.bfloat16).items()}
    dst, weight = ops.match(t["metric"], t["score"], t["size"], 16, "spread", k=4, alpha=0.5)
    q = torch.randn(4, 6, 197, 64, device="cuda", dtype=torch.bfloat16)
    return {
        "transform": (lambda x, size, metric, score: ops.transform(
            x, size, metric, score, 16, "spread", k=1, targets="b", mode="norm", cost="ward"),
            (t["x"], t["size"], t["metric"], t["score"])),
        "match": (lambda metric, score, size: ops.match(metric, score, size, 16, "tome"),
                  (t["metric"], t["score"], t["size"])),
        "apply": (lambda x, size, d, w: ops.apply(x, size, d, w, 181, "mean"),
                  (t["x"], t["size"], dst, weight)),
        "untransform": (lambda y, d, w: ops.untransform(y, d, w),
                        (t["x"][:, :181].contiguous(), dst, weight)),
        "cls_attention": (lambda q, k, size: ops.cls_attention(q, k, size),
                          (q, q.flip(2).contiguous(), t["size"])),
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_bad_values_raise_at_once_outside_graphs():
    fn, (x, size, metric, score) = _calls()["transform"]
    with pytest.raises(ValueError, match="`size` must be non-negative"):
        fn(x, -size, metric, score)


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_replays_on_new_inputs(op):
    fn, args = _calls()[op]
    static = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _as_tuple(fn(*static))
    fresh = _calls()[op][1]  # same values: a replay must reproduce the eager result
    for s, f in zip(static, fresh):
        s.copy_(f)
    if op != "apply":  # new x values (apply's T stays valid)
        static[0].mul_(1.5)
    graph.replay()
    want = _as_tuple(fn(*static))
    for got, ref in zip(captured, want):
        assert torch.equal(got, ref)


def test_torch_compile_fullgraph():
    fn, args = _calls()["transform"]
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(*args), fn(*args)):
        assert torch.equal(got, want)
