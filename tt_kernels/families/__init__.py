"""The model families patch() takes, one module each (family.py says what a family provides)."""
from .family import Family
from .hf import HFVision
from .open_clip_vit import OpenClipViT
from .timm_eva import TimmEva
from .timm_vit import TimmViT

FAMILIES = (TimmEva, TimmViT, HFVision, OpenClipViT)  # the first that owns a model takes it


def family_of(model):
    """`model` as its family sees it; TypeError for a model of no family patch() takes, or the
    family's own error for what in the model it cannot take."""
    if isinstance(model, Family):
        return model
    for family in FAMILIES:
        if family.owns(model):
            return family(model)
    raise TypeError(f"tt_kernels.patch takes {', '.join(f.name for f in FAMILIES)} models, got "
                    f"{type(model).__module__}.{type(model).__name__}")
