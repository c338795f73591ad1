"""Runs every CUDA C++ and Triton kernel of tt_kernels once on small shapes and checks each result
against the PyTorch reference: the program for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 86 python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 86 python scripts/sanitize_kernels.py

For memcheck set PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own allocation and
an access past its end is caught (PyTorch's caching allocator would hide it inside a larger block).

Covered: Triton match_kernel for every construction (prune, evit, tome, transform with k 1/2/4,
targets all/b, removal by redundancy, mix and importance) alone and fused with the row layout
(tt.transform), r = 0 and the largest r; rows_kernel + gather_kernel (tt.apply, mean and sum,
K 1 and 4); untransform_kernel; cls_attention_kernel with and without sizes; fp32, fp16, bf16;
token counts that are not powers of two and channel counts that are not multiples of 16; a
non-contiguous x. The compiled torch.ops.tt kernels for the ops in
tt_kernels.backends.CUDA_CPP_OPS (all five ops) on the same inputs. A
torch.cuda.synchronize() after each case pins an asynchronous fault to its case.

Without a GPU it runs the same cases on CPU tensors (Triton through TRITON_INTERPRET=1, the CPU
C++ kernels in place of the CUDA ones): a dry run of this script's logic, not of the GPU code.
Exit status: 0 all cases agree, 1 a mismatch or a kernel error.
"""
import argparse
import os
import sys
import time
import traceback

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit module is imported

import tt_kernels  # noqa: E402
from tt_kernels import backends, reference  # noqa: E402
from tt_kernels.triton_kernels import kernel  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
COMPILED = "cuda" if GPU else "cpu-c++"  # what torch.ops.tt runs on DEVICE
X_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
         torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
FP32_TOL = dict(rtol=1e-5, atol=1e-6)

# (method, k, alpha, targets): every construction and every compile-time branch of match_kernel.
CONSTRUCTIONS = [
    ("prune", 1, 0.0, "all"),
    ("evit", 1, 0.0, "all"),
    ("tome", 1, 0.0, "all"),
    ("transform", 1, 0.0, "all"),
    ("transform", 4, 0.5, "b"),
    ("transform", 2, 1.0, "all"),
]


def inputs(B, N, C, D, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    k = torch.randn(B, H, N, D, generator=g) + 1.5 * torch.randn(B, 1, 1, D, generator=g)
    q = torch.randn(B, H, N, D, generator=g)
    size = torch.randint(1, 5, (B, N), generator=g).float()
    score = reference.cls_attention(q, k, size)
    t = dict(x=x.to(dtype), q=q.to(dtype), k=k.to(dtype), metric=k.mean(1).to(dtype),
             size=size, score=score)
    return {name: v.to(DEVICE) for name, v in t.items()}


def max_r(method, n, prefix, alpha):
    return tt_kernels.max_r(method, n, prefix, by_importance=method == "transform" and alpha == 1)


class Runner:
    def __init__(self, verbose):
        self.verbose = verbose
        self.cases = 0
        self.failed = []

    def case(self, name, run):
        """run() returns a list of (label, ok) checks; an exception counts as a failure."""
        self.cases += 1
        start = time.perf_counter()
        try:
            checks = run()
            if GPU:
                torch.cuda.synchronize()
            bad = [label for label, ok in checks if not ok]
        except Exception as e:  # recorded; the other kernels still run under the sanitizer
            bad = [f"{type(e).__name__}: {e}"]
            if self.verbose:
                traceback.print_exc()
        if bad:
            self.failed.append(f"{name}: {', '.join(bad)}")
        if self.verbose or bad:
            print(f"{'MISMATCH' if bad else 'ok':8} {name} ({time.perf_counter() - start:.2f} s)"
                  + (f" -- {', '.join(bad)}" if bad else ""), flush=True)


def close(a, b, tol):
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a.float(), b.float(), **tol)


def compiled(op):
    """The compiled torch.ops.tt kernel standing for CUDA C++ on this device, or None."""
    if op not in backends.CUDA_CPP_OPS:
        return None
    return getattr(torch.ops.tt, op)


def run_all(runner, shapes, dtypes):
    for i, ((B, N, C, D, H, prefix), dtype) in enumerate(zip(shapes, dtypes)):
        first = i == 0
        t = inputs(B, N, C, D, H, dtype, seed=N)
        tag = f"B={B} N={N} C={C} {str(dtype).replace('torch.', '')}"
        for method, k, alpha, targets in CONSTRUCTIONS:
            top = max_r(method, N, prefix, alpha)
            for r in sorted({top, 0 if first else min(3, top)}):
                kw = dict(k=k, tau=0.1, alpha=alpha, targets=targets, prefix=prefix) \
                    if method == "transform" else dict(prefix=prefix)
                score = t["score"] if method in ("prune", "evit") or alpha > 0 else None
                name = f"{tag} {method} k={k} alpha={alpha} targets={targets} r={r}"

                for backend, match, transform in (
                        ("triton", kernel("match"), kernel("transform")),
                        (COMPILED, compiled("match"), compiled("transform"))):
                    if match is None:
                        continue

                    def match_case(match=match):
                        got = match(t["metric"], score, t["size"], r, method, **kw)
                        want = reference.match(t["metric"], score, t["size"], r, method, **kw)
                        return [("dst", torch.equal(got[0], want[0])),
                                ("weight", close(got[1], want[1], FP32_TOL))]

                    def transform_case(transform=transform):
                        got = transform(t["x"], t["size"], t["metric"], score, r, method, **kw)
                        want = reference.transform(t["x"], t["size"], t["metric"], score, r,
                                                   method, **kw)
                        return [("dst", torch.equal(got[2], want[2])),
                                ("weight", close(got[3], want[3], FP32_TOL)),
                                ("x", close(got[0], want[0], X_TOL[dtype])),
                                ("size", close(got[1], want[1], FP32_TOL))]

                    runner.case(f"{backend} match {name}", match_case)
                    runner.case(f"{backend} transform {name}", transform_case)

        x_nc = torch.stack([t["x"], torch.zeros_like(t["x"])], dim=-1)[..., 0]  # stride 2
        for k in (1, 4):
            r = min(4, (N - prefix) // 2)
            dst, weight = reference.match(t["metric"], None, None, r, "transform", k=k,
                                          prefix=prefix)
            for mode in ("mean", "sum"):
                want = reference.apply(t["x"], t["size"], dst, weight, N - r, mode)
                impls = [("triton", kernel("apply")), (COMPILED, compiled("apply"))]
                for backend, fn in impls:
                    if fn is None:
                        continue
                    for x_name, x in (("x", t["x"]), ("non-contiguous x", x_nc)):
                        def apply_case(fn=fn, x=x):
                            got = fn(x, t["size"], dst, weight, N - r, mode)
                            return [("x", close(got[0], want[0], X_TOL[dtype])),
                                    ("size", close(got[1], want[1], FP32_TOL))]
                        runner.case(f"{backend} apply {tag} K={k} {mode} {x_name}", apply_case)
            y = reference.apply(t["x"], t["size"], dst, weight, N - r, "mean")[0]
            want = reference.untransform(y, dst, weight)
            for backend, fn in (("triton", kernel("untransform")),
                            (COMPILED, compiled("untransform"))):
                if fn is None:
                    continue

                def untransform_case(fn=fn):
                    return [("x", close(fn(y, dst, weight), want, X_TOL[dtype]))]
                runner.case(f"{backend} untransform {tag} K={k}", untransform_case)

        for size in (t["size"], None):
            for backend, fn in (("triton", kernel("cls_attention")),
                                (COMPILED, compiled("cls_attention"))):
                if fn is None:
                    continue

                def cls_case(fn=fn, size=size):
                    got = fn(t["q"], t["k"], size)
                    return [("score", close(got, reference.cls_attention(t["q"], t["k"], size),
                                            FP32_TOL))]
                runner.case(f"{backend} cls_attention {tag} "
                            f"size={'yes' if size is not None else 'no'}", cls_case)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest shape only")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = p.parse_args()
    # (B, N, C, D, H, prefix): N not a power of two, C not a multiple of 16, several prefixes.
    shapes = [(2, 17, 40, 16, 2, 1), (1, 70, 24, 16, 3, 2), (2, 197, 96, 24, 3, 1)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if args.quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    print(f"sanitize_kernels: device {DEVICE}"
          f"{' (' + torch.cuda.get_device_name() + ')' if GPU else ' (dry run: Triton interpreter, CPU C++)'}"
          f", compiled ops {list(backends.CUDA_CPP_OPS)}, caching allocator "
          f"{'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on'}",
          flush=True)
    runner = Runner(args.verbose)
    start = time.perf_counter()
    run_all(runner, shapes, dtypes)
    print(f"sanitize_kernels: {runner.cases} cases, {len(runner.failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    for line in runner.failed:
        print("  " + line)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
