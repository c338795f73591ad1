"""tt_kernels: Token Transforming for Vision Transformers.

Every token reduction is an explicit sparse matrix T (N' x N) applied to the tokens, X' = T X.
``torch.ops.tt.*`` are the operators; the functions here are their Python entry points.
"""
from .api import (SparseT, apply, cls_attention, match, max_r, restore, transform,
                  untransform)
from .backends import build_info
from .flops import vit_flops
from .patch import patch, unpatch

__all__ = ["SparseT", "apply", "build_info", "cls_attention", "match", "max_r", "patch",
           "restore", "transform", "unpatch", "untransform", "vit_flops"]
