"""Runs every CUDA C++ and Triton kernel of tt_kernels on a few small shapes and checks each result
against the PyTorch reference: the program for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 86 --target-processes application-only \\
        $(python scripts/sanitize_kernels.py --kernel-filters) python scripts/sanitize_kernels.py

--kernel-filters prints one `--kernel-name kns=NAME` per kernel of the project (the __global__
functions of csrc/cuda/*.cu, whose mangled names contain theirs, and the launched @triton.jit
functions of triton_kernels/, named as written), so the sanitizer instruments those alone: PyTorch's
own kernels (copies, fills) are not ours to check and cost most of the instrumented time. For
memcheck set PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own allocation and an
access past its end is caught (PyTorch's caching allocator would hide it inside a larger block).

Only the kernels run on the GPU: the inputs are drawn on the CPU and copied over, and each output
is copied back and judged by tt_kernels.verify against the reference computed on the CPU (bounds
from the arithmetic, near ties judged against the float64 reference), so no reference kernel runs
under the sanitizer.

Covered, for the Triton kernels and the compiled torch.ops.tt kernels (all five ops): match and
transform for every construction (prune, evit, tome, spread with k 1/2/4, targets all/b, removal
by redundancy, mix and importance; cosine and Ward costs), r = 0, small and the largest r; apply
(mean, sum, norm; K 1 and 4; x contiguous and strided) and untransform; cls_attention with and
without sizes; fp32, fp16, bf16; token counts that are not powers of two, channel counts that are
not multiples of 16; and one ViT-L-sized image (N = 577, D = 64, fp32), whose metric the CUDA
transform kernel cannot stage in shared memory (the chunked plan of transform.cu). A
torch.cuda.synchronize() after each case pins an asynchronous fault to its case.

Without a GPU it runs the same cases on CPU tensors (Triton through TRITON_INTERPRET=1, the CPU
C++ kernels in place of the CUDA ones): a dry run of this script's logic, not of the GPU code.
Exit status: 0 all cases agree, 1 a mismatch or a kernel error.
"""
import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kernel_names():
    """The project's kernels, from the sources: CUDA C++ __global__ functions, and the @triton.jit
    functions launched as kernels (named *_kernel; the others are inlined helpers)."""
    names = set()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", path.read_text())
        names.update(re.findall(r"__global__\s+\w+\s+(\w+)\s*\(", text))
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        names.update(name for name in re.findall(r"@triton\.jit[^\n]*\n\s*def (\w+)",
                                                 path.read_text()) if name.endswith("_kernel"))
    return sorted(names)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest shape only")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    p.add_argument("--kernel-filters", action="store_true",
                   help="print compute-sanitizer's --kernel-name filters for the project's kernels")
    return p.parse_args()


ARGS = parse_args()
if ARGS.kernel_filters:  # before torch is imported: the shell waits for this line
    print(" ".join(f"--kernel-name kns={name}" for name in kernel_names()))
    sys.exit(0)

import torch  # noqa: E402

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

import tt_kernels  # noqa: E402
from tt_kernels import backends, reference, verify  # noqa: E402
from tt_kernels.measure import vit_tokens  # noqa: E402
from tt_kernels.triton_kernels import kernel  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
COMPILED = "cuda" if GPU else "cpu-c++"  # what torch.ops.tt runs on DEVICE

# (method, k, alpha, targets, cost, mode): every construction and every compile-time branch of
# match_kernel and of the apply modes.
CONSTRUCTIONS = [
    ("prune", 1, 0.0, "all", "cosine", "mean"),
    ("evit", 1, 0.0, "all", "cosine", "sum"),
    ("tome", 1, 0.0, "all", "cosine", "mean"),
    ("spread", 1, 0.0, "b", "ward", "norm"),
    ("spread", 4, 0.5, "b", "cosine", "mean"),
    ("spread", 2, 1.0, "all", "ward", "sum"),
]
# (B, N, C, D, H, prefix, dtype): N not a power of two, C not a multiple of 16, several prefixes.
SHAPES = [(2, 17, 40, 16, 2, 1, torch.float32), (1, 70, 24, 16, 3, 2, torch.float16),
          (2, 197, 96, 24, 3, 1, torch.bfloat16)]
# One image at ViT-L/16 384 px tokens, fp32 metric: transform.cu's chunked shared-memory plan.
LARGE = (1, 577, 64, 64, 2, 1, torch.float32)


def on_device(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def on_cpu(out):
    return tuple(o.cpu() for o in out) if isinstance(out, (tuple, list)) else out.cpu()


class Runner:
    def __init__(self, verbose):
        self.verbose = verbose
        self.cases = 0
        self.failed = []

    def case(self, name, op, fn, args):
        """fn(*args) on DEVICE copies of args, checked on the CPU by tt_kernels.verify against the
        reference on args; an exception counts as a failure."""
        self.cases += 1
        start = time.perf_counter()
        try:
            out = fn(*on_device(args))
            if GPU:
                torch.cuda.synchronize()
            ok, details = verify.check(op, on_cpu(out), *args)
            bad = "" if ok else str(details)
        except Exception as e:  # recorded; the other kernels still run under the sanitizer
            bad = f"{type(e).__name__}: {e}"
            if self.verbose:
                traceback.print_exc()
        if bad:
            self.failed.append(f"{name}: {bad}")
        if self.verbose or bad:
            print(f"{'MISMATCH' if bad else 'ok':8} {name} ({time.perf_counter() - start:.2f} s)"
                  + (f" -- {bad}" if bad else ""), flush=True)


def implementations(op):
    """(backend, function) for Triton and, where built, the compiled torch.ops.tt kernel."""
    impls = [("triton", kernel(op))]
    if op in backends.CUDA_CPP_OPS:
        impls.append((COMPILED, getattr(torch.ops.tt, op)))
    return impls


def max_r(method, n, prefix, alpha):
    return tt_kernels.max_r(method, n, prefix, by_importance=method == "spread" and alpha == 1)


def run_steps(runner, shape, constructions, r_kinds):
    """match and transform on one shape, for each construction and r."""
    B, N, C, D, H, prefix, dtype = shape
    t = vit_tokens(B, N, C, D, dtype=dtype, seed=N, heads=H, head_dim=D)  # on the CPU
    tag = f"B={B} N={N} C={C} D={D} {str(dtype).replace('torch.', '')}"
    for method, k, alpha, targets, cost, mode in constructions:
        top = max_r(method, N, prefix, alpha)
        score = t["score"] if method in ("prune", "evit") or alpha > 0 else None
        for r in sorted({dict(zero=0, small=min(3, top), top=top)[kind] for kind in r_kinds}):
            construction = (r, method, k, 0.1, alpha, targets, prefix)
            name = f"{tag} {method} k={k} alpha={alpha} targets={targets} {cost} r={r}"
            for backend, fn in implementations("match"):
                runner.case(f"{backend} match {name}", "match", fn,
                            (t["metric"], score, t["size"]) + construction + (cost,))
            for backend, fn in implementations("transform"):
                runner.case(f"{backend} transform {name} {mode}", "transform", fn,
                            (t["x"], t["size"], t["metric"], score) + construction + (mode, cost))
    return t, tag


def run_all(runner, quick):
    for i, shape in enumerate(SHAPES[:1] if quick else SHAPES):
        B, N, C, D, H, prefix, dtype = shape
        t, tag = run_steps(runner, shape, CONSTRUCTIONS, ("zero", "top") if i == 0 else
                           ("small", "top"))
        x_strided = torch.stack([t["x"], torch.zeros_like(t["x"])], dim=-1)[..., 0]
        for k in (1, 4):
            r = min(4, (N - prefix) // 2)
            dst, weight = reference.match(t["metric"], None, None, r, "spread", k=k,
                                          prefix=prefix)
            for mode in ("mean", "sum", "norm"):
                for backend, fn in implementations("apply"):
                    for x_name, x in (("x", t["x"]), ("strided x", x_strided)):
                        # copied to the GPU as it is: the strided x stays strided
                        runner.case(f"{backend} apply {tag} K={k} {mode} {x_name}", "apply", fn,
                                    (x, t["size"], dst, weight, N - r, mode))
            y = reference.apply(t["x"], t["size"], dst, weight, N - r, "mean")[0]
            for backend, fn in implementations("untransform"):
                runner.case(f"{backend} untransform {tag} K={k}", "untransform", fn,
                            (y, dst, weight))
        for size in (t["size"], None):
            for backend, fn in implementations("cls_attention"):
                runner.case(f"{backend} cls_attention {tag} size={'yes' if size is not None else 'no'}",
                            "cls_attention", fn, (t["q"], t["k"], size, None))
    if not quick:
        run_steps(runner, LARGE, [("spread", 2, 0.0, "all", "ward", "norm")], ("top",))


def main():
    print(f"sanitize_kernels: device {DEVICE}"
          f"{' (' + torch.cuda.get_device_name() + ')' if GPU else ' (dry run: Triton interpreter, CPU C++)'}"
          f", compiled ops {list(backends.CUDA_CPP_OPS)}, caching allocator "
          f"{'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on'}, "
          f"kernels {', '.join(kernel_names())}", flush=True)
    runner = Runner(ARGS.verbose)
    start = time.perf_counter()
    run_all(runner, ARGS.quick)
    print(f"sanitize_kernels: {runner.cases} cases, {len(runner.failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    for line in runner.failed:
        print("  " + line)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
