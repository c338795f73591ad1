"""Triton kernels of tt_kernels, installed as ``tt_kernels.triton_kernels``.

One file per operator, each with its kernels and the function that launches them on checked
inputs (same signature as the ``torch.ops.tt`` op). They run on CUDA tensors, and on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before this package is imported).
"""
import importlib
import os

from ..rules import OPS  # noqa: F401  (every op has a Triton kernel)


def triton_version():
    """The importable Triton's version, or None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel(op):
    """The launcher of `op` (importing it compiles nothing until the first call)."""
    return getattr(importlib.import_module(f"{__name__}.{op}"), op)
