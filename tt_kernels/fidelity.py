"""Fidelity: how closely a reduced model's outputs follow the unreduced model's, image by image,
and how far a mean over a few dozen photos can be trusted.

Per image: the cosine of the pooled feature (CLS) and the mean cosine of the restored patch tokens
to the unreduced model's, and, where a dense head exists, the correlation of its maps. Intervals
come from a bootstrap over photos: a resample draws as many photos as there are, with replacement,
and takes every view of each drawn photo, because views of one photo share its content and are not
independent samples. Statistics of two configurations on one resample (a ratio of their losses)
are paired: both see the same photos.
"""
import torch
import torch.nn.functional as F

RESAMPLES = 2000
LEVEL = 0.95


def correlation(a, b):
    """Per-image Pearson correlation of two maps [B, ...]."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def agreement(got, reference):
    """Per-image agreement of outputs `got` with `reference` (dicts with "cls" [B, C], "grid"
    [B, N, C] and optionally "saliency" [B, ...]): {"cls_cosine", "patch_cosine",
    "saliency_corr"} -> [B] float64 on the CPU."""
    out = {"cls_cosine": F.cosine_similarity(got["cls"], reference["cls"], dim=-1),
           "patch_cosine": F.cosine_similarity(got["grid"], reference["grid"], dim=-1).mean(1)}
    if "saliency" in got:
        out["saliency_corr"] = correlation(got["saliency"], reference["saliency"])
    return {name: value.double().cpu() for name, value in out.items()}


def summary(per_image, draws):
    """{name: [B] values} -> {name: mean, name_interval: (low, high) over the resamples `draws`,
    name_worst: min}."""
    row = {}
    for name, value in per_image.items():
        row[name] = value.mean().item()
        row[name + "_interval"] = interval(lambda i: value[i].mean(), draws)
        row[name + "_worst"] = value.min().item()
    return row


def resamples(photos, count=RESAMPLES, seed=0):
    """`count` bootstrap resamples of the images whose photos are `photos` (one name per image):
    a list of index tensors, each every view of len(set(photos)) photos drawn with replacement."""
    names = list(dict.fromkeys(photos))
    views = [torch.tensor([i for i, p in enumerate(photos) if p == name]) for name in names]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(names), (count, len(names)), generator=g)
    return [torch.cat([views[p] for p in draw.tolist()]) for draw in draws]


def interval(statistic, indices, level=LEVEL):
    """The percentile interval of `statistic(index tensor) -> float` over the resamples
    `indices`: (low, high)."""
    values = torch.tensor([float(statistic(i)) for i in indices], dtype=torch.float64)
    tail = (1 - level) / 2
    return (torch.quantile(values, tail).item(), torch.quantile(values, 1 - tail).item())
