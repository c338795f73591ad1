"""The kernel demo: every construction of T on real ViT tokens, reference against C++.

    python -m tt_kernels.demo [--batch 32] [--r 16] [--blocks 4] [--out out/demo]

Takes real images (the photos that ship in scikit-image and foolbox, tt_kernels.data), resized to
224 px and normalised, through a timm ViT-S/16 with random-init weights (fixed seed: no
pretrained weights can be downloaded here). Inside block
``--blocks`` it captures x after the attention residual, the attention keys averaged over heads
(the metric) and the class-attention score (tt.cls_attention of that block's q and k, computed by
calling the block's own ``attn.qkv`` on ``norm1(x)``). Then each construction removes ``--r``
tokens with backend="reference" and backend="cpu"; the table says whether the C++ result agrees
with the reference (tt_kernels.verify: T exactly but for near ties, x within bounds from the
arithmetic), how long each takes (in turns, tt_kernels.measure), and, as a sanity check, the cosine
between the mean token (class token excluded) before and after (size-weighted after: 1 when mass
is kept).
Writes demo.json and demo.md to ``--out``. Exits with status 1 if any result disagrees.
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import api, data, measure, verify
from .machine import cpu_model, machine_info

CONSTRUCTIONS = [
    # label, transform() keyword arguments
    ("prune", dict(method="prune")),
    ("evit", dict(method="evit")),
    ("tome", dict(method="tome")),
    ("spread k=1", dict(method="spread", k=1)),
    ("spread k=4", dict(method="spread", k=4)),
    ("spread k=4 mix", dict(method="spread", k=4, source="mix")),
]


def load_images(batch, resolution, mean, std):
    """[batch, 3, res, res] normalised views of the photos that ship in packages (tt_kernels.data);
    past their count the batch repeats them."""
    images, names = data.photo_batch(resolution)
    index = [i % len(images) for i in range(batch)]
    return data.normalize(images[index], mean, std), [names[i] for i in index]


def capture(model, images, block):
    """Tokens inside block `block` (1-based): x after the attention residual, the keys averaged
    over heads, and q, k of that attention."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:block - 1]:
        x = blk(x)
    blk = model.blocks[block - 1]
    attn = blk.attn
    h = blk.norm1(x)
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    x = x + blk.drop_path1(blk.ls1(attn(h)))
    return x, k.mean(1), q, k


def timed(calls, args):
    """{name: timing} of the zero-argument calls, --repeats of each in turns after --warmup."""
    return measure.time_in_turns(calls, *measure.cpu_turns(args.repeats), warmup=args.warmup)


def mean_token_cosine(x, size, x_out, size_out, prefix):
    """Per-image cosine between the mean token before and after (prefix excluded)."""
    before = (x[:, prefix:].float() * size[:, prefix:, None]).sum(1)
    after = (x_out[:, prefix:].float() * size_out[:, prefix:, None]).sum(1)
    plain = x_out[:, prefix:].float().mean(1)
    return F.cosine_similarity(before, after, dim=-1), F.cosine_similarity(before, plain, dim=-1)


def transform_args(x, metric, r, **kwargs):
    """api.transform's arguments as tt.transform's positional ones (what verify.check judges)."""
    bound = inspect.signature(api.transform).bind(x, metric, r, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return (x, a["size"], metric, a["score"], r, a["method"], a["k"], a["tau"],
            api.removal_alpha(a["source"], a["alpha"]), a["targets"], a["prefix"], a["mode"],
            a["cost"])


def markdown(report):
    cfg = report["config"]
    lines = ["# tt_kernels demo: token reduction on real ViT tokens, reference vs C++ CPU", "",
             f"{cfg['model']} (**random-init weights**, seed {cfg['seed']}), {cfg['batch']} views "
             f"of skimage photos at 224 px, tokens captured in block {cfg['blocks']}, "
             f"r = {cfg['r']}, {report['machine']['cpu_model']}, "
             f"{report['machine']['torch_num_threads']} threads, "
             f"torch {report['machine']['torch']}.",
             "", "| method | r | N -> N' | agree | reference ms | C++ ms | speedup | "
             "cos(mean token) |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['r']} | {row['n_in']} -> {row['n_out']} | "
                     f"{'yes' if row['agree'] else 'NO'} | {row['reference']['median_ms']:.2f} | "
                     f"{row['cpu']['median_ms']:.2f} | {row['speedup']:.1f}x | "
                     f"{row['cos_mean_token']:.4f} |")
    s = report["score"]
    lines += ["", f"Score (tt.cls_attention, [{cfg['batch']}, {report['n_tokens']}]): reference "
              f"{s['reference']['median_ms']:.2f} ms, C++ {s['cpu']['median_ms']:.2f} ms, "
              f"agree: {'yes' if s['agree'] else 'NO'}.", "",
              "Times: median over turns after warm-up, each turn timing the reference and C++ "
              "(tt_kernels.measure). cos(mean token): cosine between the mean token (class token "
              "excluded) before and the size-weighted mean token after the reduction, averaged "
              "over images; 1 where the construction keeps the total mass."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tt_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images (views) per batch")
    parser.add_argument("--r", type=int, default=16, help="tokens each construction removes")
    parser.add_argument("--blocks", type=int, default=4,
                        help="capture the tokens inside this block (1-based): after blocks-1 "
                             "full blocks and this block's attention residual")
    parser.add_argument("--model", default="vit_small_patch16_224",
                        choices=("vit_small_patch16_224", "deit_small_patch16_224"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init weights")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per backend")
    parser.add_argument("--warmup", type=int, default=2, help="discarded calls per backend")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    measure.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    malloc = measure.use_malloc(args.malloc)
    started = time.perf_counter()

    try:
        import timm
    except ImportError as err:
        raise SystemExit("the demo needs timm: pip install timm") from err

    print("tt_kernels demo: Token Transforming on real ViT tokens -- every construction of the "
          "sparse T\n(prune, evit, tome, spread) run by the PyTorch reference and by the C++ "
          "CPU kernels,\nchecked to agree and timed. Weights are RANDOM-INIT (seed "
          f"{args.seed}; no pretrained weights can be downloaded here),\nso the tokens are real "
          "image tokens through an untrained network (the pretrained model is\nthe main job's: "
          "python -m tt_kernels.evaluate).\n")

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    if not 1 <= args.blocks <= len(model.blocks):
        parser.error(f"--blocks must lie in [1, {len(model.blocks)}]")
    prefix = model.num_prefix_tokens
    cfg = model.pretrained_cfg
    images, names = load_images(args.batch, model.patch_embed.img_size[0], cfg["mean"], cfg["std"])

    with torch.inference_mode():
        t0 = time.perf_counter()
        x, metric, q, k = capture(model, images, args.blocks)
        capture_ms = (time.perf_counter() - t0) * 1e3
        B, N, C = x.shape
        print(f"model {args.model} (timm {timm.__version__}), {len(model.blocks)} blocks, "
              f"{attn_heads(model)} heads; {B} photo views (skimage, foolbox) at 224 px")
        print(f"captured in block {args.blocks}: x {list(x.shape)}, metric (keys averaged over "
              f"heads) {list(metric.shape)}, q/k {list(q.shape)} in {capture_ms:.0f} ms; "
              f"machine: {cpu_model()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads\n")

        # The score: class attention of this block, both backends.
        score = api.cls_attention(q, k, backend="reference")
        s_ok, s_check = verify.check("cls_attention", api.cls_attention(q, k, backend="cpu"), q, k,
                                     None, None)
        s_t = timed({backend: lambda backend=backend: api.cls_attention(q, k, backend=backend)
                     for backend in ("reference", "cpu")}, args)
        size = torch.ones(B, N)

        rows = []
        for label, kwargs in CONSTRUCTIONS:
            method = kwargs["method"]
            r_max = api.max_r(method, N, prefix)
            if args.r > r_max:
                raise SystemExit(f"--r {args.r} is too large for {label} (at most {r_max})")

            def step(backend, kwargs=kwargs):
                return api.transform(x, metric, args.r, size=size, score=score, prefix=prefix,
                                     backend=backend, **kwargs)

            cpu = step("cpu")
            ok, check = verify.check("transform", (*cpu[:2], cpu[2].dst, cpu[2].weight),
                                     *transform_args(x, metric, args.r, size=size, score=score,
                                                     prefix=prefix, **kwargs))
            t = timed({backend: lambda backend=backend: step(backend)
                       for backend in ("reference", "cpu")}, args)
            t_ref, t_cpu = t["reference"], t["cpu"]
            cos_w, cos_plain = mean_token_cosine(x, size, cpu[0], cpu[1], prefix)
            rows.append({"method": label, "kwargs": kwargs, "r": args.r, "n_in": N,
                         "n_out": cpu[0].shape[1], "agree": ok, "check": check,
                         "reference": t_ref, "cpu": t_cpu,
                         "speedup": t_ref["median_ms"] / t_cpu["median_ms"],
                         "cos_mean_token": float(cos_w.mean()),
                         "cos_mean_token_min": float(cos_w.min()),
                         "cos_plain_mean_token": float(cos_plain.mean())})

    head = (f"{'method':<18} {'r':>3} {'N -> N_out':>11} {'agree':<26} {'reference ms':>12} "
            f"{'C++ ms':>8} {'speedup':>8} {'cos(mean tok)':>14}")
    print(head)
    print("-" * len(head))
    for row in rows:
        agree = (f"yes (max|dx| {row['check']['x_max_diff']:.1e})" if row["agree"]
                 else f"NO {row['check']}")
        print(f"{row['method']:<18} {row['r']:>3} {row['n_in']:>4} -> {row['n_out']:<4} "
              f"{agree:<26} {row['reference']['median_ms']:12.2f} {row['cpu']['median_ms']:8.2f} "
              f"{row['speedup']:7.1f}x {row['cos_mean_token']:14.4f}")
    print(f"\nscore (tt.cls_attention, [{B}, {N}]): reference {s_t['reference']['median_ms']:.2f} "
          f"ms, C++ {s_t['cpu']['median_ms']:.2f} ms, agree: {'yes' if s_ok else 'NO'}")
    print(f"times: median over turns of {args.repeats} calls after {args.warmup} warm-up calls; "
          f"cos(mean tok): mean token (class token excluded) before vs\n"
          f"size-weighted mean token after, averaged over images")

    report = {
        "demo": "tt_kernels constructions on real ViT tokens, reference vs C++ CPU",
        "weights": f"random-init (seed {args.seed}); no pretrained weights",
        "config": {"model": args.model, "timm": timm.__version__, "seed": args.seed,
                   "batch": B, "r": args.r, "blocks": args.blocks, "prefix": prefix,
                   "repeats": args.repeats, "warmup": args.warmup, "tau": 0.1,
                   "images": names},
        "machine": machine_info(), "malloc": malloc,
        "n_tokens": N, "channels": C, "capture_ms": capture_ms,
        "score": {"agree": s_ok, "check": s_check, "reference": s_t["reference"],
                  "cpu": s_t["cpu"]},
        "rows": rows,
        "all_agree": s_ok and all(row["agree"] for row in rows),
    }
    report["runtime_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "demo.md").write_text(markdown(report))
    print(f"\nwrote {args.out / 'demo.json'} and {args.out / 'demo.md'} "
          f"(total {report['runtime_s']:.1f} s)")
    if not report["all_agree"]:
        print("FAIL: the C++ kernels disagree with the reference", file=sys.stderr)
        return 1
    return 0


def attn_heads(model):
    return model.blocks[0].attn.num_heads


if __name__ == "__main__":
    sys.exit(main())
