"""GPU microbenchmarks of the tt operators: Triton kernels, CUDA C++ kernels and the PyTorch
reference on the same CUDA tensors, at the token shapes of real ViTs.

Ops: tt.transform (the fused step; constructions "spread k=1", "spread k=4", "tome"),
tt.match (same constructions), tt.apply and tt.untransform (T from spread k=1 and k=4) and
tt.cls_attention. Backends: "triton" (tt_kernels.triton_kernels.kernel(op)), "cuda" (the compiled
torch.ops.tt kernels, only for the ops in tt_kernels.backends.CUDA_CPP_OPS) and "reference"
(tt_kernels.reference behind the same argument checks, what backend="reference" runs).

Shapes (bf16 x, q, k; fp32 size, score, weight), batch 1, 64 and 256:
    DeiT-S 197x384 (Dh=64, H=6), DeiT-B 197x768 (H=12), DINOv2-S/14 257x384 (H=6),
    ViT-L/16 at 384 px 577x1024 (H=16); r = 16 (ViT-L: 32), one protected class token. q and k
    are views of one projection as in timm's attention, and each construction's metric is the one
    patch() passes: spread's the full queries [B, N, H * Dh], tome's the keys per head.

Every kernel is first checked against the reference on the same inputs by tt_kernels.verify, on
the CPU, for the first and last few images of the batch (dst exactly, except rows whose choice is a
near tie of the float64 reference: affinities closer than twice their fp32 error bound, which the
GPU's contracted arithmetic may round either way; the other outputs within bounds from the
arithmetic), then the backends of each case are timed in turns (tt_kernels.measure) with
triton.testing.do_bench (L2 flushed before every run; median and 20/80 % quantiles). Reported:
time, achieved GB/s over the bytes the op must move (formulas in `bytes_moved`), % of the card's
peak HBM bandwidth (table PEAK_HBM_TBS by device name) and of a measured device copy, and the
speed-up over the reference. Also the reduction step (tt.transform) as a fraction of one timm
DeiT-S block's forward time at B=256 bf16.

    python bench/bench_gpu.py                      # on a GPU; JSON to bench/results/gpu-<card>.json
    python bench/bench_gpu.py --out a.json --out b.json --models deit_s --batches 256
    TRITON_INTERPRET=1 python bench/bench_gpu.py --smoke   # CPU tensors, tiny shapes, no GPU
    python bench/bench_gpu.py --time-budget 240    # starts no shape that would end past 240 s

Exits 1 if any kernel disagrees with the reference (or fails), 2 if no GPU is found without
--smoke. The JSON is rewritten after every shape, so a run cut short still leaves its results.
"""
import argparse
import datetime
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODELS = {
    # name: (label, N, C, Dh, H, r)
    "deit_s": ("DeiT-S/16 224", 197, 384, 64, 6, 16),
    "deit_b": ("DeiT-B/16 224", 197, 768, 64, 12, 16),
    "dinov2_s": ("DINOv2-S/14 224", 257, 384, 64, 6, 16),
    "vit_l": ("ViT-L/16 384", 577, 1024, 64, 16, 32),
}
SMOKE_MODELS = {
    "tiny": ("tiny (smoke)", 17, 32, 16, 2, 4),
    "small": ("small (smoke)", 33, 48, 16, 3, 8),
}
BATCHES = (1, 64, 256)
SMOKE_BATCHES = (1, 2)

CONSTRUCTIONS = {
    # name: (method, k, tau, alpha, targets)
    "spread k=1": ("spread", 1, 0.1, 0.0, "all"),
    "spread k=4": ("spread", 4, 0.1, 0.0, "all"),
    "tome": ("tome", 1, 0.1, 0.0, "all"),
}
PREFIX = 1

# Peak HBM bandwidth by device name (vendor datasheets), in TB/s. First match wins.
# torch names the SXM H100 "NVIDIA H100 80GB HBM3"; GH200 and H100 NVL are not in the table.
PEAK_HBM_TBS = (
    ("H200", lambda n: re.search(r"\bh200\b", n), 4.8),
    ("H100 PCIe", lambda n: re.search(r"\bh100\b", n) and "pcie" in n, 2.0),
    ("H100 SXM", lambda n: re.search(r"\bh100\b", n) and ("sxm" in n or "hbm3" in n), 3.35),
)

# Each backend's output is checked on the first and last CHECK_IMAGES images of a batch: every op
# works image by image, so the others would add CPU reference time, not coverage.
CHECK_IMAGES = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU tensors under TRITON_INTERPRET=1, tiny shapes, time.perf_counter")
    p.add_argument("--out", action="append", default=None,
                   help="JSON path (repeatable; default bench/results/gpu-<card>.json, "
                        "smoke: out/bench/gpu-smoke.json)")
    p.add_argument("--out-dir", action="append", default=None,
                   help="folder for the JSON under its default name (repeatable; with --out too)")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--ops", default=None,
                   help="comma-separated subset of transform,match,apply,untransform,cls_attention")
    p.add_argument("--warmup-ms", type=float, default=25.0,
                   help="do_bench warm-up (ms) of each backend, split over the turns")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="do_bench repetition time (ms) of each backend, split over the turns")
    p.add_argument("--smoke-repeats", type=int, default=3, help="timed calls per case in --smoke")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="peak HBM bandwidth in GB/s for a card missing from the table")
    p.add_argument("--no-block", action="store_true", help="skip the timm DeiT-S block timing")
    p.add_argument("--no-check", action="store_true", help="time without checking (not advised)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: a shape (model and batch) whose start plus the longest shape so "
                        "far would pass this is skipped and listed in the JSON's `skipped`")
    return p.parse_args(argv)


ARGS = parse_args(None if __name__ == "__main__" else [])
if ARGS.smoke:
    # The interpreter must be on before any @triton.jit module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tt_kernels  # noqa: E402
from tt_kernels import backends, measure, reference, verify  # noqa: E402
from tt_kernels import triton_kernels  # noqa: E402
from tt_kernels.machine import device_info, git_state, slug, versions  # noqa: E402
from tt_kernels.patch import TokenReduction  # noqa: E402
from tt_kernels.rules import OPS  # noqa: E402

# On a GPU each case's backends take turns, do_bench's time split over them: A B C, then C B A
# gives every backend the same mean place; each more turn would cost do_bench's fixed calls
# (its first, five to estimate, at least one warm-up) again, much for the slow reference.
TURNS = 2


# ----------------------------------------------------------------------------- machine


def peak_bandwidth(name, override_gbs):
    """(peak GB/s or None, where it came from)."""
    if override_gbs:
        return override_gbs, "--peak-gbs"
    low = name.lower()
    for label, match, tbs in PEAK_HBM_TBS:
        if match(low):
            return tbs * 1000, f"table: {label} {tbs} TB/s"
    return None, "unknown card"


def device_facts(device):
    """tt_kernels.machine.device_info and the card's peak HBM bandwidth."""
    info = device_info(device)
    if device.type != "cuda":
        return dict(info, peak_hbm_gbs=None, peak_source="smoke: no HBM")
    info["peak_hbm_gbs"], info["peak_source"] = peak_bandwidth(info["name"], ARGS.peak_gbs)
    if info["peak_hbm_gbs"] is None:
        print(f"WARNING: no peak bandwidth known for {info['name']!r}; % of peak is left out "
              f"(give --peak-gbs)", file=sys.stderr)
    return info


# ----------------------------------------------------------------------------- timing


def make_timer(device):
    """(turns, clock) of tt_kernels.measure: on a GPU TURNS turns of do_bench, --warmup-ms and
    --rep-ms split over them; in --smoke one turn of --smoke-repeats calls (the interpreter is
    slow, and its times mean nothing)."""
    if device.type == "cuda":
        return TURNS, measure.DoBenchClock(ARGS.warmup_ms / TURNS, ARGS.rep_ms / TURNS)
    return 1, measure.CpuClock(max(ARGS.smoke_repeats, 1))


def timed(calls, timer):
    """{name: {median_ms, p20_ms, p80_ms}} of the zero-argument calls, timed in turns."""
    turns, clock = timer
    return {name: {key: t[key] for key in ("median_ms", "p20_ms", "p80_ms")}
            for name, t in measure.time_in_turns(calls, turns, clock).items()}


def copy_bandwidth(device, timer):
    """A device-to-device copy of 1 GiB (bytes read + written over the time): the measured
    ceiling, in GB/s."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = timed({"copy": lambda: dst.copy_(src)}, timer)["copy"]
    del src, dst
    return 2 * 2**30 / (t["median_ms"] * 1e-3) / 1e9


# ----------------------------------------------------------------------------- inputs and bytes


def bytes_moved(op, B, N, C, Dh, H, K, r, ex, em, score=False, size_read=False):
    """The fewest bytes the op must move through device memory (each input read once, each output
    written once). ex: bytes per x element (bf16: 2), em: per metric/q/k element; fp32 size, score
    and weight (4 bytes), int64 dst (8 bytes); N' = N - r output tokens.

      match:         B*N*H*Dh*em (metric: full queries or per-head keys) [+ B*N*4 score]
                     [+ B*N*4 size] + B*N*K*(8+4) (dst, weight)
      apply:         B*N*C*ex (x) + B*N*4 (size) + B*N*K*(8+4) (T) + B*N'*C*ex (x') + B*N'*4 (size')
      untransform:   B*N'*C*ex (y) + B*N*K*(8+4) (T) + B*N*C*ex (x_full)
      transform:     match's bytes + B*N*C*ex (x) + B*N*4 (size) + B*N'*C*ex + B*N'*4 (x', size');
                     T is written once (its re-read inside the fused step is not counted)
      cls_attention: B*H*Dh*em (class queries only) + B*H*N*Dh*em (k) + B*N*4 (size) + B*N*4 (score)
    """
    n_out = N - r
    t_bytes = B * N * K * (8 + 4)
    if op == "match":
        return B * N * H * Dh * em + (B * N * 4 if score else 0) + (B * N * 4 if size_read else 0) \
            + t_bytes
    if op == "apply":
        return B * N * C * ex + B * N * 4 + t_bytes + B * n_out * C * ex + B * n_out * 4
    if op == "untransform":
        return B * n_out * C * ex + t_bytes + B * N * C * ex
    if op == "transform":
        return bytes_moved("match", B, N, C, Dh, H, K, r, ex, em, score, False) \
            + B * N * C * ex + B * N * 4 + B * n_out * C * ex + B * n_out * 4
    if op == "cls_attention":
        return B * H * Dh * em + B * H * N * Dh * em + B * N * 4 + B * N * 4
    raise ValueError(op)


# ----------------------------------------------------------------------------- checks


def check(op, out, args):
    """(ok, details): tt_kernels.verify's judgement of one backend's output against the reference,
    both on the CPU, for the checked images (CHECK_IMAGES): dst exactly, except rows whose choice
    is a near tie of the float64 reference (within the fp32 error bound of the GPU's arithmetic);
    weights, x, sizes and scores within their bounds."""
    out = out if isinstance(out, tuple) else (out,)
    B = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
    ends = torch.arange(min(B, CHECK_IMAGES)), torch.arange(max(B - CHECK_IMAGES, 0), B)
    images = torch.cat(ends).unique()

    def on_cpu(a):
        return a.index_select(0, images.to(a.device)).cpu() if isinstance(a, torch.Tensor) else a

    ok, details = verify.check(op, tuple(map(on_cpu, out)), *map(on_cpu, args))
    return ok, {"images_checked": images.tolist(), **details}


# ----------------------------------------------------------------------------- cases


def timm_layout(q, k):
    """q, k [B, H, N, Dh] as the views of one [B, N, 2, H, Dh] projection that timm's attention
    reads them from (and patch() passes on): the strides the kernels meet in a model."""
    qk = torch.stack((q, k), 2).permute(0, 3, 2, 1, 4).contiguous()
    return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)


def build_cases(model, B, inp, dtype, ops):
    """The cases of one model and batch. Each construction compares the tokens by the metric
    patch() passes for it (TokenReduction.metric_of): spread the full queries [B, N, H * Dh],
    tome the keys per head [B, H, N, Dh], summed over heads inside the op."""
    label, N, C, D, H, r = (MODELS | SMOKE_MODELS)[model]
    ex = em = torch.empty(0, dtype=dtype).element_size()
    cases = []

    def add(op, construction, args, K, score=False, size_read=False):
        nbytes = bytes_moved(op, B, N, C, D, H, K, r, ex, em, score, size_read)
        name = f"{model} B={B} {op}" + (f"/{construction}" if construction else "")
        cases.append(dict(name=name, model=model, model_label=label, B=B, N=N, C=C, Dh=D, H=H,
                          r=r, dtype=str(dtype).replace("torch.", ""), op=op,
                          construction=construction, K=K, bytes=nbytes, args=args))

    x, size = inp["x"], inp["size"]
    queries, keys = timm_layout(inp["q"], inp["k"])
    metrics = {name: TokenReduction(method=c[0]).metric_of(queries, keys)
               for name, c in CONSTRUCTIONS.items()}
    for name, (method, k, tau, alpha, targets) in CONSTRUCTIONS.items():
        K = k if method == "spread" else 1
        construction = (r, method, k, tau, alpha, targets, PREFIX)
        if "transform" in ops:
            add("transform", name, (x, size, metrics[name], None) + construction +
                ("mean", "cosine"), K)
        if "match" in ops:
            add("match", name, (metrics[name], None, size) + construction + ("cosine",), K)
    for name in ("spread k=1", "spread k=4"):
        method, k, tau, alpha, targets = CONSTRUCTIONS[name]
        if "apply" not in ops and "untransform" not in ops:
            break
        dst, weight = reference.match(metrics[name], None, size, r, method, k, tau, alpha,
                                      targets, PREFIX)
        if "apply" in ops:
            add("apply", f"T of {name}", (x, size, dst, weight, N - r, "mean"), k)
        if "untransform" in ops:
            y, _ = reference.apply(x, size, dst, weight, N - r, "mean")
            add("untransform", f"T of {name}", (y, dst, weight), k)
    if "cls_attention" in ops:
        add("cls_attention", None, (queries, keys, size, None), 1)
    return cases


def implementations(op, device):
    """{backend: callable} for the backends that have `op` on this device. On CPU (--smoke) the
    compiled CPU kernels stand in for the CUDA ones, through the same torch.ops.tt call."""
    impls = {}
    compiled = "cuda" if device.type == "cuda" else "cpu"
    for name in ("triton", compiled, "reference"):
        if name == compiled and op not in backends.CUDA_CPP_OPS:
            continue  # only the ops with CUDA C++ kernels (in smoke: the same set, on CPU)
        try:
            impls[name] = backends.implementation(op, name, device)
        except ValueError as e:
            impls[name] = e
    return impls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case, device, timer, peak_gbs, copy_gbs):
    op, args = case["op"], case["args"]
    results, calls = {}, {}
    for backend, fn in implementations(op, device).items():
        res = results[backend] = {}
        if isinstance(fn, Exception):
            res["error"] = f"unavailable: {fn}"
            continue
        try:  # a first call, untimed: it compiles (Triton), and its output is checked
            out = fn(*args)
            sync(device)
            if backend != "reference" and not ARGS.no_check:
                ok, details = check(op, out, args)
                res["check"] = {"ok": ok, **details}
            del out
            calls[backend] = lambda fn=fn: fn(*args)
        except Exception as e:  # a kernel that fails is recorded, the run goes on
            failed(res, e)
    try:
        for backend, t in timed(calls, timer).items():
            results[backend].update(t)
    except Exception as e:  # recorded for every backend timed in the same turns
        for backend in calls:
            failed(results[backend], e)
    for backend in calls:
        res = results[backend]
        if "median_ms" not in res:
            continue
        ms = res["median_ms"]
        res["gbs"] = case["bytes"] / (ms * 1e-3) / 1e9
        res["pct_peak_hbm"] = 100 * res["gbs"] / peak_gbs if peak_gbs else None
        res["pct_copy"] = 100 * res["gbs"] / copy_gbs if copy_gbs else None
    ref_ms = results.get("reference", {}).get("median_ms")
    for backend, res in results.items():
        if "median_ms" in res and ref_ms:
            res["speedup_vs_reference"] = ref_ms / res["median_ms"]
    return results


# ----------------------------------------------------------------------------- reduction step


def failed(res, e):
    res["error"] = f"{type(e).__name__}: {e}"
    res["traceback"] = traceback.format_exc(limit=6)
    res.setdefault("check", {"ok": False})


def reduction_step(records, device, dtype, timer, model, B):
    """tt.transform (the whole reduction step) against one timm DeiT-S block's forward."""
    out = {"model": "deit_small_patch16_224", "block": "model.blocks[0]", "B": B,
           "dtype": str(dtype).replace("torch.", ""), "step_shape_model": model,
           "step": "tt.transform (similarity, T and its application in one op) on the metric "
                   "patch() passes (tome: the keys per head, summed inside the op)"}
    try:
        import timm
        net = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
        block = net.blocks[0].to(device=device, dtype=dtype).eval()
        tokens = torch.randn(B, 197, 384, device=device).to(dtype)
        with torch.no_grad():
            out["block_ms"] = timed({"block": lambda: block(tokens)}, timer)["block"]
        del net, block, tokens
    except Exception as e:
        out["error"] = f"block timing failed: {type(e).__name__}: {e}"
        return out
    blk = out["block_ms"]["median_ms"]
    steps = {}
    for rec in records:
        if rec["model"] == model and rec["B"] == B and rec["op"] == "transform":
            for backend, res in rec["results"].items():
                if "median_ms" in res:
                    ms = res["median_ms"]
                    steps.setdefault(rec["construction"], {})[backend] = {
                        "ms": ms, "fraction_of_block": ms / blk}
    out["steps"] = steps
    if device.type != "cuda":
        out["note"] = "smoke: CPU block and tiny step shape; not meaningful"
    return out


# ----------------------------------------------------------------------------- Triton resources


def triton_resources():
    """Registers, spills and shared memory of every compiled Triton kernel (best effort: the
    JIT cache layout differs across Triton versions)."""
    import importlib

    import triton
    rows, seen = [], set()
    if triton_kernels.interpreted():
        return rows
    for mod_name in triton_kernels.OPS:
        mod = importlib.import_module(f"{triton_kernels.__name__}.{mod_name}")
        for name, obj in vars(mod).items():
            if not isinstance(obj, triton.runtime.jit.JITFunction) or id(obj) in seen:
                continue
            seen.add(id(obj))
            try:
                for entry in getattr(obj, "device_caches", {}).values():
                    cache = entry[0] if isinstance(entry, tuple) else entry
                    for key, kernel in dict(cache).items():
                        meta = getattr(kernel, "metadata", None)
                        rows.append({"kernel": name, "n_regs": getattr(kernel, "n_regs", None),
                                     "n_spills": getattr(kernel, "n_spills", None),
                                     "shared_bytes": getattr(meta, "shared", None),
                                     "num_warps": getattr(meta, "num_warps", None),
                                     "key": str(key)[:300]})
            except Exception as e:
                rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"})
    return rows


def fastest(records):
    """{"B": the largest batch measured, op: backends, fastest first}: each backend's medians summed
    over that batch's cases of the op (every model and construction), for the backends that ran
    and passed all of them (the reference is not checked). What GPU_ORDER in tt_kernels/backends.py
    follows."""
    if not records:
        return {}
    top = max(rec["B"] for rec in records)
    order = {"B": top}
    for op in OPS:
        recs = [rec for rec in records if rec["op"] == op and rec["B"] == top]
        totals = {}
        for backend in {b for rec in recs for b in rec["results"]}:
            runs = [rec["results"].get(backend, {}) for rec in recs]
            if all("median_ms" in res and res.get("check", {}).get("ok", True) for res in runs):
                totals[backend] = sum(res["median_ms"] for res in runs)
        if totals:
            order[op] = sorted(totals, key=totals.get)
    return order


# ----------------------------------------------------------------------------- output


def strip(case):
    return {key: v for key, v in case.items() if key != "args"}


def write_json(doc, paths):
    text = json.dumps(doc, indent=1, default=str)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def fmt(v, spec):
    if isinstance(v, (int, float)):
        return format(v, spec)
    width = re.match(r"\d*", spec).group()
    return "-".rjust(int(width) if width else 1)


def print_table(records):
    head = f"{'case':44} {'backend':9} {'check':6} {'median ms':>10} {'p20':>9} {'p80':>9} " \
           f"{'GB/s':>8} {'%peak':>6} {'x ref':>7}"
    print(head)
    print("-" * len(head))
    for rec in records:
        for backend, res in rec["results"].items():
            chk = res.get("check", {}).get("ok")
            chk = "-" if chk is None else ("ok" if chk else "FAIL")
            if "error" in res:
                chk = "ERROR" if not res["error"].startswith("unavailable") else "n/a"
            print(f"{rec['name'][:44]:44} {backend:9} {chk:6} {fmt(res.get('median_ms'), '10.4f')} "
                  f"{fmt(res.get('p20_ms'), '9.4f')} {fmt(res.get('p80_ms'), '9.4f')} "
                  f"{fmt(res.get('gbs'), '8.1f')} {fmt(res.get('pct_peak_hbm'), '6.1f')} "
                  f"{fmt(res.get('speedup_vs_reference'), '7.2f')}")


# ----------------------------------------------------------------------------- main


def main():
    smoke = ARGS.smoke
    if smoke:
        device = torch.device("cpu")
        if not triton_kernels.interpreted():
            print("--smoke needs TRITON_INTERPRET=1 set before Triton is imported", file=sys.stderr)
            return 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU visible: run on a GPU, or use --smoke (CPU, Triton interpreter)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference's similarities in true fp32
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.bfloat16
    models = SMOKE_MODELS if smoke else MODELS
    model_names = ARGS.models.split(",") if ARGS.models else list(models)
    unknown = [m for m in model_names if m not in models]
    if unknown:
        print(f"unknown models {unknown}; choose from {list(models)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in ARGS.batches.split(",")] if ARGS.batches else \
        list(SMOKE_BATCHES if smoke else BATCHES)
    ops = ARGS.ops.split(",") if ARGS.ops else list(OPS)

    dev = device_facts(device)
    default_name = "gpu-smoke.json" if smoke else f"gpu-{slug(dev['name'])}.json"
    paths = [Path(p) for p in ARGS.out or ()] + [Path(d) / default_name for d in ARGS.out_dir or ()]
    if not paths:
        paths = [ROOT / "out" / "bench" / default_name] if smoke else \
            [HERE / "results" / default_name]
    timer = make_timer(device)
    dev["measured_copy_gbs"] = copy_bandwidth(device, timer)
    doc = {
        "what": "tt_kernels GPU microbenchmarks (bench/bench_gpu.py)",
        "mode": "smoke" if smoke else "gpu",
        "complete": False,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "versions": versions(),
        "build": tt_kernels.build_info(),
        "git": git_state(),
        "timing": {"method": f"{timer[0]} turns (tt_kernels.measure.time_in_turns; the "
                             f"backends of a case in turn, in order then reversed) of "
                             f"{timer[1]}", "quantiles": "median, p20, p80"},
        "checks_method": "each kernel's output, before timing, by tt_kernels.verify.check against "
                         "the reference on the CPU, for the first and last "
                         f"{CHECK_IMAGES} images of each batch: dst exactly except rows whose "
                         "choice is a near tie of the float64 reference (affinities closer than "
                         "twice their fp32 error bound), other outputs within bounds from the "
                         "arithmetic",
        "bytes_method": bytes_moved.__doc__,
        "shapes": {m: dict(zip(("label", "N", "C", "Dh", "H", "r"), models[m]))
                   for m in model_names},
        "batches": batches,
        "dtype": "bfloat16 (x, q, k; the metrics are views of q, k); fp32 size, score, weight",
        "constructions": {n: dict(zip(("method", "k", "tau", "alpha", "targets"), c))
                          for n, c in CONSTRUCTIONS.items()},
        "cases": [],
        "errors": [],
    }
    print(f"device: {dev['name']}  peak: {dev['peak_hbm_gbs']} GB/s ({dev['peak_source']})  "
          f"measured copy: {fmt(dev['measured_copy_gbs'], '.0f')} GB/s")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
          f"{triton_kernels.triton_version()}, cuda C++ ops {list(backends.CUDA_CPP_OPS)}")
    write_json(doc, paths)
    records = doc["cases"]
    doc["skipped"] = []
    step_model, step_b = ("tiny", 2) if smoke else ("deit_s", 256)
    started, longest = time.perf_counter(), 0.0
    with torch.no_grad():
        for model in model_names:
            label, N, C, D, H, r = models[model]
            for B in batches:
                t0 = time.perf_counter()
                if ARGS.time_budget is not None and t0 - started + longest > ARGS.time_budget:
                    doc["skipped"].append(f"{model} B={B}")
                    print(f"[{model} B={B}: skipped, --time-budget {ARGS.time_budget:g} s]")
                    continue
                try:
                    inp = measure.vit_tokens(B, N, C, D, dtype=dtype, heads=H, head_dim=D,
                                             device=device)
                    cases = build_cases(model, B, inp, dtype, ops)
                except Exception as e:
                    doc["errors"].append(f"{model} B={B} inputs: {type(e).__name__}: {e}")
                    continue
                for case in cases:
                    case["results"] = run_case(case, device, timer, dev["peak_hbm_gbs"],
                                               dev["measured_copy_gbs"])
                    records.append(strip(case))
                del inp, cases
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if (model, B) == (step_model, step_b) and not ARGS.no_block and "transform" in ops:
                    doc["reduction_step"] = reduction_step(records, device, dtype, timer,
                                                           step_model, step_b)
                longest = max(longest, time.perf_counter() - t0)
                print(f"[{model} B={B}: {time.perf_counter() - t0:.1f} s]", flush=True)
                write_json(doc, paths)
        if "reduction_step" not in doc:
            doc["reduction_step"] = {"skipped": f"needs {step_model} B={step_b} and the transform "
                                                "op in the run, without --no-block"}
    try:
        doc["triton_kernel_resources"] = triton_resources()
    except Exception as e:
        doc["triton_kernel_resources"] = [{"error": f"{type(e).__name__}: {e}"}]
    failed = [f"{rec['name']} [{b}]" for rec in records for b, res in rec["results"].items()
              if (res.get("check", {}).get("ok") is False)
              or ("error" in res and not res["error"].startswith("unavailable"))]
    checked = sum(1 for rec in records for res in rec["results"].values() if "check" in res)
    doc["checks"] = {"checked": checked, "failed": failed}
    doc["fastest"] = fastest(records)
    doc["all_passed"] = not failed and not doc["errors"]
    doc["complete"] = True
    doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(doc, paths)

    print_table(records)
    step = doc.get("reduction_step", {})
    if "steps" in step:
        print(f"\nreduction step vs one DeiT-S block (B={step['B']}, block "
              f"{step['block_ms']['median_ms']:.3f} ms):")
        for construction, per in step["steps"].items():
            print("  " + construction + ": " + ", ".join(
                f"{b} {v['ms']:.3f} ms = {100 * v['fraction_of_block']:.1f}%"
                for b, v in per.items()))
    elif step:
        print(f"\nreduction step: {step.get('error') or step.get('skipped')}")
    spills = [row for row in doc["triton_kernel_resources"] if row.get("n_spills")]
    if spills:
        print("\nTriton kernels with register spills: " + ", ".join(
            sorted({f"{row['kernel']} ({row['n_spills']})" for row in spills})))
    print(f"\nchecks: {checked - len(failed)}/{checked} passed" +
          (f"; FAILED: {', '.join(failed)}" if failed else "") +
          (f"; errors: {doc['errors']}" if doc["errors"] else "") +
          (f"; skipped for time: {', '.join(doc['skipped'])}" if doc["skipped"] else ""))
    if len(doc["fastest"]) > 1:
        print(f"fastest at B={doc['fastest']['B']}: " + "; ".join(
            f"{op}: {' < '.join(order)}" for op, order in doc["fastest"].items() if op != "B"))
    print("JSON: " + ", ".join(str(p) for p in paths))
    return 0 if doc["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
