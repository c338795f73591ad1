"""Exact FLOPs of a timm ViT under a reduction schedule, and the schedule that meets a budget.

Counts 2 x the multiply-accumulates of every matrix product (patch embedding, qkv, QK^T, AV,
projection, MLP, head) and of the reduction's own similarity (N^2 x head_dim per step); norms,
softmax and activations are left out, as fvcore and ToMe do.
"""
from .api import max_r


def _linear(layer):
    return layer.in_features * layer.out_features


def step_sizes(n0, schedule, prefix=1, by_importance=False, method="transform"):
    """Token counts entering each block and the r actually removed after its attention; r is
    capped at what the construction allows for the tokens at hand."""
    n, sizes = n0, []
    for r in schedule:
        r = min(r, max_r(method, n, prefix, by_importance))
        sizes.append((n, r))
        n -= r
    return sizes


def vit_flops(model, n0, schedule, prefix=None, by_importance=False, method="transform"):
    """FLOPs of one image through `model` (timm VisionTransformer) removing schedule[i] tokens in
    block i (between its attention and its MLP)."""
    prefix = model.num_prefix_tokens if prefix is None else prefix
    pe = model.patch_embed.proj
    patches = n0 - prefix
    macs = patches * pe.out_channels * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
    for block, (n, r) in zip(model.blocks, step_sizes(n0, schedule, prefix, by_importance, method)):
        attn = block.attn
        macs += n * (_linear(attn.qkv) + _linear(attn.proj))
        macs += 2 * n * n * attn.num_heads * attn.head_dim
        if r:
            macs += n * n * attn.head_dim
        m = n - r
        macs += m * (_linear(block.mlp.fc1) + _linear(block.mlp.fc2))
    if hasattr(model.head, "in_features"):
        macs += _linear(model.head)
    return 2 * macs


def constant_r_for_budget(model, n0, fraction, prefix=None, by_importance=False,
                          method="transform"):
    """The smallest constant r whose FLOPs are at most `fraction` of the unreduced model's (the
    largest r allowed when no r reaches it)."""
    depth = len(model.blocks)
    full = vit_flops(model, n0, [0] * depth, prefix)
    for r in range(n0):
        if vit_flops(model, n0, [r] * depth, prefix, by_importance, method) <= fraction * full:
            return r
    return n0
