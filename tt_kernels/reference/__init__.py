"""Pure-PyTorch reference of every operator, one file per op: readable, batched, and the ground
truth in tests. ``constructions`` is match.py itself (similarity, affinity, prune, evit, tome,
spread), whose name the op ``match`` takes here."""
from . import match as constructions
from .apply import apply
from .cls_attention import cls_attention
from .match import match
from .transform import transform
from .untransform import untransform

__all__ = ["apply", "cls_attention", "constructions", "match", "transform", "untransform"]
