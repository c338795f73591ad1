"""tt.transform, the fused step, against tt_kernels.reference: T by tt_kernels.verify's rule and x'
the reference's apply of it, for every backend of the `tt` fixture (tests/conftest.py) on the case
grid of tests/reference_cases.py, at the edges (one output token, a prefix of every token, channel
counts, real ViT tokens), and the CUDA kernels' per-image code under the plans of a Hopper GPU
(tests/cuda_on_host)."""
import functools

import pytest
import torch

from conftest import DTYPES, construction_kwargs, cuda_kernels_on_host, make_tokens, r_for, x_tol
from reference_cases import CASES, assert_same_T, assert_step, inputs
from tt_kernels import reference
from tt_kernels.ops import ops


@pytest.mark.parametrize("case", CASES)
def test_transform(tt, case):
    t, args = inputs(case)
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], mode=case["mode"], **args)
    assert got[0].shape[1] == case["N"] - case["r"]
    assert_step(got, t["x"], t["size"], t["metric"], t["score"], args, case["mode"])


# One output token: everything but the prefix removed (prune, transform by importance: nothing is
# left to merge into), or everything fused into evit's extra token.
@pytest.mark.interpreted
@pytest.mark.parametrize("method,k,alpha,prefix", [
    ("prune", 1, 0.0, 1), ("evit", 1, 0.0, 0), ("spread", 2, 1.0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_output_token(tt, method, k, alpha, prefix, dtype):
    N = 17
    t = make_tokens(3, N, dtype=dtype, duplicates=True)
    r = r_for("max", method, N, prefix, alpha)
    assert N - r == 1
    args = dict(r=r, method=method, prefix=prefix, **construction_kwargs(method, k, alpha))
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    assert got[0].shape == (3, 1, 24)
    assert_step(got, t["x"], t["size"], t["metric"], t["score"], args)
    y = torch.randn(3, 1, 24).to(dtype)
    torch.testing.assert_close(ops.untransform(y, got[2], got[3]),
                               reference.untransform(y, got[2], got[3]),
                               **x_tol(dtype, terms=k, magnitude=float(y.abs().max())))


@pytest.mark.interpreted
@pytest.mark.parametrize("method,k,alpha", [
    ("prune", 1, 0.0), ("tome", 1, 0.0), ("spread", 2, 0.0), ("spread", 2, 0.5),
])
def test_prefix_covers_all_tokens(tt, method, k, alpha):
    """prefix = N: nothing may leave (r = 0); both sides return the identity."""
    t = make_tokens(2, 17)
    args = dict(r=0, method=method, prefix=17, **construction_kwargs(method, k, alpha))
    got = tt.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    want = reference.transform(t["x"], t["size"], t["metric"], t["score"], **args)
    assert_same_T(got[2:], want[2:])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.interpreted
@pytest.mark.parametrize("D,C", [(5, 7), (24, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_counts_off_the_vector_width(tt, D, C, dtype):
    """Metric and x channels that are not (5, 7) or are (24, 40) whole 16-byte packs."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 37, C, generator=g).to(dtype)
    metric = (torch.randn(2, 37, D, generator=g) + 2).to(dtype)
    size = torch.randint(1, 4, (2, 37), generator=g).float()
    args = dict(r=9, method="spread", k=2, targets="b", cost="ward")
    got = tt.transform(x, size, metric, None, mode="norm", **args)
    assert_step(got, x, size, metric, None, args, "norm")


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
    args = dict(r=16, method="spread", targets="b", cost="ward")
    for tokens, queries in _vit_tokens():
        x, metric = tokens.to(dtype), queries.to(dtype)
        got = tt.transform(x, size, metric, None, mode="norm", **args)
        assert_step(got, x, size, metric, None, args, "norm")


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
    args = dict(r=N // 4, method="spread", k=2, tau=0.1, alpha=0.0, targets="all", prefix=1,
                cost="ward")
    got = host.transform(t["x"], t["size"], t["metric"], None, args["r"], "spread", 2, 0.1, 0.0,
                         "all", 1, "norm", "ward", 0, False, False, 0, HOPPER_SHARED)
    assert_step(got, t["x"], t["size"], t["metric"], None, args, "norm")


# The largest image transform.cu plans for on a Hopper GPU: the metric read in place and one
# affinity row per chunk take 7 N + 2 K words of shared memory, 28 N + 8 K bytes <= HOPPER_SHARED.
CUDA_MAX_TOKENS = 8192


def test_cuda_largest_image():
    """N = CUDA_MAX_TOKENS runs under the Hopper plan and agrees with the reference; an N past
    what any plan fits is refused with a message, not run out of bounds."""
    host = cuda_kernels_on_host()
    N, r = CUDA_MAX_TOKENS, CUDA_MAX_TOKENS // 8
    t = make_tokens(1, N, C=8, D=16, seed=3)
    args = dict(r=r, method="spread", k=2, tau=0.1, alpha=0.0, targets="b", prefix=1,
                cost="cosine")
    got = host.transform(t["x"], t["size"], t["metric"], None, r, "spread", 2, 0.1, 0.0, "b",
                         1, "mean", "cosine", 0, False, False, 0, HOPPER_SHARED)
    assert_step(got, t["x"], t["size"], t["metric"], None, args, "mean")
    N = HOPPER_SHARED // 28 + 1
    t = make_tokens(1, N, C=8, D=16, seed=4)
    with pytest.raises(RuntimeError, match=f"no plan fits {HOPPER_SHARED} bytes"):
        host.transform(t["x"], t["size"], t["metric"], None, 1, "spread", 2, 0.1, 0.0, "b", 1,
                       "mean", "cosine", 0, False, False, 0, HOPPER_SHARED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kwargs", [
    ("spread", dict(k=1, targets="b", cost="ward", alpha=0.0)),  # patch()'s default
    ("spread", dict(k=4, targets="all", cost="cosine", alpha=0.5)),
    ("tome", {}),
])
def test_small_batch_keys_split_changes_nothing(method, kwargs, dtype):
    """Small batches spread each image's removal keys over several blocks (match.cu's
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
