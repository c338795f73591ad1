"""Proportional attention's forms (tt_kernels.attention) timed per shape, beside plain SDPA without
a bias (flash: the floor), so that a GPU run can pick "auto"'s form (attention.CUDA_AUTO).

Forms: "none" (no bias), "mask" (the bias in q's dtype, a view of a buffer padded to 8 keys),
"mask-unaligned" (the same mask allocated [B, 1, 1, N]: what padding saves), "column" (the
extra head dimension; its widening of q, k and v is timed with it), "column-sdpa" (the column's
SDPA alone on inputs widened beforehand: what widening inside the qkv projection could reach) and
"cudnn" (the mask on cuDNN's kernel; CUDA only). Shapes: the attention of DeiT-S, DeiT-B and DINOv2-S/14 (H heads of
Dh = 64) with every token (N0) and about half of them (a reduced block's N, odd), B = 1, 64, 256,
bf16 and fp16; q, k, v are views of one qkv tensor as in timm.

Every form is first checked against the float64 spec on the first two images
(attention.error_bound); then the forms of a shape are timed in turns (tt_kernels.measure) with
CUDA events: `--warmup` calls of each, then `--repeats` turns, each timing `--iters` calls of every
form back to back (L2 warm, as q, k, v come from the projection just before); median per call. The table gives ms and the ratio to "none"; the JSON
(attention-<card>.json in each --out-dir) also holds the kernel SDPA chose for each form and, per
dtype, the biased form with the lowest geometric-mean time (the CUDA_AUTO it suggests).

    python bench/bench_attention.py [--out-dir bench/results] [--models deit_s] [--batches 256]
    python bench/bench_attention.py --smoke     # CPU dry run: tiny shapes, torch.utils.benchmark

Exits 1 if a form disagrees with the spec or fails (cuDNN's refusal of a shape is recorded, not a
failure), 2 without a GPU unless --smoke.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tt_kernels import attention, measure
from tt_kernels.machine import device_info, git_state, slug, versions

MODELS = {  # name: (label, N0, H, Dh)
    "deit_s": ("DeiT-S/16 224", 197, 6, 64),
    "deit_b": ("DeiT-B/16 224", 197, 12, 64),
    "dinov2_s": ("DINOv2-S/14 224", 257, 6, 64),
}
SMOKE_MODELS = {"tiny": ("tiny (smoke)", 37, 2, 64)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMS = ("none", "mask", "mask-unaligned", "column", "column-sdpa", "cudnn")
# timed for comparison only: no setting of `attention` runs them, so none is suggested
COMPARISONS = ("none", "mask-unaligned", "column-sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few calls each")
    p.add_argument("--out-dir", action="append", default=None,
                   help="folder for attention-<card>.json (repeatable; default bench/results, "
                        "smoke: out/bench)")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated of " + ",".join(DTYPES))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args(argv)


def inputs(B, N, H, head_dim, dtype, device):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    size = torch.randint(1, 6, (B, N), generator=g).float().to(device)
    return q, k, v, size


def form_call(form, q, k, v, size):
    """The call `form` makes, bias construction included; None where it cannot run here."""
    sdpa = F.scaled_dot_product_attention
    if form == "none":
        return lambda: sdpa(q, k, v)
    if form == "mask":
        return lambda: sdpa(q, k, v, attn_mask=attention.size_bias(size, q.dtype))
    if form == "mask-unaligned":
        return lambda: sdpa(q, k, v, attn_mask=size.log().to(q.dtype)[:, None, None, :])
    if form == "column":
        def column():
            q2, k2, v2, scale = attention.size_columns(q, k, v, size)
            return sdpa(q2, k2, v2, scale=scale)[..., :q.shape[-1]]
        return column
    if form == "column-sdpa":
        q2, k2, v2, scale = attention.size_columns(q, k, v, size)
        return lambda: sdpa(q2, k2, v2, scale=scale)[..., :q.shape[-1]]
    if not q.is_cuda:
        return None

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q, k, v, attn_mask=attention.size_bias(size, q.dtype))
    return cudnn


def chosen_kernel(form, q, k, v, size):
    """The kernel SDPA picks for the form's inputs (torch's own dispatch rule)."""
    if form == "cudnn":
        return "CUDNN_ATTENTION (forced)"
    mask, scale = None, None
    if form == "mask":
        mask = attention.size_bias(size, q.dtype)
    elif form == "mask-unaligned":
        mask = size.log().to(q.dtype)[:, None, None, :]
    elif form in ("column", "column-sdpa"):
        q, k, v, scale = attention.size_columns(q, k, v, size)
    return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale)).name


def check(form, fn, q, k, v, size):
    """max |error| / bound over the first two images (<= 1 passes)."""
    b = min(2, q.shape[0])
    want_size = None if form == "none" else size[:b]
    got = fn()[:b].double()
    q, k, v = q[:b], k[:b], v[:b]
    error = (got - attention.reference(q, k, v, want_size)).abs()
    return float((error / attention.error_bound(q, k, v, want_size)).max())


def suggest(cases):
    """Per dtype, the form a model can run with the lowest geometric-mean time over the shapes."""
    out = {}
    for dtype in sorted({c["dtype"] for c in cases}):
        logs = {}
        for c in cases:
            if c["dtype"] != dtype:
                continue
            for form, r in c["forms"].items():
                if form not in COMPARISONS and r.get("ms") is not None:
                    logs.setdefault(form, []).append(math.log(r["ms"]))
        complete = {f: v for f, v in logs.items()
                    if len(v) == sum(c["dtype"] == dtype for c in cases)}
        if complete:
            out[dtype] = min(complete, key=lambda f: sum(complete[f]))
    return out


def main():
    args = parse_args()
    if args.smoke:
        device, models = torch.device("cpu"), SMOKE_MODELS
        args.batches, args.warmup, args.repeats, args.iters = "1,2", 1, 3, 2
        args.dtypes = "fp32,bf16"
    elif not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke for the CPU dry run", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        models = {m: MODELS[m] for m in args.models.split(",")} if args.models else MODELS
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    info = device_info(device)
    card = slug(info["name"]) if device.type == "cuda" else "cpu-smoke"
    out_dirs = args.out_dir or ["out/bench" if args.smoke else "bench/results"]
    paths = [os.path.join(d, f"attention-{card}.json") for d in out_dirs]
    clock = (measure.EventClock if device.type == "cuda" else measure.CpuClock)(args.iters)
    result = {"device": info, "versions": versions(), "git": git_state(),
              "timing": f"{args.warmup} warm-up calls of each form, then {args.repeats} turns "
                        f"over the forms of a shape (in order, then reversed) of {clock}; median "
                        f"over the turns, ms per call",
              "cases": [], "complete": False}
    failures = []
    print(f"{'shape':30s} {'B':>4s} {'dtype':5s} " + " ".join(f"{f:>16s}" for f in FORMS))
    for model, (label, n0, H, head_dim) in models.items():
        for N in (n0, n0 // 2 | 1):
            for B in batches:
                for dtype in dtypes:
                    q, k, v, size = inputs(B, N, H, head_dim, DTYPES[dtype], device)
                    case = {"model": model, "label": label, "N": N, "H": H, "Dh": head_dim,
                            "B": B, "dtype": dtype, "forms": {}}
                    calls = {}
                    for form in FORMS:
                        fn = form_call(form, q, k, v, size)
                        if fn is None:
                            case["forms"][form] = {"ms": None, "skipped": "CUDA only"}
                            continue
                        try:
                            ratio = check(form, fn, q, k, v, size)
                            case["forms"][form] = {
                                "error_over_bound": ratio, "ok": ratio <= 1,
                                "kernel": chosen_kernel(form, q, k, v, size), "ms": None}
                            calls[form] = fn
                        except RuntimeError as error:  # cuDNN may have no kernel for a shape
                            case["forms"][form] = {"ms": None, "ok": form == "cudnn",
                                                   "error": str(error).splitlines()[0]}
                    times = measure.time_in_turns(calls, args.repeats, clock, args.warmup)
                    for form, r in case["forms"].items():
                        if form in times:
                            r["ms"] = times[form]["median_ms"]
                        if not r.get("ok", True):
                            failures.append(f"{model} N={N} B={B} {dtype} {form}: {r}")
                    none = case["forms"]["none"].get("ms")
                    cells = []
                    for form in FORMS:
                        ms = case["forms"][form].get("ms")
                        cells.append("-" if ms is None else
                                     f"{ms:.4f}" + (f" ({ms / none:.2f}x)" if none else ""))
                    print(f"{label + f' N={N}':30s} {B:4d} {dtype:5s} " +
                          " ".join(f"{c:>16s}" for c in cells), flush=True)
                    result["cases"].append(case)
                    for path in paths:  # rewritten after every shape: a cut run keeps its cases
                        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                        with open(path, "w") as f:
                            json.dump(result, f, indent=1)
    result["suggested_cuda_auto"] = suggest(result["cases"])
    result["failures"], result["complete"] = failures, True
    for path in paths:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"suggested CUDA_AUTO (fastest biased form by geometric mean): "
          f"{result['suggested_cuda_auto']}")
    print(f"checks: {'all passed' if not failures else f'{len(failures)} FAILED'}")
    for line in failures:
        print("  " + line)
    print("JSON: " + ", ".join(paths))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
