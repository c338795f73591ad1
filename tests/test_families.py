"""tt_kernels.patch on every model family it takes (tt_kernels.families), on tiny random models:
timm's VisionTransformer, HF transformers' ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP,
and open_clip's VisionTransformer; and the same weights in two frameworks patched alike."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tt_kernels
from tt_kernels.families import family_of

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

SIDE, PATCH, WIDTH, DEPTH, HEADS = 64, 8, 48, 3, 3  # 64 patches
HF = dict(image_size=SIDE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=DEPTH,
          num_attention_heads=HEADS, intermediate_size=4 * WIDTH, layer_norm_eps=1e-6)


def _hf(model, config, **extra):
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**HF, **extra))


def _clip_model():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=HF,
                                                          projection_dim=16))


MODELS = {
    "timm": lambda: timm_vit.VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH,
                                               depth=DEPTH, num_heads=HEADS, num_classes=5),
    "timm-siglip-map": lambda: timm_vit.VisionTransformer(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=5, class_token=False, global_pool="map"),
    "timm-eva02": lambda: timm.models.eva.Eva(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=5, use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True,
        ref_feat_shape=(8, 8)),
    "timm-rope-registers-avg": lambda: timm.models.eva.Eva(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=5, use_rot_pos_emb=True, num_reg_tokens=1, class_token=False,
        global_pool="avg", init_values=1e-5),
    "hf-vit": _hf("ViTForImageClassification", "ViTConfig", num_labels=5),
    "hf-vit-model": _hf("ViTModel", "ViTConfig"),
    "hf-deit-teacher": _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5),
    "hf-dinov2": _hf("Dinov2Model", "Dinov2Config"),
    "hf-dinov2-registers": _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                               num_register_tokens=4),
    "hf-clip-vision": _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16),
    "hf-clip": _clip_model,
    "hf-siglip": _hf("SiglipVisionModel", "SiglipVisionConfig"),
    "hf-vit-eager": _hf("ViTModel", "ViTConfig", attn_implementation="eager"),
    "open_clip": lambda: open_clip.transformer.VisionTransformer(
        image_size=SIDE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4,
        output_dim=16),
    "open_clip-avg": lambda: open_clip.transformer.VisionTransformer(
        image_size=SIDE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4,
        output_dim=16, pool_type="avg"),
}


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _images(batch=2):
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _forward(model, x):
    """The model's image output: its logits, pooled or projected features."""
    if isinstance(model, transformers.CLIPModel):
        out = model.get_image_features(pixel_values=x)
    else:
        out = model(x) if not isinstance(model, transformers.PreTrainedModel) else \
            model(pixel_values=x)
    if torch.is_tensor(out):
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out.last_hidden_state


def _method(name):
    """SigLIP has no class token, so no importance score: its models reduce as ToMe does."""
    return "spread"


@pytest.mark.parametrize("name", MODELS)
def test_nothing_to_remove_is_the_unpatched_model(name):
    model, x = _model(name), _images()
    with torch.no_grad():
        want = _forward(model, x)
        got = _forward(tt_kernels.patch(copy.deepcopy(model), r=0), x)
    assert torch.equal(got, want)  # the same modules, no bias, the module's own attention


@pytest.mark.parametrize("name", MODELS)
def test_a_block_with_nothing_to_do_runs_unpatched(name, monkeypatch):
    """Before the first block that removes tokens every block runs its own forward: the family's
    patched attention is not called, and no queries and keys are kept; from that block on, every
    block runs patched (its tokens may be merged ones even where it removes none)."""
    model, x = _model(name), _images()
    family = type(family_of(model))
    patched, kept = [], {}
    attend = family.attend
    monkeypatch.setattr(family, "attend", staticmethod(
        lambda block, *args, **kwargs: patched.append(block.token_reduction_index) or
        attend(block, *args, **kwargs)))
    tt_kernels.patch(model, r={1: 4}, method=_method(name))
    tr = model.token_reduction

    def keeps(module, args, out):  # after a block's attention module
        kept.setdefault(module.block_index, tr._q is not None)

    for i, block in enumerate(family_of(model).blocks):
        attention = getattr(block, block.token_reduction_parts.attention)
        attention.block_index = i
        attention.register_forward_hook(keeps)
    with torch.no_grad():
        _forward(model, x)
    assert tr.schedule == [0, 4, 0]
    assert patched == [1, 2]
    assert kept[0] is False


@pytest.mark.parametrize("name", MODELS)
def test_flops_budget_is_met_as_flop_counter_mode_counts_it(name):
    """Our counter (vit_flops) and torch's FlopCounterMode on the patched forward agree exactly,
    and the patched forward meets the 60% budget by FlopCounterMode's count."""
    model, x = _model(name), _images(1)
    # FlopCounterMode's module tracker fails on timm's attention pool when its latent queries
    # (expanded from a parameter) require grad: count an inference model's FLOPs
    model.requires_grad_(False)

    def counted(m):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            _forward(m, x)
        return counter.get_total_flops()

    full = counted(model)
    tt_kernels.patch(model, flops=0.6, method=_method(name))
    tr, family = model.token_reduction, family_of(model)
    patched = counted(model)
    want = tt_kernels.vit_flops(model, family.n0, tr.schedule, None, tr.by_importance,
                                tr.method, tr.metric_dim(model))
    if isinstance(model, transformers.CLIPModel):  # get_image_features: the text tower idle
        assert full == tt_kernels.vit_flops(model, family.n0, [0] * DEPTH)
    assert patched == want
    assert 0.5 * full < patched <= 0.6 * full


@pytest.mark.parametrize("name", MODELS)
def test_restore_brings_the_tokens_back_to_the_full_grid(name):
    model, x = _model(name), _images()
    family = family_of(model)
    tokens = []
    handle = family.blocks[-1].register_forward_hook(lambda m, i, out: tokens.append(
        out[0] if isinstance(out, tuple) else out))
    tt_kernels.patch(model, flops=0.6, method=_method(name), record=True)
    with torch.no_grad():
        _forward(model, x)
    handle.remove()
    tr = model.token_reduction
    assert tokens[0].shape[1] == family.n0 - sum(tr.schedule)
    full = tt_kernels.restore(tokens[0], tr.steps)
    assert full.shape == (2, family.n0, WIDTH)


class _FusedAttentionCalls(TorchDispatchMode):
    """Counts the calls of fused attention kernels (SDPA's, nn.MultiheadAttention's)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls += "scaled_dot_product" in name or "native_multi_head_attention" in name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [n for n in MODELS if "eager" not in n])
def test_the_fused_attention_is_kept(name):
    model, x = _model(name), _images()

    def calls(m):
        with _FusedAttentionCalls() as mode, torch.no_grad():
            _forward(m, x)
        return mode.calls

    want = calls(model)
    assert want >= DEPTH
    assert calls(tt_kernels.patch(model, flops=0.6, method=_method(name))) == want


@pytest.mark.parametrize("name", ["hf-vit", "open_clip", "timm-eva02"])
def test_compiles(name):
    model, x = _model(name), _images()
    tt_kernels.patch(model, flops=0.6)
    with torch.no_grad():
        want = _forward(model, x)
        got = _forward(torch.compile(model), x)
    # Inductor fuses the norms and GELU differently: a few fp32 roundings per block (D = 48)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["hf-vit", "open_clip", "timm"])
def test_settings_and_unpatch(name):
    model, x = _model(name), _images()
    with torch.no_grad():
        want = _forward(model, x)
        tt_kernels.patch(model, r=8)
        model.token_reduction.k = 2  # a setting changed at run time is taken by the next forward
        reduced = _forward(model, x)
        tt_kernels.unpatch(model)
        assert torch.equal(_forward(model, x), want)
    assert not torch.equal(reduced, want)
    assert not any(hasattr(m, "token_reduction") for m in model.modules())


def test_the_optional_families_are_optional():
    """Without transformers and open_clip (a None in sys.modules makes any import of them raise
    ImportError), tt_kernels imports and patches and runs a timm model."""
    code = ("import sys; sys.modules['transformers'] = sys.modules['open_clip'] = None\n"
            "import timm.models.vision_transformer as v, torch, tt_kernels\n"
            "m = tt_kernels.patch(v.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, "
            "depth=2, num_heads=2).eval(), r=4)\n"
            "print(tuple(m(torch.randn(1, 3, 32, 32)).shape))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 1000)"


def test_refusals_name_what_is_refused():
    with pytest.raises(TypeError, match="takes timm Eva .*, timm VisionTransformer, HF transformers"):
        tt_kernels.patch(nn.Linear(2, 2), r=1)
    tiny = dict(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=1, num_heads=HEADS)
    with pytest.raises(NotImplementedError, match="rope_mixed"):
        tt_kernels.patch(timm.models.eva.Eva(**tiny, use_rot_pos_emb=True, rope_type="mixed"),
                         r=1)
    with pytest.raises(NotImplementedError, match="Beit is not supported: .* relative position"):
        tt_kernels.patch(timm.models.beit.Beit(**tiny), r=1)
    dinov2_head = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**HF))
    with pytest.raises(NotImplementedError, match="averages the patch tokens"):
        tt_kernels.patch(dinov2_head, r=1)
    flash = transformers.ViTModel(transformers.ViTConfig(**HF))
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="takes no additive bias"):
        tt_kernels.patch(flash, r=1)
    with pytest.raises(ValueError, match="`attention` must be one of .* for a HF"):
        tt_kernels.patch(_model("hf-vit"), r=1, attention="column")
    timm_model = tt_kernels.patch(_model("timm"), r=1)
    with pytest.raises(NotImplementedError, match="no attention mask"):
        timm_model.blocks[0](torch.randn(1, 65, WIDTH), attn_mask=torch.zeros(1, 1, 65, 65))
    siglip = _model("hf-siglip")
    with pytest.raises(ValueError, match="no class token"):
        tt_kernels.patch(siglip, r=1, method="prune")


@pytest.mark.parametrize("settings", [dict(flops=0.6), dict(r={1: 6})])
def test_a_merged_token_takes_the_mean_rotary_embedding_of_its_patches(settings):
    """Eva's rotary embeddings ride along with the tokens: after the forward, each token's row is
    what every step's T makes of the patches' rows (a size-weighted mean; rows of tokens that
    nothing joined unchanged), and the last blocks attended with them; also where the first
    block removes none (and runs unpatched)."""
    model, x = _model("timm-eva02"), _images()
    rope = model.rope.get_embed()  # [patches, 2 * head width]
    tt_kernels.patch(model, **settings, record=True)
    with torch.no_grad():
        _forward(model, x)
    tr = model.token_reduction
    want = torch.cat([torch.zeros(2, 1, rope.shape[1]), rope.expand(2, -1, -1)], 1)
    size = torch.ones(2, want.shape[1])
    for T in tr.steps:
        want, size = tt_kernels.apply(want, T, size, mode="mean", backend="reference")
    torch.testing.assert_close(tr.carried["rope"], want, rtol=0, atol=1e-6)  # fp32 sums of 64
    single = (size == 1)[:, 1:]  # tokens still one patch each keep a patch's own row exactly
    rows = tr.carried["rope"][:, 1:][single]
    assert (rows[:, None, :] == rope[None]).all(-1).any(-1).all()
    # why the mean: a query's logit with a key rotated by the mean embedding is the mean of its
    # logits with the key at each patch's position (the rotation is linear in the embedding)
    from timm.layers import apply_rot_embed_cat

    q, k = torch.randn(2, HEADS, 1, WIDTH // HEADS, dtype=torch.float64).unbind(0)
    patches = rope[:5].double()
    merged = apply_rot_embed_cat(k, patches.mean(0, keepdim=True))
    torch.testing.assert_close((q * merged).sum(-1),
                               (q * apply_rot_embed_cat(k, patches)).sum(-1).mean(-1, True))


# The same weights in two frameworks --------------------------------------------------------------

def _hf_vit_linears(layer):
    """An HF ViT layer's q, k, v, output, fc1, fc2 linears (transformers 5.x or 4.x names)."""
    a = layer.attention
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.fc1, layer.mlp.fc2
    return (a.attention.query, a.attention.key, a.attention.value, a.output.dense,
            layer.intermediate.dense, layer.output.dense)


def _timm_from_hf_vit(hf):
    """timm's ViT holding an HF ViTModel's weights (q, k, v stacked into qkv)."""
    from tt_kernels.families.hf import _layers

    timm_model = timm_vit.VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH,
                                            depth=DEPTH, num_heads=HEADS, num_classes=0).eval()
    e = hf.embeddings
    state = {"cls_token": e.cls_token, "pos_embed": e.position_embeddings,
             "patch_embed.proj.weight": e.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": e.patch_embeddings.projection.bias,
             "norm.weight": hf.layernorm.weight, "norm.bias": hf.layernorm.bias}
    for i, layer in enumerate(_layers(hf)):
        q, k, v, o, fc1, fc2 = _hf_vit_linears(layer)
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": layer.layernorm_before.weight,
                  b + "norm1.bias": layer.layernorm_before.bias,
                  b + "attn.qkv.weight": torch.cat([q.weight, k.weight, v.weight]),
                  b + "attn.qkv.bias": torch.cat([q.bias, k.bias, v.bias]),
                  b + "attn.proj.weight": o.weight, b + "attn.proj.bias": o.bias,
                  b + "norm2.weight": layer.layernorm_after.weight,
                  b + "norm2.bias": layer.layernorm_after.bias,
                  b + "mlp.fc1.weight": fc1.weight, b + "mlp.fc1.bias": fc1.bias,
                  b + "mlp.fc2.weight": fc2.weight, b + "mlp.fc2.bias": fc2.bias}
    timm_model.load_state_dict(state)
    return timm_model


def _timm_from_open_clip(oc):
    """timm's CLIP-style ViT (a norm before the blocks, no patch bias) holding open_clip's."""
    from functools import partial

    timm_model = timm_vit.VisionTransformer(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=0, pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    state = {"cls_token": oc.class_embedding[None, None], "pos_embed": oc.positional_embedding[None],
             "patch_embed.proj.weight": oc.conv1.weight,
             "norm_pre.weight": oc.ln_pre.weight, "norm_pre.bias": oc.ln_pre.bias,
             "norm.weight": oc.ln_post.weight, "norm.bias": oc.ln_post.bias}
    for i, block in enumerate(oc.transformer.resblocks):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": block.ln_1.weight, b + "norm1.bias": block.ln_1.bias,
                  b + "attn.qkv.weight": block.attn.in_proj_weight,
                  b + "attn.qkv.bias": block.attn.in_proj_bias,
                  b + "attn.proj.weight": block.attn.out_proj.weight,
                  b + "attn.proj.bias": block.attn.out_proj.bias,
                  b + "norm2.weight": block.ln_2.weight, b + "norm2.bias": block.ln_2.bias,
                  b + "mlp.fc1.weight": block.mlp.c_fc.weight, b + "mlp.fc1.bias": block.mlp.c_fc.bias,
                  b + "mlp.fc2.weight": block.mlp.c_proj.weight,
                  b + "mlp.fc2.bias": block.mlp.c_proj.bias}
    timm_model.load_state_dict(state)
    return timm_model


@pytest.mark.parametrize("other", ["hf-vit-model", "open_clip"])
@pytest.mark.parametrize("method", ["spread", "tome"])
def test_the_same_weights_in_two_frameworks_agree(other, method):
    """Patched alike, timm's ViT and the same weights in HF's ViT or open_clip's choose the same
    T in every block and give the same class token, to fp32 rounding: the frameworks project
    q, k, v in one or three products, which rounds them differently in the last bits."""
    model, x = _model(other), _images()
    if other.startswith("hf"):
        timm_model = _timm_from_hf_vit(model)

        def class_token():
            return model(pixel_values=x).last_hidden_state[:, 0]
    else:
        timm_model, model.proj = _timm_from_open_clip(model), None  # its pooled class token

        def class_token():
            return model(x)
    with torch.no_grad():
        want, got = timm_model.forward_features(x)[:, 0], class_token()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # unpatched: the mapping
        settings = dict(flops=0.6, method=method, record=True)
        tt_kernels.patch(timm_model, **settings)
        tt_kernels.patch(model, **settings)
        want, got = timm_model.forward_features(x)[:, 0], class_token()
    for a, b in zip(timm_model.token_reduction.steps, model.token_reduction.steps):
        assert torch.equal(a.dst, b.dst)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
