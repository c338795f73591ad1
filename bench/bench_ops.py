"""Microbenchmarks of the tt operators on CPU: the pure-PyTorch reference against the C++ kernels.

Every case runs the same arguments through ``tt_kernels.reference.<op>`` and ``torch.ops.tt.<op>``
(what ``backend="reference"`` and ``backend="cpu"`` call), checks once that the C++ result agrees
with the reference (tt_kernels.verify: bounds from the arithmetic, near ties judged against the
float64 reference), then times both in turns (tt_kernels.measure): warm-up calls discarded, median
over the turns (with min, max and quartiles).
The headline case is tt.transform with B=64, N=197, C=384, D=64, r=16, method="spread", k=4,
fp32.

    python bench/bench_ops.py            # full run, JSON to bench/results/cpu-<machine>.json
    python bench/bench_ops.py --quick    # small shapes, few repeats: a smoke test

Exits with status 1 if any C++ result disagrees with the reference on the benchmarked inputs.
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from tt_kernels import measure, reference, verify
from tt_kernels.machine import machine_info
from tt_kernels.ops import ops

HERE = Path(__file__).resolve().parent
HEADLINE = "transform/spread k=4"  # the case whose speed-up is the goal (>= 2x)


# ----------------------------------------------------------------------------- machine


def machine_slug(info):
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", info["cpu_model"].lower())
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or platform.machine()
    return f"cpu-{model}-{info['usable_cpus']}c"


# ----------------------------------------------------------------------------- inputs


CONSTRUCTIONS = {
    # name: (method, k, alpha)
    "spread k=4": ("spread", 4, 0.0),
    "spread k=1": ("spread", 1, 0.0),
    "prune": ("prune", 1, 0.0),
    "evit": ("evit", 1, 0.0),
    "tome": ("tome", 1, 0.0),
}


def build_cases(shape, constructions, ops_for_first, tag):
    """Cases for one shape: every op for the first construction, match+transform for the others."""
    B, N, C, D, H, r = (shape[key] for key in "BNCDHr")
    inp = measure.vit_tokens(B, N, C, D, heads=H, head_dim=D)
    x, size, metric, score, q, k = (inp[key] for key in ("x", "size", "metric", "score", "q", "k"))
    cases = []
    for i, name in enumerate(constructions):
        method, kk, alpha = CONSTRUCTIONS[name]
        construction = (r, method, kk, 0.1, alpha, "all", 1)
        match_args = (metric, score, size) + construction + ("cosine",)
        step_args = (x, size, metric, score) + construction + ("mean", "cosine")
        wanted = ops_for_first if i == 0 else ("match", "transform")
        for op in wanted:
            if op == "match":
                args = match_args
            elif op == "transform":
                args = step_args
            elif op == "apply":
                dst, weight = reference.match(*match_args)
                args = (x, size, dst, weight, N - r, "mean")
            elif op == "untransform":
                dst, weight = reference.match(*match_args)
                y, _ = reference.apply(x, size, dst, weight, N - r, "mean")
                args = (y, dst, weight)
            elif op == "cls_attention":
                args = (q, k, size, None)
            else:
                raise ValueError(op)
            label = f"{op}/{name}" if op in ("match", "transform", "apply", "untransform") \
                else op
            cases.append(dict(name=f"{label}{tag}", op=op, construction=name, shape=dict(shape),
                              args=args))
    return cases


# ----------------------------------------------------------------------------- check and time


def time_calls(calls, warmup, repeats):
    """{name: timing} of zero-argument calls, `repeats` calls of each in turns."""
    return measure.time_in_turns(calls, *measure.cpu_turns(repeats), warmup=warmup)


def run_case(case, warmup, repeats):
    op, args = case["op"], case["args"]
    ref_fn, cpu_fn = getattr(reference, op), getattr(ops, op)
    with torch.no_grad():
        ok, details = verify.check(op, cpu_fn(*args), *args)
        t = time_calls({"reference": lambda: ref_fn(*args), "cpu": lambda: cpu_fn(*args)}, warmup,
                       repeats)
    ref_t, cpu_t = t["reference"], t["cpu"]
    return {"name": case["name"], "op": op, "construction": case["construction"],
            "shape": case["shape"], "dtype": "float32", "agree": ok, "check": details,
            "reference": ref_t, "cpu": cpu_t,
            "speedup": ref_t["median_ms"] / cpu_t["median_ms"],
            "speedup_of_min": ref_t["min_ms"] / cpu_t["min_ms"]}


def fp32_similarity(metric):
    """The C++ backend's cosine similarities: unit rows, one batched fp32 GEMM (the reference
    computes the same in float64)."""
    m = torch.nn.functional.normalize(metric.float(), dim=-1, eps=1e-12)
    return torch.bmm(m, m.transpose(1, 2))


def similarity_context(shape, warmup, repeats):
    """How long the C++ backend's cosine-similarity GEMM takes alone, to see how much of its
    match/transform is GEMM and how much is the construction."""
    metric = measure.vit_tokens(shape["B"], shape["N"], shape["C"], shape["D"])["metric"]
    t = time_calls({"gemm": lambda: fp32_similarity(metric)}, warmup, repeats)["gemm"]
    return {"shape": dict(shape), **{key: t[key] for key in ("median_ms", "min_ms", "max_ms")}}


# ----------------------------------------------------------------------------- output


def fmt_ms(t):
    return f"{t['median_ms']:9.2f} [{t['min_ms']:.2f}-{t['max_ms']:.2f}]"


def print_table(results):
    head = (f"{'case':<38} {'shape':<22} {'reference ms [min-max]':>28} "
            f"{'C++ ms [min-max]':>26} {'speedup':>8}  agree")
    print(head)
    print("-" * len(head))
    for res in results:
        s = res["shape"]
        shape = f"B{s['B']} N{s['N']} C{s['C']} r{s['r']}"
        mark = " <- goal >= 2x" if res["name"] == HEADLINE else ""
        print(f"{res['name']:<38} {shape:<22} {fmt_ms(res['reference']):>28} "
              f"{fmt_ms(res['cpu']):>26} {res['speedup']:7.2f}x  "
              f"{'yes' if res['agree'] else 'NO'}{mark}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/cpu-<machine>[-quick].json)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend")
    parser.add_argument("--warmup", type=int, default=None, help="discarded calls per backend")
    measure.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    malloc = measure.use_malloc(args.malloc)

    if args.quick:
        main_shape = dict(B=4, N=197, C=384, D=64, H=6, r=16)
        dino_shape = dict(B=4, N=257, C=384, D=64, H=6, r=16)
        repeats, warmup = 3, 1
    else:
        main_shape = dict(B=64, N=197, C=384, D=64, H=6, r=16)  # DeiT-S / ViT-S/16 at 224 px
        dino_shape = dict(B=64, N=257, C=384, D=64, H=6, r=16)  # DINOv2-S/14 at 224 px
        repeats, warmup = 15, 3
    repeats = args.repeats or repeats
    warmup = args.warmup if args.warmup is not None else warmup

    info = machine_info()
    load_before = os.getloadavg()
    print("tt_kernels op benchmark: reference (PyTorch) vs C++ CPU kernels, fp32, CPU tensors")
    print(f"machine: {info['cpu_model']}, {info['usable_cpus']} usable CPUs, "
          f"torch {info['torch']}, "
          f"torch.get_num_threads() = {info['torch_num_threads']} (default, not changed)")
    turns, clock = measure.cpu_turns(repeats)
    print(f"timing: {warmup} warm-up calls discarded, then {turns} turns of {clock}; median over "
          f"the turns (min-max in brackets){'  [--quick]' if args.quick else ''}")
    if load_before[0] > 0.5:
        print(f"note: 1-min load average {load_before[0]:.2f} at the start: other processes have "
              f"used "
              f"the {info['usable_cpus']} CPUs; times may be noisy (min is the least disturbed)")
    print()

    all_ops = ("match", "apply", "untransform", "transform", "cls_attention")
    cases = build_cases(main_shape, list(CONSTRUCTIONS), all_ops, "")
    cases += build_cases(dino_shape, ["spread k=4", "tome"], all_ops, " (N=257)")
    # The headline first, so a slow machine shows the answer early.
    cases.sort(key=lambda c: c["name"] != HEADLINE)

    results = []
    for case in cases:
        res = run_case(case, warmup, repeats)
        results.append(res)
        print(f"  {res['name']:<38} ref {res['reference']['median_ms']:9.2f} ms   "
              f"C++ {res['cpu']['median_ms']:8.2f} ms   {res['speedup']:6.2f}x   "
              f"{'agree' if res['agree'] else 'DISAGREE ' + str(res['check'])}", flush=True)
    context = [similarity_context(s, warmup, repeats) for s in (main_shape, dino_shape)]

    print()
    print_table(results)
    print()
    for c in context:
        print(f"context: the C++ backend's fp32 cosine-similarity GEMM alone, B{c['shape']['B']} "
              f"N{c['shape']['N']} D{c['shape']['D']}: {c['median_ms']:.2f} ms")

    headline = next(r for r in results if r["name"] == HEADLINE)
    goal_met = headline["speedup"] >= 2
    shapes = "quick shapes" if args.quick else "B=64 N=197 C=384 D=64 r=16"
    print(f"\nheadline {HEADLINE} ({shapes}):"
          f" reference {headline['reference']['median_ms']:.2f} ms, C++ "
          f"{headline['cpu']['median_ms']:.2f} ms, {headline['speedup']:.2f}x "
          f"({'meets' if goal_met else 'MISSES'} the 2x goal); by min times "
          f"{headline['reference']['min_ms']:.2f} / {headline['cpu']['min_ms']:.2f} ms, "
          f"{headline['speedup_of_min']:.2f}x")

    name = f"{machine_slug(info)}{'-quick' if args.quick else ''}.json"
    out = args.out or HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "tt_kernels ops: reference vs C++ CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": info,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "timing": {"warmup": warmup, "repeats": repeats, "turns": turns, "clock": str(clock),
                   "malloc": malloc,
                   "order": "turns: reference then C++, C++ then reference, ... "
                            "(tt_kernels.measure.time_in_turns)",
                   "statistic": "median over the turns of the ms per call (min, max, quartiles; "
                                "each turn's times_ms kept)",
                   "grad": "torch.no_grad()"},
        "inputs": "tt_kernels.measure.vit_tokens: random normal x, q, k, metric (metric and k "
                  "with a shared component per image); size random ints 1..4; score a softmax; "
                  "tau 0.1, targets 'all', prefix 1, mode 'mean'",
        "checks": "tt_kernels.verify.check of the C++ outputs against the reference",
        "headline": {"case": HEADLINE, "reference_ms": headline["reference"]["median_ms"],
                     "cpu_ms": headline["cpu"]["median_ms"], "speedup": headline["speedup"],
                     "reference_min_ms": headline["reference"]["min_ms"],
                     "cpu_min_ms": headline["cpu"]["min_ms"],
                     "speedup_of_min": headline["speedup_of_min"],
                     "goal": ">= 2x", "met": goal_met},
        "all_agree": all(r["agree"] for r in results),
        "cases": results,
        "similarity_gemm": context,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")

    bad = [r["name"] for r in results if not r["agree"]]
    if bad:
        print(f"FAIL: C++ results disagree with the reference in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
