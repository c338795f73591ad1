"""Whole-model speed on this machine: a timm ViT unpatched (fused SDPA), patched by tt_kernels at a
FLOPs budget (default Token Transforming and ToMe's construction), with nothing to remove, and
ToMe as its authors ship it for timm (eager attention with the size bias, PyTorch merging; written
here from the published algorithm) at the same budget. Same process, batch and dtype; warm-up
discarded; median of interleaved repeats.

    python bench/bench_model.py [--model deit_small_patch16_224] [--batch 16] [--budget 0.6]

Writes bench/results/model-<model>-<machine>.json.
"""
import argparse
import copy
import json
import math
import os
import types

import timm
import torch

import tt_kernels
from tt_kernels.evaluate import interleaved_seconds
from tt_kernels.machine import machine_info


def _tome_attention(self, x, size):
    """Eager attention with ToMe's proportional bias; also returns the keys' head mean."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj(x), k.mean(1)


def _bipartite_merge(x, size, metric, r):
    """ToMe's bipartite soft matching with a class token, then the size-weighted merge."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0] = -math.inf
    node_max, node_idx = scores.max(-1)
    order = node_max.argsort(-1, descending=True)[..., None]
    unmerged, merged = order[:, r:], order[:, :r]
    dst_idx = node_idx[..., None].gather(1, merged)

    def merge(t):
        src, dst = t[:, ::2], t[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, unmerged.expand(n, t1 - r, c))
        src = src.gather(1, merged.expand(n, r, c))
        return torch.cat([unm, dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, "sum")], 1)

    x, size = merge(x * size), merge(size)
    return x / size, size


def tome_published(model, r):
    """ToMe's timm patch, in place: every block merges r tokens after its attention."""
    state = {"size": None}

    def block_forward(self, x, attn_mask=None, is_causal=False):
        attn_out, metric = _tome_attention(self.attn, self.norm1(x), state["size"])
        x = x + self.drop_path1(self.ls1(attn_out))
        size = state["size"] if state["size"] is not None else x.new_ones(*x.shape[:2], 1)
        n_r = min(r, (x.shape[1] - 1) // 2)
        if n_r > 0:
            x, state["size"] = _bipartite_merge(x, size, metric, n_r)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    original = model.forward_features

    def forward_features(self, x, *args, **kwargs):
        state["size"] = None
        return original(x, *args, **kwargs)

    for block in model.blocks:
        block.forward = types.MethodType(block_forward, block)
    model.forward_features = types.MethodType(forward_features, model)
    return model


def constant_r(model, n0, budget):
    """ToMe's own convention: one r for every block (the smallest meeting the budget)."""
    full = tt_kernels.vit_flops(model, n0, [0] * len(model.blocks))
    return next(r for r in range(n0) if
                tt_kernels.vit_flops(model, n0, [r] * len(model.blocks)) <= budget * full)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    n0 = base.patch_embed.num_patches + base.num_prefix_tokens
    full = tt_kernels.vit_flops(base, n0, [0] * len(base.blocks))
    r_tome = constant_r(base, n0, args.budget)
    models = {
        "timm (fused SDPA)": base,
        "tt_kernels r=0": tt_kernels.patch(copy.deepcopy(base), r=0),
        "tt_kernels default": tt_kernels.patch(copy.deepcopy(base), flops=args.budget),
        "tt_kernels tome": tt_kernels.patch(copy.deepcopy(base), flops=args.budget,
                                            method="tome"),
        f"ToMe published patch (r={r_tome})": tome_published(copy.deepcopy(base), r_tome),
    }
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size)
    seconds = interleaved_seconds(models, x, args.repeats, args.warmup)
    rows = []
    for name, m in models.items():
        tr = getattr(m, "token_reduction", None)
        if tr is not None:
            flops = tr.schedule_flops(base, n0)
        elif name.startswith("ToMe"):
            flops = tt_kernels.vit_flops(base, n0, [r_tome] * len(base.blocks), method="tome")
        else:
            flops = full
        rows.append(dict(name=name, images_per_s=args.batch / seconds[name],
                         speedup=seconds["timm (fused SDPA)"] / seconds[name],
                         flops_fraction=flops / full,
                         schedule=tr.schedule if tr is not None else None))
        print(f"{name:32s} {rows[-1]['images_per_s']:7.2f} img/s  {rows[-1]['speedup']:.2f}x  "
              f"FLOPs {rows[-1]['flops_fraction']:.3f}")
    info = machine_info()
    out = args.out or (f"bench/results/model-{args.model}-{info['cpu_model'].split()[0].lower()}"
                       f"-{info['usable_cpus']}c.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": args.model, "batch": args.batch, "dtype": "float32",
                   "budget": args.budget, "repeats": args.repeats, "machine": info,
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
