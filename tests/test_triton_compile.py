"""Every Triton kernel compiles for a real GPU, checked on the CPU: sm_90 (H100/H200) code from
triton.compile with an explicit target; ptxas ships with triton, no GPU is needed. The
interpreter that runs the kernels without a GPU (the triton backend of tests/test_<op>.py) never
compiles them, so it cannot see what only the compiler refuses (a non-constexpr global read in
@jit code) or what only the GPU limits (shared memory per block).

Each case calls the public launcher (tt_kernels.triton_kernels) on CPU tensors with the kernels
replaced by recorders, so what compiles is exactly what a GPU run would launch: the same
arguments, constexprs, num_warps and num_stages, specialised by triton's own binder. Compiles run
in a child process: tests/conftest.py turns the interpreter on before triton is imported, and
then triton.language's own @jit helpers (tl.sum, tl.max, ...) are interpreter functions that no
compile can call. Run as a script, this file is that child (JSON cases in, JSON results out).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
import torch

try:
    import triton
except ImportError:
    triton = None

pytestmark = pytest.mark.skipif(triton is None, reason="needs triton")

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
# Bytes a thread of match_kernel may spill: ptxas sometimes parks a loop guard's predicates on the
# stack (8-24 bytes, stored once); tiles that grew with N spilled 72 bytes at N = 577 and 0.9-1.4
# KB from N = 1370 before the columns were tiled.
FEW_SPILLED = 32
TARGET = ("cuda", 90, 32)
D = 64  # a head's width; the metric's width is a run-time loop bound, no constexpr
# The standard models' token counts: DeiT at 224 px, DINOv2-S/14 at 224, ViT-L at 384, DINOv2 at
# 518: N rounded up to a power of 2 picks match_kernel's configuration.
TOKENS = (197, 257, 577, 1370)
# The patch's default step (tt_kernels.patch: transform, k = 1, all targets, Ward, norm) in bf16,
# and the heaviest construction (k = 4, alpha mix, B targets, Ward) in fp32, at each standard N.
DEFAULT = dict(op="transform", method="spread", k=1, targets="all", cost="ward", mode="norm",
               dtype="bfloat16")
HEAVY = dict(op="transform", method="spread", k=4, alpha=0.5, targets="b", cost="ward",
             mode="mean", dtype="float32")

# Every constexpr value the launchers can produce (METHOD, BY_IMPORTANCE, MIX, TARGETS_B, WARD,
# K in {1, 2, 4} (k is the caller's, each value its own compile), BUILD_ROWS, MODE, HAS_SIZE, BC for C = 384 / 768 / 1024, each free pointer in
# fp32 / fp16 / bf16) at N = 197, then each standard N's NP with the default and heavy steps.
# Cold compiles on 2 cores: about 55 s for the whole file (triton 3.8); match_kernel compiles take
# 2-12 s each, the longest for k = 4 at N = 1370 (cases from N = 577 are marked slow).
CASES = [
    dict(op="match", N=197, method="prune", dtype="float32"),
    dict(op="match", N=197, method="evit", dtype="float32"),
    dict(op="match", N=197, method="tome", dtype="bfloat16"),
    dict(op="match", N=197, method="spread", k=1, dtype="float16"),
    dict(op="transform", N=197, method="prune", mode="sum", dtype="float16"),
    dict(op="transform", N=197, method="evit", mode="mean", dtype="bfloat16"),
    dict(op="transform", N=197, method="tome", mode="mean", dtype="float32"),
    dict(op="transform", N=197, method="spread", k=2, alpha=1.0, cost="cosine", mode="sum",
         dtype="float16"),
    dict(op="apply", N=197, k=1, C=768, mode="norm", dtype="float16"),
    dict(op="apply", N=197, k=2, C=1024, mode="mean", dtype="bfloat16"),
    dict(op="apply", N=197, k=4, C=384, mode="sum", dtype="float32"),
    dict(op="untransform", N=197, k=1, C=384, dtype="bfloat16"),
    dict(op="untransform", N=197, k=4, C=768, dtype="float16"),
    dict(op="untransform", N=197, k=2, C=1024, dtype="float32"),
    *(dict(op="cls_attention", N=n, size=True, dtype=dt)
      for n, dt in zip(TOKENS, ("float32", "float16", "bfloat16", "bfloat16"))),
    dict(op="cls_attention", N=197, size=False, dtype="float16"),
    *(dict(step, N=n) for n in TOKENS for step in (DEFAULT, HEAVY)),
]
SLOW = 500  # cases from this N on are marked slow (deselect with -m "not slow")


def case_id(case):
    return "-".join(str(value) for value in case.values())


def compile_cases(cases):
    """Compiles `cases` in a child process without the interpreter; one result list per case."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same imports as here
    child = subprocess.run([sys.executable, __file__], input=json.dumps(cases), env=env,
                           capture_output=True, text=True, timeout=1800)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout)


@pytest.fixture(scope="module")
def compiled(request):
    """The results of the cases this session selected, compiled in one child process."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec")]
    results = compile_cases(selected)
    return {json.dumps(case, sort_keys=True): result for case, result in zip(selected, results)}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=case_id(c), marks=[pytest.mark.slow] if c["N"] >= SLOW else [])
    for c in CASES])
def test_kernel_compiles_for_sm90_within_shared_memory(compiled, case):
    launches = compiled[json.dumps(case, sort_keys=True)]
    assert launches, "the launcher launched nothing"
    for launch in launches:
        assert "error" not in launch, f"{launch['kernel']}: {launch['error']}"
        # A kernel over the limit compiles but cannot launch ("out of resources").
        assert launch["shared"] <= SHARED_LIMIT, launch
        if launch["kernel"] == "match_kernel":
            # its column tiles keep a thread's share bounded: spilling means a tile grew with N
            assert launch["spilled_bytes"] <= FEW_SPILLED, (
                f"match_kernel spills {launch['spilled_bytes']} bytes a thread: {launch}")


def test_largest_n_compiles_without_spills_and_larger_is_refused_by_name():
    from tt_kernels.triton_kernels import kernel
    from tt_kernels.triton_kernels.match import MAX_TOKENS

    for launches in compile_cases([dict(step, N=MAX_TOKENS) for step in (DEFAULT, HEAVY)]):
        match_launch = next(launch for launch in launches if launch["kernel"] == "match_kernel")
        assert "error" not in match_launch, match_launch["error"]
        assert match_launch["shared"] <= SHARED_LIMIT, match_launch
        # the fused layout by output row sorts N * k entries: the part that still grows with N
        # (at N = 4096 triton 3.6 spills 0.4-1.1 KB a thread there)
        assert match_launch["spilled_bytes"] <= FEW_SPILLED, (
            f"match_kernel spills {match_launch['spilled_bytes']} bytes a thread: {match_launch}")
    too_many = torch.randn(1, MAX_TOKENS + 1, 4)
    with pytest.raises(ValueError, match=f"N = {MAX_TOKENS + 1}"):
        kernel("match")(too_many, r=1, method="tome")


# ------------------------------------------------------------------------- the child process


def _inputs(case):
    """The launcher and its arguments for a case, on CPU tensors like a model step's."""
    from tt_kernels.triton_kernels import kernel

    g = torch.Generator().manual_seed(0)
    N, dtype = case["N"], getattr(torch, case["dtype"])
    C = case.get("C", 384)
    size = torch.ones(1, N)
    score = torch.rand(1, N, generator=g).softmax(-1)
    r = N // 10  # a tenth leave: ROWS_P = N - r + 2 rounded up to a power of 2, as in a model
    if case["op"] == "cls_attention":
        q, k = (torch.randn(1, 6, n, D, generator=g).to(dtype) for n in (1, N))
        return kernel("cls_attention"), (q, k, size if case["size"] else None), {}
    if case["op"] in ("apply", "untransform"):
        K = case["k"]
        dst = (torch.arange(N * K).view(1, N, K) % (N - r))
        weight = torch.full((1, N, K), 1.0 / K)
        if case["op"] == "apply":
            x = torch.randn(1, N, C, generator=g).to(dtype)
            return kernel("apply"), (x, size, dst, weight, N - r, case["mode"]), {}
        y = torch.randn(1, N - r, C, generator=g).to(dtype)
        return kernel("untransform"), (y, dst, weight), {}
    metric = torch.randn(1, N, D, generator=g).to(dtype)
    construction = {name: case[name] for name in ("k", "alpha", "targets", "cost")
                    if name in case}
    if case["op"] == "match":
        return kernel("match"), (metric, score, size, r, case["method"]), construction
    x = torch.randn(1, N, C, generator=g).to(dtype)
    return (kernel("transform"), (x, size, metric, score, r, case["method"]),
            dict(construction, mode=case["mode"]))


def _resources(cubin):
    """(registers, spilled bytes) per thread, from the cubin: spills live in the stack frame (the
    local memory triton reports as n_spills * 4 on a GPU)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


def _source(jit, args, kwargs, backend):
    """The ASTSource and options of one launch, specialised as triton's launcher does (its own
    binder: dtypes, integers equal to 1, 16-byte alignment and divisibility)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                           specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options


def _compile(source, options, target):
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    regs, spilled = _resources(compiled.asm["cubin"])
    return dict(shared=compiled.metadata.shared, regs=regs, spilled_bytes=spilled,
                seconds=round(seconds, 1))


def _child(cases):
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from tt_kernels import triton_kernels

    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    launched = []

    class Recorder:
        def __init__(self, jit):
            self.jit = jit

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((self.jit, args, kwargs))

    for op in triton_kernels.OPS:
        module = importlib.import_module(f"{triton_kernels.__name__}.{op}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(value))
    done = {}
    results = []
    for case in cases:
        launched.clear()
        launcher, args, kwargs = _inputs(case)
        launcher(*args, **kwargs)
        result = []
        for jit, args, kwargs in launched:
            source, options = _source(jit, args, kwargs, backend)
            entry = dict(kernel=jit.__name__, num_warps=options.num_warps,
                         num_stages=options.num_stages,
                         constexprs={p.name: kwargs[p.name] for p in jit.params if p.is_constexpr})
            key = (source.hash(), options.hash())
            if key not in done:
                try:
                    done[key] = _compile(source, options, target)
                except Exception as error:  # noqa: BLE001  (reported by the test, per case)
                    done[key] = dict(error=f"{type(error).__name__}: {error}"[-2000:])
            result.append(dict(entry, **done[key]))
        results.append(result)
    return results


if __name__ == "__main__":
    json.dump(_child(json.load(sys.stdin)), sys.stdout, default=str)
