"""A patched model as people run it: under autocast, with fp16/bf16 weights, in inference mode,
compiled with fullgraph=True, and in training, for every method."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tt_kernels

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
N0 = 65  # 8 x 8 patches and the class token
METHODS = {"spread": dict(r=6), "spread-k2-mix": dict(r=6, k=2, source="mix"),
           "tome": dict(r=6, method="tome"), "prune": dict(r=6, method="prune"),
           "evit": dict(r=5, method="evit")}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _patched(settings, device="cpu"):
    torch.manual_seed(0)
    return tt_kernels.patch(VisionTransformer(**TINY).eval(), **settings).to(device)


def _images(device="cpu"):
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)


def _assert_within_rounding(got, want, dtype):
    """got computes want's function with roundings of `dtype` (and may flip near-tied choices of
    which tokens merge): 1 - cosine to want, about half the square of the relative error, stays
    below the dtype's unit roundoff u, i.e. the relative error below sqrt(2 u) (6% for bf16, 3e-4
    for fp32), a few roundings compounded through the blocks; garbage lands far above."""
    assert got.dtype == dtype and torch.isfinite(got).all()
    cosine = F.cosine_similarity(got.double().flatten(1), want.double().flatten(1), dim=-1)
    assert (1 - cosine).max() <= torch.finfo(dtype).eps / 2


def _assert_sizes_conserved(model, method):
    """Merging keeps every patch; pruning keeps the kept ones only. Sizes are fp32 sums of fp32
    shares: a token's shares sum to 1 within 2 eps (k > 1: a softmax's division) and a step's
    total adds N terms, so each step may move the total by (N + 2) eps relatively."""
    total = model.token_reduction.size.sum(1)
    schedule = model.token_reduction.schedule
    want = N0 - sum(schedule) if method == "prune" else N0
    steps = sum(r > 0 for r in schedule)
    torch.testing.assert_close(total, torch.full_like(total, want), atol=0,
                               rtol=steps * (N0 + 2) * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
def test_autocast(name, device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bf16 in practice")
    model, x = _patched(METHODS[name], device), _images(device)
    with torch.no_grad():
        want = model(x)
        with torch.autocast(device, dtype=dtype):
            got = model(x)
    _assert_within_rounding(got, want, dtype)
    _assert_sizes_conserved(model, METHODS[name].get("method"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_low_precision_weights(name, dtype):
    model, x = _patched(METHODS[name]), _images()
    with torch.no_grad():
        want = model(x)
        got = copy.deepcopy(model).to(dtype)(x.to(dtype))
    _assert_within_rounding(got, want, dtype)


@pytest.mark.parametrize("name", METHODS)
def test_inference_mode_is_no_grad(name):
    model, x = _patched(METHODS[name]), _images()
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = model(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", METHODS)
def test_compile_fullgraph(name):
    """The same ops traced: only the fusion of elementwise work may round differently."""
    model, x = _patched(METHODS[name]), _images()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    _assert_within_rounding(got, want, torch.float32)


def _gradients(model, x):
    model.zero_grad()
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", METHODS)
def test_training_gradients_match_the_reference(name):
    """Backward through every block's reduction: the kernels' registered gradients give what
    autograd through the PyTorch reference gives (same T, fp32 sums in another order)."""
    model, x = _patched(METHODS[name]), _images()
    model.train()
    got = _gradients(model, x)
    model.token_reduction.backend = "reference"
    want = _gradients(model, x)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert got["patch_embed.proj.weight"].abs().sum() > 0  # gradients reach the first layer
    for param in want:
        _assert_within_rounding(got[param][None], want[param][None], torch.float32)


@pytest.mark.parametrize("name", METHODS)
def test_training_under_autocast(name):
    model, x = _patched(METHODS[name]), _images()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    grad = model.patch_embed.proj.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_python_backends_ignore_autocast(backend):
    """As the compiled ops do: autocast must not turn a GEMM inside into a bf16 one (the
    reference's class-attention logits would drop to bf16 precision and dtype)."""
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 37, 24, generator=g), torch.randn(2, 37, 16, generator=g)
    q, k = torch.randn(2, 3, 37, 16, generator=g), torch.randn(2, 3, 37, 16, generator=g)
    want = tt_kernels.transform(x, metric, 9, k=2, backend=backend)
    want_score = tt_kernels.cls_attention(q, k, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tt_kernels.transform(x, metric, 9, k=2, backend=backend)
        score = tt_kernels.cls_attention(q, k, backend=backend)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[2].weight, want[2].weight)
    assert torch.equal(score, want_score)
