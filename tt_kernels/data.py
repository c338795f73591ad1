"""Real images that ship inside PyPI packages (no network): for fidelity and probe runs.

scikit-image's sample photographs, foolbox's 20 ImageNet validation images (label in the file
name) and scikit-image's LFW subset (100 faces, 100 non-faces) for a linear probe.
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


def photos():
    """[(name, PIL RGB image)] from scikit-image and foolbox."""
    from skimage import data
    images = [(name, _rgb(getattr(data, name)())) for name in SKIMAGE_PHOTOS]
    images += [(os.path.basename(f)[:-4], Image.open(f).convert("RGB"))
               for f in _package_files("foolbox", "data", "imagenet_")]
    return images


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


def views(image, size):
    """Two views of a photo: the centred square and a zoomed centre (70%) crop."""
    w, h = image.size
    zoom = image.crop((int(w * 0.15), int(h * 0.15), int(w * 0.85), int(h * 0.85)))
    return [to_tensor(image, size), to_tensor(zoom, size)]


def photo_batch(size=224):
    """All photos in both views: ([B, 3, size, size] in [0, 1], names)."""
    tensors, names = [], []
    for name, image in photos():
        for i, view in enumerate(views(image, size)):
            tensors.append(view)
            names.append(f"{name}/{i}")
    return torch.stack(tensors), names


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
