"""Verify this machine's GPU kernels against the reference, once; then they are the default.

    python -m tt_kernels.selftest            # about a minute on a GPU
    python -m tt_kernels.selftest --quick    # tiny shapes (with TRITON_INTERPRET=1: a CPU dry run)

Runs every op (match, transform, apply, untransform, cls_attention), construction and dtype of
each GPU backend of this build (the CUDA C++ kernels, Triton) at the token shapes of the standard
models, so that each kernel runs with the launch plan those models get, and checks every output
against the PyTorch reference with tt_kernels.verify's bounds. When every case of a backend
agrees, the pass is recorded under this GPU's fingerprint (verdicts.py) and from then on that
backend is the default on CUDA tensors here; a failure is recorded too, keeps the reference, and is
printed with what disagreed. `tt_kernels.build_info()["verified_on_gpu"]` says where each verdict
comes from.
"""
import argparse
import sys
import time

import torch

from . import backends, reference, verdicts, verify
from .api import max_r
from .measure import vit_tokens

# name: (tokens N, channels C, heads H, batches); head dim 64. The metric is the full queries
# (D = C) for transform, the keys per head ([B, H, N, 64]) for tome, as tt_kernels.patch passes
# them.
# Batches: small ones spread each image's removal keys over several blocks (match.cu's keys_kernel), a
# batch of 160 fills a GPU of up to 320 SMs with one block per image.
MODELS = {
    "DeiT-S/16-224": (197, 384, 6, (1, 4, 160)),
    "DeiT-B/16-224": (197, 768, 12, (1, 4)),
    "DINOv2-S/14-224": (257, 384, 6, (1, 4)),
    "ViT-L/16-384": (577, 1024, 16, (2,)),
    "DINOv2-S/14-518": (1370, 384, 6, (2,)),
}
QUICK = {"tiny-37": (37, 24, 2, (1, 4)), "tiny-64": (64, 32, 2, (1, 4))}
HEAD_DIM = 64
# name: (tt.match keywords, apply mode); "default" is tt_kernels.patch's default step.
CONSTRUCTIONS = {
    "default": (dict(method="spread", k=1, tau=0.1, alpha=0.0, targets="all", cost="ward"),
                "norm"),
    "transform-k4": (dict(method="spread", k=4, tau=0.1, alpha=0.5, targets="all",
                          cost="cosine"), "mean"),
    "tome": (dict(method="tome"), "mean"),
    "prune": (dict(method="prune"), "mean"),
    "evit": (dict(method="evit"), "mean"),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MATCH_ORDER = ("k", "tau", "alpha", "targets")


def tokens(B, N, C, H, dtype, device, seed):
    """Inputs that look like a ViT block's (tt_kernels.measure.vit_tokens, drawn on the CPU so that
    every device gets the same): x, the full queries as transform's metric (D = C), sizes 1-4, a
    softmax score and per-head q, k (k: tome's metric)."""
    t = vit_tokens(B, N, C, D=C, dtype=dtype, seed=seed, heads=H, head_dim=HEAD_DIM)
    return {name: v.to(device) for name, v in t.items()}


def cases(shapes, dtypes, device):
    """(name, op, args) for every op, construction, dtype and shape; args positional as in the
    op's schema."""
    seed = 0
    for model, (N, C, H, batches) in shapes.items():
        for dtype in dtypes:
            for B in batches:
                seed += 1
                t = tokens(B, N, C, H, dtype, device, seed)
                tag = f"{model}-B{B}-{str(dtype)[6:]}"
                for name, (kw, mode) in CONSTRUCTIONS.items():
                    metric = t["k"] if kw["method"] == "tome" else t["metric"]
                    r = min(N // 4, max_r(kw["method"], N, 1, kw.get("alpha") == 1))
                    full = dict(dict(k=1, tau=0.1, alpha=0.0, targets="all", cost="cosine"), **kw)
                    rest = (r, full["method"], *(full[k] for k in MATCH_ORDER), 1)
                    yield (f"match-{name}-{tag}", "match",
                           (metric, t["score"], t["size"], *rest, full["cost"]))
                    yield (f"transform-{name}-{tag}", "transform",
                           (t["x"], t["size"], metric, t["score"], *rest, mode, full["cost"]))
                    if name == "default":
                        dst, weight = reference.match(
                            metric, t["score"], t["size"], *rest, full["cost"])
                        for m in ("sum", "mean", "norm"):
                            yield (f"apply-{m}-{tag}", "apply",
                                   (t["x"], t["size"], dst, weight, N - r, m))
                        y = t["x"][:, :N - r]
                        yield f"untransform-{tag}", "untransform", (y, dst, weight)
                yield f"cls_attention-{tag}", "cls_attention", (t["q"], t["k"], t["size"], None)


def run(implementations, shapes=MODELS, dtypes=DTYPES, device="cuda", log=print,
        time_budget=None):
    """Runs every case with each backend in turn: {backend: {"passed", "cases", "failed",
    "skipped", "seconds"}}. A backend passes only if every case ran and agreed; cases left when
    `time_budget` seconds (all backends together) have passed are skipped.

    `implementations` maps a backend's name to a function op -> the callable that runs it (same
    signature as the torch.ops.tt op)."""
    device = torch.device(device)
    start = time.perf_counter()
    all_cases = list(cases(shapes, dtypes, device))
    results = {}
    for name, implementation in implementations.items():
        result = results[name] = {"passed": True, "cases": 0, "failed": [], "skipped": 0,
                                  "seconds": 0.0}
        for i, (case, op, args) in enumerate(all_cases):
            if time_budget is not None and time.perf_counter() - start > time_budget:
                result["skipped"] = len(all_cases) - i
                result["passed"] = False
                log(f"{name}: out of time after {i} of {len(all_cases)} cases")
                break
            began = time.perf_counter()
            try:
                ok, details = verify.check(op, implementation(op)(*args), *args)
            except Exception as error:  # noqa: BLE001  (a crash is a failed case, reported)
                ok, details = False, {"error": f"{type(error).__name__}: {error}"[:300]}
            result["seconds"] += time.perf_counter() - began
            result["cases"] += 1
            if not ok:
                result["passed"] = False
                result["failed"].append({"case": case, **details})
                log(f"FAIL {name} {case}: {details}")
    return results


def gpu_backends(device):
    """The GPU backends of this build that run every op on `device`."""
    names = []
    for name in verdicts.BACKENDS:
        try:
            for op in backends.OPS:
                backends.resolve(op, name, device)
        except ValueError:
            continue
        names.append(name)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (a dry run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", choices=verdicts.BACKENDS,
                        help="default: every GPU backend of this build that runs on --device")
    parser.add_argument("--time-budget", type=float,
                        help="seconds; cases left then are skipped and the backend not verified")
    parser.add_argument("--no-record", action="store_true",
                        help="do not record the verdict (a CPU or --quick run never records)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = args.backends or gpu_backends(device)
    if not names:
        print(f"selftest: no GPU backend of this build runs on {device} (see "
              f"tt_kernels.build_info(); Triton on CPU tensors needs TRITON_INTERPRET=1)")
        return 2
    for name in names:  # a backend named but unable to run here is an error, said once
        for op in backends.OPS:
            backends.resolve(op, name, device)
    shapes = QUICK if args.quick else MODELS
    print(f"selftest: {', '.join(names)} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{len(shapes)} shapes x {len(CONSTRUCTIONS)} constructions x {len(DTYPES)} dtypes")
    results = run({name: (lambda op, _name=name: backends.implementation(op, _name, device))
                   for name in names}, shapes, DTYPES, device, time_budget=args.time_budget)
    for name, r in results.items():
        print(f"{name:8s} {'PASS' if r['passed'] else 'FAIL'}  {r['cases']} cases, "
              f"{len(r['failed'])} failed, {r['skipped']} skipped for time, "
              f"{r['seconds']:.1f} s")
    if device.type == "cuda" and not (args.quick or args.no_record):
        fingerprint = verdicts.fingerprint(device)
        path = verdicts.record(fingerprint, {
            name: dict(r, failed=r["failed"][:20], shapes=list(shapes))
            for name, r in results.items()})
        print(f"recorded for {fingerprint} in {path}")
        print("default backend on this GPU now:",
              {op: backends.default_backend(op, device) for op in backends.OPS})
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
