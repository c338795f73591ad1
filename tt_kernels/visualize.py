"""Where each patch went: an image with every patch coloured by the output token it ended in."""
import numpy as np
import torch
from PIL import Image


def token_owner(steps, n0, batch):
    """[B, n0]: for each input token, the final output token holding its largest share after all
    `steps` (many-to-many T), or -1 where it was pruned."""
    owner = torch.arange(n0).expand(batch, n0).clone()
    for T in steps:
        share, slot = T.weight.cpu().max(-1)
        row = torch.where(share > 0, T.dst.cpu().gather(-1, slot[..., None])[..., 0], -1)
        owner = torch.where(owner >= 0, row.gather(1, owner.clamp_min(0)), -1)
    return owner


def token_map(image, owner, grid, patch):
    """An RGB uint8 array: each token's patches painted in their mean colour, with a dark line
    where neighbouring patches belong to different tokens and black for pruned patches.

    image: [3, H, W] float in [0, 1]; owner: [grid_h * grid_w] token of each patch (no prefix).
    """
    gh, gw = grid
    img = image[:, :gh * patch, :gw * patch].permute(1, 2, 0).cpu().numpy()
    cells = img.reshape(gh, patch, gw, patch, 3).mean((1, 3)).reshape(-1, 3)
    owner = owner.cpu().numpy()
    colours = np.zeros_like(cells)
    for token in np.unique(owner[owner >= 0]):
        colours[owner == token] = cells[owner == token].mean(0)
    out = np.repeat(np.repeat(colours.reshape(gh, gw, 3), patch, 0), patch, 1)
    tokens = owner.reshape(gh, gw)
    edge_v = np.repeat(tokens[:, 1:] != tokens[:, :-1], patch, 0)
    edge_h = np.repeat(tokens[1:] != tokens[:-1], patch, 1)
    for c in range(1, gw):
        out[:, c * patch][edge_v[:, c - 1]] *= 0.3
    for r in range(1, gh):
        out[r * patch][edge_h[r - 1]] *= 0.3
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_token_maps(path, images, steps, prefix, grid, patch):
    """Saves one PNG row: each image beside its token map."""
    owner = token_owner(steps, prefix + grid[0] * grid[1], images.shape[0])[:, prefix:]
    rows = []
    for image, own in zip(images, owner):
        original = (image[:, :grid[0] * patch, :grid[1] * patch].permute(1, 2, 0).cpu().numpy()
                    .clip(0, 1) * 255).astype(np.uint8)
        rows.append(np.concatenate([original, token_map(image, own, grid, patch)], 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return path
