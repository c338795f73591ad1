"""timm's Eva: EVA-02 and the ViTs with rotary position embeddings (vit_*_rope_*).

Its blocks rotate q and k by each patch's rotary embedding (RoPE) after the q/k norms. A merged
token's rotary embedding is the size-weighted mean of its patches' embeddings, carried through
every step's T as the tokens are (TokenReduction.carried). The rotation is linear in the
embedding, so the logit of any query with a merged key is the mean of the logits the same key
content would get at each of its patches' positions: the merged token attends and is attended
to from the average of where its patches were. (Keeping one patch's position instead, say the
kept token's, would move every merged patch to its neighbour's place.) Kept tokens that nothing
joined keep their own embedding exactly. Everything else is timm's VisionTransformer's
(timm_vit.py).
"""
import torch

from .. import attention
from .family import Parts
from .timm_vit import TimmViT


class TimmEva(TimmViT):
    name = "timm Eva (EVA-02, RoPE ViTs)"
    parts = Parts("norm1", "attn", ("gamma_1", "drop_path1"), "norm2", "mlp",
                  ("gamma_2", "drop_path2"))
    forms = ("auto", "mask")
    block_class = "EvaBlock"

    @staticmethod
    def owns(model):
        return type(model).__name__ == "Eva" and type(model).__module__.startswith("timm.")

    def __init__(self, model):
        if getattr(model, "rope_mixed", False):
            raise NotImplementedError("timm's Eva with rope_mixed (a rotary embedding per block "
                                      "and head) is not supported")
        super().__init__(model)

    @staticmethod
    def attend(block, x, size, form, rope=None, **call):
        tr = block.token_reduction
        if rope is not None and size is None:
            # the forward's first reducing block (the blocks before it ran unpatched): the
            # patches' embeddings, a row per token (the prefix's unused)
            rows = torch.zeros(x.shape[0], tr.prefix + rope.shape[0], rope.shape[1],
                               dtype=rope.dtype, device=rope.device)
            rows[:, tr.prefix:] = rope
            tr.carried["rope"] = rows
        if size is None:
            return block.attn(x, rope=rope)  # no token merged yet: the module's own call
        if rope is not None:
            rope = tr.carried["rope"][:, None, tr.prefix:]  # [B, 1 (every head), N', dim]
        return block.attn(x, rope=rope,
                          attn_mask=attention.size_bias(size, attention.q_dtype(x)))
