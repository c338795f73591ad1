"""Models by name for the main job, each with the preprocessing its authors evaluate it with.

    deit_small_patch16_224               a timm model (weights from --checkpoint, else random)
    hf:facebook/dinov2-small             HF transformers: a hub name or a save_pretrained folder
                                         (its image classifier when one is wanted, else AutoModel)
    open_clip:ViT-B-32[:laion2b_s34b_b79k]  open_clip's image tower: architecture[:pretrained tag
                                         or weights file] (--checkpoint as the file)

Nothing is downloaded unless the name asks for hub weights.
"""
from dataclasses import dataclass

import torch


@dataclass
class Named:
    model: torch.nn.Module  # eval mode
    mean: tuple
    std: tuple
    size: int  # square input side, pixels
    description: str
    transform: object  # PIL image -> normalised tensor, the model's own evaluation preprocessing
    preprocessing: dict  # the settings `transform` was made from, for the record
    classifier: bool  # whether classify(model, x) gives class logits (top-1 needs them)


def load(name, checkpoint=None, classifier=False):
    if name.startswith("hf:"):
        return _hf(name[len("hf:"):], classifier)
    if name.startswith("open_clip:"):
        return _open_clip(name[len("open_clip:"):], checkpoint)
    return _timm(name, checkpoint)


def classify(model, x):
    """Class logits of a Named model that is a classifier."""
    out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    return out if torch.is_tensor(out) else out.logits


def timm_transform(model):
    """A timm model's own evaluation preprocessing, as timm validates it (resize to size /
    crop_pct with the model's interpolation, centre crop, its mean and std): (transform,
    timm's config)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config), config


def _timm(name, checkpoint):
    import timm

    model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint or "").eval()
    transform, config = timm_transform(model)
    return Named(model, config["mean"], config["std"], config["input_size"][-1],
                 name + (f" ({checkpoint})" if checkpoint else " (random init)"), transform,
                 config, getattr(model, "num_classes", 0) > 0)


def _hf(name, classifier):
    import transformers

    auto = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    model = auto.from_pretrained(name, attn_implementation="sdpa").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(name)
    side = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    side = side.get("height") or side.get("shortest_edge")

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return Named(model, tuple(processor.image_mean), tuple(processor.image_std), side,
                 f"hf:{name} ({type(model).__name__})", transform, processor.to_dict(),
                 classifier)


def _open_clip(name, checkpoint):
    import open_clip

    architecture, _, pretrained = name.partition(":")
    pretrained = pretrained or checkpoint
    model, _, transform = open_clip.create_model_and_transforms(architecture,
                                                                pretrained=pretrained or None)
    visual = model.visual.eval()
    config = visual.preprocess_cfg  # what create_model_and_transforms built `transform` from
    return Named(visual, tuple(config["mean"]), tuple(config["std"]), visual.image_size[0],
                 f"open_clip:{architecture}" + (f" ({pretrained})" if pretrained else
                                                " (random init)"), transform,
                 dict(config), False)
