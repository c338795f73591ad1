"""Where a patched model's time goes, block by block, against the zero-overhead bound.

    python bench/profile_blocks.py --batch 1,16 [--method tome] [--model deit_small_patch16_224]

Both models run the same token schedule (the bound drops each block's last r tokens: no
similarity, no merge, no size bias), under torch.profiler, forward after forward in turns. Each
block's forward is a profiler range, and per block the table gives the median over forwards of

  bound     the bound's block (ms)
  patched   the patched block (ms)
  step      the reduction step's ops inside it (tt::transform, tt::cls_attention: similarity,
            construction, apply and their argument checks)
  attention scaled_dot_product_attention in the patched block minus in the bound's (the size
            bias: mask or extra column)
  other     what is left of patched - bound (Python, hooks, the metric's view, allocation)

so that patched - bound = step + attention + other. Times are CPU wall times of one process, on
whatever else the machine runs: read them as shares, and take speed from bench_model.py.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import timm
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tt_kernels  # noqa: E402
from bench_model import zero_overhead_bound  # noqa: E402
from tt_kernels import machine, measure  # noqa: E402

STEP_OPS = ("tt::transform", "tt::cls_attention")
ATTENTION_OPS = ("aten::scaled_dot_product_attention",)


def label_blocks(model):
    """Each block's forward as a profiler range "block <i>"; returns the hook handles."""
    handles = []
    for i, block in enumerate(model.blocks):
        ranges = []

        def enter(module, inputs, i=i, ranges=ranges):
            ranges.append(record_function(f"block {i}"))
            ranges[-1].__enter__()

        def leave(module, inputs, output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    return handles


def _inside(event, names):
    """ms of the events named `names` below `event` (not counting one inside another)."""
    total = 0.0
    for child in event.cpu_children:
        total += child.cpu_time_total / 1e3 if child.name in names else _inside(child, names)
    return total


def block_times(model, x, forwards):
    """[forward][block] -> dict(ms, step, attention) of `forwards` profiled forwards."""
    handles = label_blocks(model)
    try:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    blocks = [e for e in prof.events() if e.name.startswith("block ")]
    depth = len(model.blocks)
    return [[dict(ms=e.cpu_time_total / 1e3, step=_inside(e, STEP_OPS),
                  attention=_inside(e, ATTENTION_OPS)) for e in blocks[f * depth:(f + 1) * depth]]
            for f in range(forwards)]


def profile_case(base, batch, settings, turns, forwards):
    patched = tt_kernels.patch(measure.same_weights(base), **settings)
    x = torch.randn(batch, 3, *base.patch_embed.img_size)
    with torch.inference_mode():
        patched(x)
    schedule = patched.token_reduction.schedule
    bound = zero_overhead_bound(measure.same_weights(base), schedule)
    runs = {"patched": [], "bound": []}
    for _ in range(turns):  # in turns, so that a change of load hits both alike
        for name, model in (("patched", patched), ("bound", bound)):
            block_times(model, x, 1)  # warm-up after the other model ran
            runs[name] += block_times(model, x, forwards)
    rows, n = [], base.patch_embed.num_patches + base.num_prefix_tokens
    for i, r in enumerate(schedule):
        def median(name, key, i=i):
            return statistics.median(forward[i][key] for forward in runs[name])

        row = dict(block=i, tokens=n, r=r, bound=median("bound", "ms"),
                   patched=median("patched", "ms"), step=median("patched", "step"),
                   attention=median("patched", "attention") - median("bound", "attention"))
        row["other"] = row["patched"] - row["bound"] - row["step"] - row["attention"]
        rows.append(row)
        n -= r
    return dict(batch=batch, settings=settings, schedule=schedule, blocks=rows)


def table(case):
    lines = [f"batch {case['batch']}, {case['settings']}: per block, ms (medians)",
             f"  {'block':>5s} {'N':>4s} {'r':>3s} {'bound':>8s} {'patched':>8s} {'step':>7s} "
             f"{'attn':>7s} {'other':>7s} {'of bound':>8s}"]
    for row in case["blocks"]:
        lines.append(f"  {row['block']:5d} {row['tokens']:4d} {row['r']:3d} {row['bound']:8.3f} "
                     f"{row['patched']:8.3f} {row['step']:7.3f} {row['attention']:7.3f} "
                     f"{row['other']:7.3f} {row['bound'] / row['patched']:8.2f}")
    total = {key: sum(row[key] for row in case["blocks"])
             for key in ("bound", "patched", "step", "attention", "other")}
    lines.append(f"  {'all':>5s} {'':4s} {'':3s} {total['bound']:8.3f} {total['patched']:8.3f} "
                 f"{total['step']:7.3f} {total['attention']:7.3f} {total['other']:7.3f} "
                 f"{total['bound'] / total['patched']:8.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--method", default=None, help="a patch() method (default: patch's)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=3, help="profiled forwards per turn")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    measure.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    malloc = measure.use_malloc(args.malloc)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    settings = dict(flops=args.flops, **({"method": args.method} if args.method else {}))
    cases = []
    for batch in map(int, args.batch.split(",")):
        cases.append(profile_case(base, batch, settings, args.turns, args.forwards))
        print(table(cases[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(model=args.model, machine=machine.machine_info(),
                                                  threads=torch.get_num_threads(),
                                                  malloc=malloc, cases=cases),
                                             indent=1))


if __name__ == "__main__":
    main()
