"""Which implementations exist in this build, which are verified, and which one a call uses."""
import torch

from . import ops
from .triton_kernels import triton_version

OPS = ("match", "apply", "untransform", "transform", "cls_attention")
BACKENDS = ("reference", "cpu", "cuda", "triton")

# GPU backends become defaults only once their tests have passed on a real GPU (bench/results/
# records the run). None has yet: on CUDA tensors the default is the PyTorch reference, and the
# compiled CUDA kernels are opt-in with backend="cuda".
VERIFIED_ON_GPU = {"cuda": False, "triton": False}


def _registered(key):
    return [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"tt::{op}", key)]


def build_info():
    """What this installation built and will use."""
    cuda_ops = _registered("CUDA")
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_ops": _registered("CPU"),
        "cuda_ops": cuda_ops,
        "cuda_compiled": bool(cuda_ops),
        "triton": triton_version(),
        "triton_ops": [],
        "verified_on_gpu": dict(VERIFIED_ON_GPU),
        "default_backend": {"cpu": "cpu", "cuda": default_backend("apply", torch.device("cuda"))},
    }


def default_backend(op, device):
    if device.type == "cpu":
        return "cpu"
    for name in ("cuda", "triton"):
        if VERIFIED_ON_GPU[name] and op in supported(name):
            return name
    return "reference"


def supported(backend):
    if backend == "reference":
        return OPS
    if backend == "cpu":
        return tuple(_registered("CPU"))
    if backend == "cuda":
        return tuple(_registered("CUDA"))
    return ()


def resolve(op, backend, device):
    """The backend that runs `op` on `device`, or a ValueError saying why none can."""
    if backend is None:
        return default_backend(op, device)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS} or None, got {backend!r}")
    if op not in supported(backend):
        raise ValueError(f"backend {backend!r} has no {op} kernel in this build "
                         f"(see tt_kernels.build_info())")
    if backend != "reference" and (device.type == "cpu") != (backend == "cpu"):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    return backend
