"""Which implementations exist in this build, which are verified, and which one a call uses (the
kernels themselves are registered in ops.py)."""
import functools

import torch

from . import reference, triton_kernels, verdicts
from .ops import CPU_OPS, CUDA_CPP_OPS, GRADIENTS, ops
from .rules import OPS

BACKENDS = ("reference", "cpu", "cuda", "triton")

# GPU backends become defaults only once verified on the GPU at hand (verdicts.py: the project's
# own GPU run, or `python -m tt_kernels.selftest` on this machine); until then the default on CUDA
# tensors is the PyTorch reference, and the kernels are opt-in with backend="cuda" / "triton".
# For each op, the GPU backends fastest first (bench/results/gpu-*.json, `reduction_step` and the
# B=256 cases); not measured yet, so the fused CUDA C++ kernels come first.
GPU_ORDER = {op: ("cuda", "triton") for op in OPS}


def build_info():
    """What this installation built and will use."""
    cuda_ops = list(CUDA_CPP_OPS)
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_ops": list(CPU_OPS),
        "cuda_ops": cuda_ops,
        "cuda_compiled": bool(cuda_ops),
        "build_id": verdicts.build_id(),
        "triton": triton_kernels.triton_version(),
        "triton_ops": list(supported("triton")),
        "verified_on_gpu": {name: dict(zip(("verified", "evidence"),
                                           verdicts.evidence(name, torch.device("cuda"))))
                            for name in verdicts.BACKENDS},
        # What torch.ops.tt.<op> runs on CUDA tensors (the Python API's default is separate).
        "torch_ops_on_cuda": {op: "cuda" if op in CUDA_CPP_OPS else "triton" for op in OPS
                              if op in CUDA_CPP_OPS or op in supported("triton")},
        "default_backend": {device: {op: default_backend(op, torch.device(device)) for op in OPS}
                            for device in ("cpu", "cuda")},
    }


def default_backend(op, device):
    if device.type == "cpu":
        return "cpu"
    for name in GPU_ORDER[op]:
        if op in supported(name) and verdicts.evidence(name, device)[0]:
            return name
    return "reference"


def supported(backend):
    if backend == "reference":
        return OPS
    if backend == "cpu":
        return CPU_OPS
    if backend == "cuda":
        return CUDA_CPP_OPS
    return triton_kernels.OPS if triton_kernels.triton_version() else ()


def check_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS} or None, got {backend!r}")


def resolve(op, backend, device):
    """The backend that runs `op` on `device`, or a ValueError saying why none can."""
    check_backend(backend)
    if backend is None:
        return default_backend(op, device)
    if op not in supported(backend):
        raise ValueError(f"backend {backend!r} has no {op} kernel in this build "
                         f"(see tt_kernels.build_info())")
    on_cpu = device.type == "cpu"
    runs_here = {"reference": True, "cpu": on_cpu, "cuda": not on_cpu,
                 "triton": not on_cpu or triton_kernels.interpreted()}
    if not runs_here[backend]:
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors"
                         + (" (set TRITON_INTERPRET=1 to interpret Triton on the CPU)"
                            if backend == "triton" else ""))
    return backend


def _checked_reference(op):
    """The reference, behind the same argument checks as the compiled kernels."""
    check, run = getattr(ops, f"check_{op}"), getattr(reference, op)

    def checked(*args):
        check(*args)
        return run(*args)

    return checked


def _without_autocast(run, device):
    """`run` with autocast off, as the compiled ops run (csrc/autocast.cpp): every op takes each
    input in its own dtype and accumulates in fp32, and a GEMM inside must not drop to bf16."""
    def call(*args):
        with torch.autocast(device.type, enabled=False):
            return run(*args)

    return call


class _WithOpGradient(torch.autograd.Function):
    """A launcher outside the dispatcher (Triton) with the gradient of the op it implements, so
    every backend is differentiable where torch.ops.tt is."""

    @staticmethod
    def forward(op, run, *args):
        return run(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, _, *args = inputs
        ctx.tt_op = op
        GRADIENTS[op][0](ctx, args, output)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + GRADIENTS[ctx.tt_op][1](ctx, *grads)


def implementation(op, backend, device):
    """The function that runs `op` with the backend chosen for `device` (same signature as the
    torch.ops.tt op)."""
    which = resolve(op, backend, device)
    if which == "reference":
        return _without_autocast(_checked_reference(op), device)
    if which == "triton":
        run = triton_kernels.kernel(op)
        if op in GRADIENTS:
            run = functools.partial(_WithOpGradient.apply, op, run)
        return _without_autocast(run, device)
    return getattr(ops, op)
