"""timm's VisionTransformer (DeiT, DINOv2, CLIP, SigLIP, ...).

Queries and keys are read at the attention's q_norm / k_norm (identities unless the model
normalises them), after the fused qkv projection; the size bias enters timm's own Attention in
any form of tt_kernels.attention; average pooling is size-weighted, and the attention-pool head
(global_pool="map", SigLIP) attends over the merged tokens with the same bias as the blocks.
"""
from .. import attention
from .family import (Family, Parts, attention_pool_macs, capture_output, conv_macs, linear_macs,
                     replace_method, size_weighted_mean)


# Models of timm that are not its VisionTransformer with pre-norm Blocks, and why.
REFUSED = {
    "Beit": "its attention adds a relative position bias indexed by the full patch grid, which "
            "merged tokens no longer form",
    "NaFlexVit": "it packs images of several sizes behind a patch mask, and patch() reduces one "
                 "full grid per image",
}


def _pool(self, x, pool_type=None):
    """timm's pool where a merged token counts as many patches as it holds: a size-weighted
    average, and the attention pool's logits +log(size) as in every block."""
    pool_type = self.global_pool if pool_type is None else pool_type
    size = self.token_reduction.size
    attn_pool = getattr(self, "attn_pool", None)  # older timm has none
    if size is None or (pool_type != "avg" and attn_pool is None):
        return type(self).pool(self, x, pool_type)
    p = self.num_prefix_tokens
    x, size = (x, size) if getattr(self, "pool_include_prefix", False) else \
        (x[:, p:], size[:, p:])
    if attn_pool is not None:
        return attn_pool(x, attn_mask=attention.size_bias(size, attention.q_dtype(x)))
    return size_weighted_mean(x, size)


def check_blocks(blocks, parts, kind):
    """Every block has the parts `parts` names and is of class `kind`."""
    for i, block in enumerate(blocks):
        if type(block).__name__ != kind:
            raise TypeError(f"block {i} is a {type(block).__name__}: only timm's pre-norm {kind} "
                            "is supported")
        for name in (parts.norm1, parts.attention, *parts.after_attention, parts.norm2,
                     parts.mlp, *parts.after_mlp):
            if not hasattr(block, name):
                raise TypeError(f"block {i} ({kind}) has no `{name}`")


class TimmViT(Family):
    name = "timm VisionTransformer"
    parts = Parts("norm1", "attn", ("ls1", "drop_path1"), "norm2", "mlp", ("ls2", "drop_path2"))
    forms = attention.FORMS
    block_class = "Block"

    @staticmethod
    def owns(model):  # timm's, or a model built like its VisionTransformer
        return type(model).__module__.startswith("timm.") or (
            hasattr(model, "blocks") and hasattr(model, "patch_embed"))

    def __init__(self, model):
        super().__init__(model)
        kind = type(model).__name__
        if kind in REFUSED:
            raise NotImplementedError(f"timm's {kind} is not supported: {REFUSED[kind]}")
        if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
            raise TypeError(f"tt_kernels.patch expects a timm VisionTransformer, got {kind}")
        pool = getattr(model, "attn_pool", None)
        if pool is not None and (type(pool).__name__ != "AttentionPoolLatent" or
                                 pool.pos_embed is not None):
            raise NotImplementedError(f"the attention pool {type(pool).__name__} is not "
                                      "supported (only AttentionPoolLatent without positions)")
        if pool is None and model.global_pool not in ("token", "avg", ""):
            raise NotImplementedError(f"global_pool={model.global_pool!r} is not supported: use "
                                      "'token', 'avg' or 'map'")
        check_blocks(model.blocks, self.parts, self.block_class)
        self.blocks = list(model.blocks)
        self.prefix = model.num_prefix_tokens
        self.n0 = model.patch_embed.num_patches + self.prefix
        self.patch_size = model.patch_embed.patch_size[0]
        attn = model.blocks[0].attn
        self.heads = (attn.num_heads, attn.head_dim)

    @staticmethod
    def attend(block, x, size, form, **call):
        return attention.attend(block.attn, x, size, form)

    def features(self, x):
        tokens = self.model.forward_features(x)
        return tokens, self.model.forward_head(tokens, pre_logits=True)

    def install(self, tr):
        return [capture_output(norm, tr, name) for block in self.blocks
                for norm, name in ((block.attn.q_norm, "_q"), (block.attn.k_norm, "_k"))] + [
            replace_method(self.model, "pool", _pool)]

    def embed_macs(self, patches):
        return conv_macs(self.model.patch_embed.proj, patches)

    def tail_macs(self, n):
        macs = linear_macs(self.model.head)
        pool = getattr(self.model, "attn_pool", None)
        if pool is None:
            return macs
        tokens = n if getattr(self.model, "pool_include_prefix", False) else n - self.prefix
        per_query = sum(linear_macs(m) for m in (pool.q, pool.proj, pool.mlp) if m is not None)
        return macs + attention_pool_macs(pool.latent_len, tokens, pool.kv.out_features // 2,
                                          per_query, linear_macs(pool.kv))
