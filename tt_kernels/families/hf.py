"""HF transformers vision encoders (5.x, and 4.40 on): ViT, DeiT, DINOv2 (with registers), CLIP
and SigLIP.

In 5.x every attention module takes an additive attention_mask in the implementations that
compute the logits themselves ("sdpa", "eager"), so the size bias enters as that mask and the
model's own attention runs; flash attention 2 takes no bias and is refused. In 4.x CLIP's and
SigLIP's attention take the mask too; ViT's, DeiT's and DINOv2's take only a head mask (which
multiplies the probabilities), so where the bias is needed their attention runs from the
module's own weights through SDPA (query, key, value, SDPA, the output projection), as their
"sdpa" implementation does. Queries and keys are read at the query and key projections (before
any scaling, as timm's). SigLIP's attention-pool head attends over the merged tokens with the
same bias.
"""
import contextlib
import dataclasses

import torch.nn.functional as F

from .. import attention
from .family import (Family, Parts, Undo, attention_pool_macs, capture_output, conv_macs,
                     linear_macs, replace_method)

_VIT = Parts("layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",))
_DINOV2 = Parts("norm1", "attention", ("layer_scale1", "drop_path"), "norm2", "mlp",
                ("layer_scale2", "drop_path"))
_CLIP = Parts("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ())
LAYERS = {"ViTLayer": _VIT, "DeiTLayer": _VIT, "Dinov2Layer": _DINOV2,
          "Dinov2WithRegistersLayer": _DINOV2, "CLIPEncoderLayer": _CLIP,
          "SiglipEncoderLayer": _CLIP}
# transformers 4.x: layers return a tuple; ViT's and DeiT's MLP is intermediate, then output's
# dense and dropout (its residual added by the block)
_VIT4 = Parts("layernorm_before", "attention", (), "layernorm_after", "intermediate",
              ("output.dense", "output.dropout"), tuple_output=True)
LAYERS4 = {name: _VIT4 if parts is _VIT else dataclasses.replace(parts, tuple_output=True)
           for name, parts in LAYERS.items()}

# The model classes taken: their heads read the class token(s) or attention-pool the tokens.
MODELS = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
          "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2WithRegistersModel",
          "CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "SiglipVisionModel",
          "SiglipModel")
REFUSED = {name: "its head averages the patch tokens without their sizes" for name in (
    "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")}
# Linear heads after the last block, each on one pooled token.
HEADS = ("pooler", "classifier", "cls_classifier", "distillation_classifier", "visual_projection")
BIAS_TAKEN = ("sdpa", "eager")  # attention implementations that add an attention_mask to logits


_CORES = ("vision_model", "vit", "deit", "dinov2")  # where a model keeps its vision encoder


def _vision_core_name(model):
    return next((name for name in _CORES if hasattr(model, name)), None)


def _vision_core(model):
    """The module that holds the embeddings and the layers (the vision tower of CLIP/SigLIP)."""
    name = _vision_core_name(model)
    return model if name is None else getattr(model, name)


def _layers(core):
    encoder = getattr(core, "encoder", core)
    return getattr(encoder, "layers", None) or getattr(encoder, "layer")


def _heads(attn):
    if hasattr(attn, "q_proj"):
        return getattr(attn, "num_heads", None) or attn.num_attention_heads, attn.head_dim
    return attn.attention.num_attention_heads, attn.attention.attention_head_size  # 4.x ViT


def _query_key(attn):
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj
    return attn.attention.query, attn.attention.key


def _self_attention_4(attn, x, bias):
    """transformers 4.x ViTAttention(x)[0] (DeiT's, DINOv2's alike) with the additive `bias`:
    its projections, SDPA, its output projection."""
    self = attn.attention
    q, k, v = (proj(x).unflatten(-1, (self.num_attention_heads, -1)).transpose(1, 2)
               for proj in (self.query, self.key, self.value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=self.dropout.p if self.training else 0.0)
    return attn.output(out.transpose(1, 2).flatten(2), x)


def _check_implementation(config):
    implementation = config._attn_implementation
    if implementation not in BIAS_TAKEN:
        raise NotImplementedError(
            f"attn_implementation={implementation!r} takes no additive bias, which "
            f"proportional attention needs once tokens are merged: load the model with "
            f"attn_implementation='sdpa' or 'eager'")


def _map_head_forward(self, hidden_state):
    """SiglipMultiheadAttentionPoolingHead.forward with the probe's attention over the tokens
    biased by log(size), as every layer's attention is."""
    size = self.token_reduction.size
    mask = None
    if size is not None:  # nn.MultiheadAttention's float mask: [B * heads, 1 query, N keys]
        bias = size.log().to(hidden_state.dtype)[:, None, None, :]
        mask = bias.expand(-1, self.attention.num_heads, 1, -1).flatten(0, 1)
    probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
    hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
    residual = hidden_state
    hidden_state = self.layernorm(hidden_state)
    hidden_state = residual + self.mlp(hidden_state)
    return hidden_state[:, 0]


def _map_head_macs(head, n):
    """The attention-pool head with n tokens: the probe's query, output projection and MLP, the
    tokens' keys and values, and the probe's attention over them."""
    d = head.attention.embed_dim
    return attention_pool_macs(1, n, d, d * d + linear_macs(head.attention.out_proj) +
                               linear_macs(head.mlp), 2 * d * d)


class HFVision(Family):
    name = "HF transformers vision model"

    @staticmethod
    def owns(model):
        return type(model).__module__.startswith("transformers.")

    def __init__(self, model):
        super().__init__(model)
        import transformers

        kind = type(model).__name__
        major, minor = map(int, transformers.__version__.split(".")[:2])
        if (major, minor) < (4, 40):
            raise NotImplementedError(f"tt_kernels.patch takes HF transformers 4.40 and later; "
                                      f"this is {transformers.__version__}")
        self.layers = LAYERS if major >= 5 else LAYERS4
        if kind in REFUSED:
            raise NotImplementedError(f"{kind} is not supported: {REFUSED[kind]}; patch its "
                                      f"encoder, model.{_vision_core_name(model)}, instead")
        if kind not in MODELS:
            raise TypeError(f"tt_kernels.patch takes these HF transformers models: "
                            f"{', '.join(MODELS)}; got {kind}")
        self.core = _vision_core(model)
        _check_implementation(self.core.config)
        self.blocks = list(_layers(self.core))
        for i, block in enumerate(self.blocks):
            if type(block).__name__ not in self.layers:
                raise TypeError(f"layer {i} is a {type(block).__name__}, not one of the layers "
                                f"taken ({', '.join(self.layers)})")
        embeddings = self.core.embeddings
        self.prefix = sum(hasattr(embeddings, name) for name in (
            "cls_token", "distillation_token", "class_embedding")) + getattr(
            self.core.config, "num_register_tokens", 0)
        patches = getattr(embeddings, "num_patches", None) or \
            embeddings.patch_embeddings.num_patches
        self.n0 = patches + self.prefix
        patch = self.core.config.patch_size
        self.patch_size = patch if isinstance(patch, int) else patch[0]
        self.heads = _heads(getattr(self.blocks[0], self.parts_of(self.blocks[0]).attention))
        self.map_head = getattr(self.core, "head", None)

    def parts_of(self, block):
        return self.layers[type(block).__name__]

    @staticmethod
    def attend(block, x, size, form, **call):
        attn = getattr(block, block.token_reduction_parts.attention)
        if size is None:
            return attn(x)[0]
        bias = attention.size_bias(size, attention.q_dtype(x))
        with attention.cudnn_kernel(x, "'auto' or 'mask'") if form == "cudnn" else \
                contextlib.nullcontext():
            if not hasattr(attn, "q_proj"):
                return _self_attention_4(attn, x, bias)
            _check_implementation(attn.config)
            return attn(x, attention_mask=bias)[0]

    def features(self, x):
        """The vision model's last hidden state and, as the pooled feature, its class token
        where it has one and no pooler layer of its own (ViT's pooler is a head), else its
        pooler output (CLIP's normalised class token, SigLIP's attention pool)."""
        out = self.core(pixel_values=x)
        tokens = out.last_hidden_state
        if self.prefix and (out.pooler_output is None or hasattr(self.core, "pooler")):
            return tokens, tokens[:, 0]
        return tokens, out.pooler_output

    def install(self, tr):
        handles = []
        heads = self.heads[0]
        for block in self.blocks:
            attn = getattr(block, self.parts_of(block).attention)
            handles += [capture_output(proj, tr, name, heads)
                        for proj, name in zip(_query_key(attn), ("_q", "_k"))]
        if self.map_head is not None:
            self.map_head.token_reduction = tr
            handles += [replace_method(self.map_head, "forward", _map_head_forward),
                        Undo(lambda: delattr(self.map_head, "token_reduction"))]
        return handles

    def embed_macs(self, patches):
        embeddings = self.core.embeddings
        conv = getattr(embeddings, "patch_embedding", None) or \
            embeddings.patch_embeddings.projection
        return conv_macs(conv, patches)

    def tail_macs(self, n):
        heads = {id(m): m for owner in (self.model, self.core) for m in
                 (getattr(owner, name, None) for name in HEADS) if m is not None}
        macs = sum(map(linear_macs, heads.values()))
        return macs + (_map_head_macs(self.map_head, n) if self.map_head is not None else 0)

