"""What patch() needs to know of a model family, and nothing else.

Every family's blocks are pre-norm residual blocks,

    x = x + after_attention(attention(norm1(x)))
    x = x + after_mlp(mlp(norm2(x)))

and patch() reduces the tokens between the two lines with one step shared by every family
(patch.py). A family says where its blocks are and what their parts are called (Parts), how its
attention takes proportional attention's size bias (attend), where its queries and keys are read
(install) and what its matrix products cost (the FLOPs counter, flops.py).
"""
import types
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Parts:
    """Attribute names (dotted for a part of a part) of a block's parts; the after_ parts run in
    order on a branch's output (a module is called, a tensor, a layer scale kept as a bare
    parameter, multiplies)."""
    norm1: str
    attention: str
    after_attention: tuple
    norm2: str
    mlp: str
    after_mlp: tuple
    tuple_output: bool = False  # the block returns (tokens,) (transformers 4.x)


def linear_macs(module):
    """Multiply-accumulates per token of every linear map inside `module` (nn.MultiheadAttention
    keeps its input projection as a bare weight)."""
    macs = sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))
    return macs + sum(m.in_proj_weight.numel() for m in module.modules()
                      if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None)


def conv_macs(conv, patches):
    """Multiply-accumulates of a patch embedding `conv` over `patches` patches."""
    return patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * \
        conv.kernel_size[1] // conv.groups


def attention_pool_macs(queries, tokens, width, per_query, per_token):
    """An attention-pool head (a few learned queries attending over the tokens): its linear maps
    per query and per token, and the queries' attention over the tokens."""
    return queries * per_query + tokens * per_token + 2 * queries * tokens * width


class Undo:
    """A handle whose remove() undoes what install() did (like a hook's RemovableHandle)."""

    def __init__(self, undo):
        self.remove = undo


def replace_method(obj, name, function):
    """Binds `function` as obj.<name> (an instance attribute); the handle deletes it again."""
    setattr(obj, name, types.MethodType(function, obj))
    return Undo(lambda: delattr(obj, name))


class Family:
    """One model of a family, as patch() and the FLOPs counter see it. A subclass sets, in
    __init__ (which raises TypeError / NotImplementedError saying what it cannot take):

    blocks      the residual blocks, in order
    prefix      tokens before the patches that never leave (class, distillation, registers)
    n0          tokens entering the first block at the model's own image size
    patch_size  pixels on a side of a patch
    heads       (number of heads, head width) of the blocks' attention
    forms       the attention forms (tt_kernels.attention.FORMS) its attention can take
    """
    name = "model"
    parts = None  # Parts, where every block of the family has the same (else parts_of)
    forms = ("auto", "mask", "cudnn")

    def __init__(self, model):
        self.model = model

    @staticmethod
    def owns(model):
        """Whether `model` is of this family (cheap: no optional package imported)."""
        raise NotImplementedError

    def parts_of(self, block):
        """The names of `block`'s parts (Parts)."""
        return self.parts

    @staticmethod
    def attend(block, x, size, form, **call):
        """The block's attention on its normalised input x [B, N, D], with the size bias of
        `size` [B, N] (None: every token one patch, the module's own call) in `form`; the
        queries and keys reach model.token_reduction (_q, _k, [B, H, N, Dh]) on the way.
        `call`: the keyword arguments the model gave the block besides masks (e.g. rope)."""
        raise NotImplementedError

    def install(self, tr):
        """Whatever besides the blocks' forward the family needs (query / key capture, size-
        weighted pooling); returns handles whose remove() undoes it."""
        raise NotImplementedError

    def features(self, x):
        """Images x -> (the final tokens [B, N', D], normalised as the model's heads read them,
        prefix tokens first; the pooled image feature the model's classifier or projection
        reads [B, C])."""
        raise NotImplementedError

    def tokens_at(self, side):
        """Tokens entering the first block for square images of `side` pixels."""
        return (side // self.patch_size) ** 2 + self.prefix

    # FLOPs, as multiply-accumulates (flops.py doubles them)
    def embed_macs(self, patches):
        raise NotImplementedError

    def block_macs(self, block):
        """(attention's linear maps, the rest of the block's: the MLP's) per token."""
        attention = linear_macs(getattr(block, self.parts_of(block).attention))
        return attention, linear_macs(block) - attention

    def tail_macs(self, n):
        """The products after the last block, with n tokens left (pooling, heads)."""
        raise NotImplementedError


def capture_output(module, tr, name, heads=None):
    """Makes `module`'s forward keep its output as tr.<name> on the way in a block that runs
    patched (tr._capture; with `heads`, a linear map's [B, N, H * Dh] as [B, H, N, Dh], a view:
    the layout of timm's q and k); returns the handle that undoes it. Not a forward hook, which
    sends every call of the module down Module.__call__'s slow path. Everything a call reads is
    the module's own, so a deep copy of the model captures into its own copy of tr."""
    def forward(self, *args, **kwargs):
        out = type(self).forward(self, *args, **kwargs)
        tr = self.token_reduction
        if tr._capture:  # not in a block that runs unpatched (patch._block_forward)
            setattr(tr, name,
                    out if heads is None else out.unflatten(-1, (heads, -1)).transpose(1, 2))
        return out

    module.token_reduction = tr
    restore = replace_method(module, "forward", forward)

    def undo():
        restore.remove()
        del module.token_reduction

    return Undo(undo)


def size_weighted_mean(x, size):
    """Mean over tokens [B, N, D] -> [B, D] where a token counts as the `size` patches it holds
    (size None: the plain mean)."""
    if size is None:
        return x.mean(1)
    w = size[..., None].to(x.dtype)
    return (x * w).sum(1) / w.sum(1)
