"""Microbenchmarks of the tt operators on CPU: the pure-PyTorch reference against the C++ kernels.

Every case runs the same arguments through ``tt_kernels.reference.<op>`` and ``torch.ops.tt.<op>``
(what ``backend="reference"`` and ``backend="cpu"`` call), checks once that the results agree, then
times both: warm-up calls discarded, median of the repeats (with min, max and quartiles).
The headline case is tt.transform with B=64, N=197, C=384, D=64, r=16, method="transform", k=4,
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
import statistics
import sys
import time
from pathlib import Path

import torch

from tt_kernels import reference
from tt_kernels.machine import machine_info
from tt_kernels.ops import ops

HERE = Path(__file__).resolve().parent
HEADLINE = "transform/transform k=4"  # the case whose speed-up is the goal (>= 2x)
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 sums in a different order
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- machine


def machine_slug(info):
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", info["cpu_model"].lower())
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or platform.machine()
    return f"cpu-{model}-{info['usable_cpus']}c"


# ----------------------------------------------------------------------------- inputs


def make_inputs(B, N, C, D, H, seed=0):
    """Random tokens in a mid-network state: sizes 1..4 (as after earlier merges), a score that is
    a real class attention (sums to 1 per image), keys averaged over heads as the metric."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    size = torch.randint(1, 5, (B, N), generator=g).float()
    metric = k.mean(1)
    score = reference.cls_attention(q, k, size)
    return dict(x=x, q=q, k=k, size=size, metric=metric, score=score)


CONSTRUCTIONS = {
    # name: (method, k, alpha)
    "transform k=4": ("transform", 4, 0.0),
    "transform k=1": ("transform", 1, 0.0),
    "prune": ("prune", 1, 0.0),
    "evit": ("evit", 1, 0.0),
    "tome": ("tome", 1, 0.0),
}


def build_cases(shape, constructions, ops_for_first, tag):
    """Cases for one shape: every op for the first construction, match+transform for the others."""
    B, N, C, D, H, r = (shape[key] for key in "BNCDHr")
    inp = make_inputs(B, N, C, D, H)
    x, size, metric, score, q, k = (inp[key] for key in ("x", "size", "metric", "score", "q", "k"))
    cases = []
    for i, name in enumerate(constructions):
        method, kk, alpha = CONSTRUCTIONS[name]
        construction = (r, method, kk, 0.1, alpha, "all", 1)
        match_args = (metric, score, size) + construction
        step_args = (x, size, metric, score) + construction + ("mean",)
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


def compare(op, ref_out, cpu_out):
    """(ok, details): dst exactly, floats within tolerance."""
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    cpu_out = cpu_out if isinstance(cpu_out, tuple) else (cpu_out,)
    names = {"match": ("dst", "weight"), "apply": ("x", "size"), "untransform": ("x",),
             "transform": ("x", "size", "dst", "weight"), "cls_attention": ("score",)}[op]
    if not len(names) == len(ref_out) == len(cpu_out):
        return False, {"outputs": f"{len(ref_out)} reference vs {len(cpu_out)} C++ outputs"}
    ok, details = True, {}
    for name, a, b in zip(names, ref_out, cpu_out, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            ok = False
            details[name] = f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        elif name == "dst":
            bad = int((a != b).sum())
            ok &= bad == 0
            details[name] = f"{bad} differ"
        else:
            tol = WEIGHT_TOL if name == "weight" else TOL
            close = torch.allclose(a.float(), b.float(), **tol)
            ok &= close
            details[name] = f"max abs diff {float((a.float() - b.float()).abs().max()):.2e}"
    return bool(ok), details


def summarize(times, warmup):
    times = sorted(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "q1_ms": q1, "q3_ms": q3, "repeats": len(times), "warmup": warmup,
            "times_ms": times}


def time_calls(fns, args, warmup, repeats, rounds=3):
    """Times several implementations of one call in `rounds` alternating blocks (A B, B A, ...),
    so that a load change on a shared machine hits all of them alike. Each block starts with one
    discarded call, so no implementation is timed on caches the other one just evicted."""
    for fn in fns:
        for _ in range(warmup):
            fn(*args)
    rounds = max(1, min(rounds, repeats))
    times = [[] for _ in fns]
    for rnd in range(rounds):
        count = repeats // rounds + (rnd < repeats % rounds)
        for i in (range(len(fns)) if rnd % 2 == 0 else reversed(range(len(fns)))):
            fns[i](*args)
            for _ in range(count):
                start = time.perf_counter()
                fns[i](*args)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [summarize(t, warmup) for t in times]


def run_case(case, warmup, repeats):
    op = case["op"]
    ref_fn = getattr(reference, op)
    cpu_fn = getattr(ops, op)
    with torch.no_grad():
        ok, details = compare(op, ref_fn(*case["args"]), cpu_fn(*case["args"]))
        ref_t, cpu_t = time_calls((ref_fn, cpu_fn), case["args"], warmup, repeats)
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
    inp = make_inputs(shape["B"], shape["N"], shape["C"], shape["D"], shape["H"])
    t, = time_calls((fp32_similarity,), (inp["metric"],), warmup, repeats)
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
    args = parser.parse_args(argv)

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
    print(f"timing: {warmup} warm-up calls discarded, median of {repeats} "
          f"(min-max in brackets){'  [--quick]' if args.quick else ''}")
    if load_before[0] > 0.5:
        print(f"note: 1-min load average {load_before[0]:.2f} at the start: other processes have "
              f"used "
              f"the {info['usable_cpus']} CPUs; times may be noisy (min is the least disturbed)")
    print()

    all_ops = ("match", "apply", "untransform", "transform", "cls_attention")
    cases = build_cases(main_shape, list(CONSTRUCTIONS), all_ops, "")
    cases += build_cases(dino_shape, ["transform k=4", "tome"], all_ops, " (N=257)")
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
        "timing": {"warmup": warmup, "repeats": repeats, "clock": "time.perf_counter",
                   "order": "3 rounds of blocks, reference then C++, C++ then reference, ...; "
                            "each block starts with one more discarded call",
                   "statistic": "median (min, max, quartiles; raw times_ms kept)",
                   "grad": "torch.no_grad()"},
        "inputs": "random normal x, q, k; metric = k averaged over heads; size random ints 1..4; "
                  "score = reference cls_attention(q, k, size); tau 0.1, targets 'all', prefix 1, "
                  "mode 'mean'",
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
