"""tt_kernels.patch on tiny random timm ViTs of every supported flavour."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import tt_kernels

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
FLAVOURS = {
    "deit": lambda: VisionTransformer(**TINY),
    "deit-distilled": lambda: VisionTransformerDistilled(**TINY),
    "augreg-avg-pool": lambda: VisionTransformer(**TINY, global_pool="avg", class_token=False),
    "dinov2-layerscale": lambda: VisionTransformer(**TINY, init_values=1e-5),
    "registers": lambda: VisionTransformer(**TINY, reg_tokens=4, no_embed_class=True),
    "qk-norm": lambda: VisionTransformer(**TINY, qk_norm=True),
    "dynamic-size": lambda: VisionTransformer(**TINY, dynamic_img_size=True),
}


def _model(flavour):
    torch.manual_seed(0)
    return FLAVOURS[flavour]().eval()


def _images(batch=2, side=64):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_nothing_to_remove_is_the_unpatched_model(flavour):
    model = _model(flavour)
    x = _images()
    with torch.no_grad():
        want = model(x)
        got = tt_kernels.patch(copy.deepcopy(model), r=0)(x)
    assert torch.equal(got, want)  # no mask, the same ops


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("settings", [dict(r=6), dict(r=6, method="tome"), dict(r=6, k=2),
                                      dict(r=6, method="prune"), dict(r=5, method="evit"),
                                      dict(r=6, source="mix")])
def test_reduced_forward_shapes_sizes_and_restore(flavour, settings):
    model = _model(flavour)
    scored = settings.get("method") in ("prune", "evit") or "source" in settings
    if model.num_prefix_tokens == 0 and scored:  # no class token to take the importance from
        with pytest.raises(ValueError, match="class token"):
            tt_kernels.patch(model, **settings)
        return
    model = tt_kernels.patch(model, **settings, record=True)
    x = _images()
    with torch.no_grad():
        logits = model(x)
        tokens = model.forward_features(x)
    tr = model.token_reduction
    prefix = model.num_prefix_tokens
    n0 = model.patch_embed.num_patches + prefix
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert tokens.shape == (2, n0 - sum(tr.schedule), 48)
    assert len(tr.steps) == sum(r > 0 for r in tr.schedule) == len(model.blocks)
    expected = n0 - (settings["r"] * len(model.blocks) if settings.get("method") == "prune" else 0)
    torch.testing.assert_close(tr.size.sum(1), torch.full((2,), float(expected)))
    restored = tt_kernels.restore(tokens, tr.steps)
    assert restored.shape == (2, n0, 48)
    # prefix tokens are never merged: they come back as they are
    torch.testing.assert_close(restored[:, :prefix], tokens[:, :prefix])


def test_dynamic_image_size_follows_the_token_count():
    model = tt_kernels.patch(_model("dynamic-size"), flops=0.7)
    with torch.no_grad():
        model(_images(side=64))
        small = list(model.token_reduction.schedule)
        model(_images(side=96))
    assert model.token_reduction.schedule != small
    assert sum(model.token_reduction.schedule) > sum(small)


def test_fused_attention_stays_on(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = tt_kernels.patch(_model("deit"), r=6)
    assert all(block.attn.fused_attn for block in model.blocks)
    with torch.no_grad():
        model(_images())
    assert len(calls) == len(model.blocks)
    assert calls[0] is None  # all sizes 1: no mask at all
    assert all(mask is not None and mask.shape[-1] == n for mask, n in
               zip(calls[1:], [59, 53, 47]))  # +log(size) per key after each step


def test_proportional_attention_is_exact():
    """A token standing for s patches is attended to like s identical copies of it."""
    model = _model("deit")
    block = model.blocks[0]
    torch.manual_seed(2)
    x = torch.randn(1, 5, 48)
    copies = torch.cat([x, x[:, 4:].expand(1, 2, 48)], 1)  # token 4 three times
    size = torch.tensor([[1.0, 1, 1, 1, 3]])
    with torch.no_grad():
        want = block.attn(copies)[:, :5]
        got = block.attn(x, attn_mask=size.log()[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_schedules_and_runtime_changes():
    model = tt_kernels.patch(_model("deit"), r=[0, 10, 0, 5])
    with torch.no_grad():
        model(_images())
        assert model.token_reduction.schedule == [0, 10, 0, 5]
        model.token_reduction.r = {2: 20}
        model(_images())
        assert model.token_reduction.schedule == [0, 0, 20, 0]
        model.token_reduction.r = 40  # capped at ToMe's bipartite limit, step by step
        model(_images())
        assert model.token_reduction.schedule == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="`r`"):
        model.token_reduction.r = [1, 2]
        model(_images())


@pytest.mark.parametrize("settings", [dict(), dict(method="tome"), dict(metric="keys_mean")])
def test_flops_budget_is_met_from_below(settings):
    model = _model("deit")
    full = tt_kernels.vit_flops(model, 65, [0] * 4)
    patched = tt_kernels.patch(model, flops=0.7, **settings)
    with torch.no_grad():
        patched(_images())
    tr = patched.token_reduction
    schedule = tr.schedule
    assert tr.schedule_flops(model, 65) <= 0.7 * full
    assert schedule[-1] == 0  # the last block's removals would save only its own MLP
    tr.schedule = [max(r - 1, 0) for r in schedule]
    assert tr.schedule_flops(model, 65) > 0.7 * full
    # the similarity is counted at the metric's width: full keys cost more than one head's
    width = 48 if settings.get("method") != "tome" and "metric" not in settings else 16
    assert tr.metric_dim(model) == width
    # torch's counter counts the same through the op's formula (a per-head metric for one head's
    # width), as the patched forward runs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        patched(_images(1))
    assert counter.get_total_flops() == tr.schedule_flops(model, 65)


def test_unpatch_restores_the_model():
    model = _model("registers")
    x = _images()
    with torch.no_grad():
        want = model(x)
        model = tt_kernels.unpatch(tt_kernels.patch(model, r=6))
        assert not hasattr(model, "token_reduction")
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_size_weighted_average_pool():
    model = tt_kernels.patch(_model("augreg-avg-pool"), r=6)
    with torch.no_grad():
        tokens = model.forward_features(_images())
        pooled = model.pool(tokens)
    size = model.token_reduction.size
    torch.testing.assert_close(pooled, (tokens * size[..., None]).sum(1) / size.sum(1)[:, None])
    assert not torch.allclose(pooled, tokens.mean(1))


def test_unsupported_models_are_refused():
    with pytest.raises(NotImplementedError, match="global_pool"):
        tt_kernels.patch(VisionTransformer(**TINY, global_pool="max"))
    with pytest.raises(TypeError):
        tt_kernels.patch(torch.nn.Linear(2, 2))
