"""open_clip's VisionTransformer (e.g. open_clip.create_model("ViT-B-32").visual).

Its blocks attend with nn.MultiheadAttention, which keeps q and k to itself: a block whose step
reduces, or whose tokens are merged, runs the same attention from the module's own weights
(in_proj, SDPA, out_proj) so that q and k can be read and the size bias enter in any form of
tt_kernels.attention. Other blocks run their own forward (patch._block_forward). Average
pooling is size-weighted.
"""
import contextlib

import torch.nn.functional as F

from .. import attention
from .family import Family, Parts, conv_macs, replace_method, size_weighted_mean


def _global_pool(self, x):
    """open_clip's _global_pool with a size-weighted average."""
    size = self.token_reduction.size
    if self.pool_type != "avg" or size is None:
        return type(self)._global_pool(self, x)
    return size_weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]


def _attention(mha, x, size, form):
    """nn.MultiheadAttention(x, x, x) from its weights: q, k [B, H, N, Dh] and the output, with
    the size bias of `size` (None: none) in `form` ("mask", "column" or "cudnn")."""
    heads, head_dim = mha.num_heads, mha.head_dim
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).unflatten(
        -1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    dropout = mha.dropout if mha.training else 0.0
    if size is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    elif form == "column":
        qc, kc, vc, scale = attention.size_columns(q, k, v, size)
        out = F.scaled_dot_product_attention(qc, kc, vc, dropout_p=dropout,
                                             scale=scale)[..., :head_dim]
    else:
        bias = attention.size_bias(size, q.dtype)
        with attention.cudnn_kernel(x) if form == "cudnn" else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return q, k, mha.out_proj(out.transpose(1, 2).flatten(2))


class OpenClipViT(Family):
    name = "open_clip VisionTransformer"
    parts = Parts("ln_1", "attn", ("ls_1",), "ln_2", "mlp", ("ls_2",))
    forms = attention.FORMS

    @staticmethod
    def owns(model):
        return type(model).__module__.startswith("open_clip.") and hasattr(model, "transformer") \
            and hasattr(model, "conv1")

    def __init__(self, model):
        super().__init__(model)
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError("attentional pooling (CoCa's attn_pool) is not supported")
        if not model.transformer.batch_first:
            raise NotImplementedError("a transformer with batch_first=False is not supported")
        for i, block in enumerate(model.transformer.resblocks):
            if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
                raise TypeError(f"block {i} is a {type(block).__name__}: only open_clip's "
                                "self-attention ResidualAttentionBlock is supported")
        self.blocks = list(model.transformer.resblocks)
        self.prefix = 1  # the class token
        self.n0 = model.grid_size[0] * model.grid_size[1] + self.prefix
        self.patch_size = model.patch_size[0]
        mha = self.blocks[0].attn
        self.heads = (mha.num_heads, mha.head_dim)

    @staticmethod
    def attend(block, x, size, form, **call):
        tr = block.token_reduction
        tr._q, tr._k, out = _attention(block.attn, x, size, attention.resolve(form, x))
        return out

    def features(self, x):
        """Its forward's steps (open_clip.transformer.VisionTransformer.forward) keeping every
        token: ln_post on all of them, and the pooled feature as its forward returns it."""
        model = self.model
        tokens = model.transformer(model._embeds(x))
        pooled, _ = model._pool(tokens)
        if model.proj is not None:
            pooled = pooled @ model.proj
        return model.ln_post(tokens), pooled

    def install(self, tr):
        return [replace_method(self.model, "_global_pool", _global_pool)]

    def embed_macs(self, patches):
        return conv_macs(self.model.conv1, patches)

    def tail_macs(self, n):
        proj = self.model.proj
        return proj.numel() if proj is not None else 0
