"""Builds tt_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found. TT_BUILD_CUDA=0 forces CUDA off, TT_BUILD_CUDA=1 makes its absence an error.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default 9.0+PTX when no GPU is visible);
MAX_JOBS caps parallel compilation."""
import glob
import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools import setup

# Two mistakes that otherwise end in obscure errors: setuptools < 70.1 without `wheel` (no
# bdist_wheel command), and pip's isolated build environment, which hides the installed torch.
if {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv) and not any(
        importlib.util.find_spec(m) for m in ("setuptools.command.bdist_wheel", "wheel")):
    sys.exit(f"setuptools {setuptools.__version__} makes wheels (editable installs too) only with "
             "the `wheel` package: pip install wheel (or setuptools>=70.1), then install again")
try:
    import torch
except ImportError:
    sys.exit("tt_kernels compiles against the installed torch, which this Python cannot import. "
             "Install torch first, then build without pip's isolated build environment (which "
             "hides it): pip install --no-build-isolation -e . (or .)")


def _cuda_toolkit():
    """Points CUDA_HOME at a real toolkit before torch looks for one: an `nvcc` on PATH may be a
    wrapper outside the toolkit, and torch would take that wrapper's parent folder."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for root in roots + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


_cuda_toolkit()
from torch.utils.cpp_extension import (  # noqa: E402  (reads CUDA_HOME when imported)
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)


def want_cuda():
    switch = os.environ.get("TT_BUILD_CUDA", "auto")
    possible = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    if switch == "1" and not possible:
        raise RuntimeError(
            f"TT_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build or nvcc was not "
            f"found (CUDA_HOME={CUDA_HOME}); set CUDA_HOME to the toolkit root")
    return possible and switch != "0"


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    if not want_cuda():
        print("tt_kernels: building the C++ CPU kernels only (no CUDA torch or nvcc)")
        return CppExtension("tt_kernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    print(f"tt_kernels: building CPU and CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo"]
    cxx = cxx + ["-DTT_WITH_CUDA"]  # checks.cpp: graph-capture-aware value checks
    return CUDAExtension("tt_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    name="tt_kernels",
    version="0.1.0",
    description="Token Transforming for Vision Transformers: fused token-reduction kernels",
    # tt_kernels/triton_kernels is a link to the top-level triton_kernels/ folder: our Triton
    # kernels install under our own namespace (the published `triton_kernels` is another package).
    packages=["tt_kernels", "tt_kernels.families", "tt_kernels.models", "tt_kernels.reference",
              "tt_kernels.triton_kernels"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    # The model families beyond timm (tt_kernels.families), each an optional extra
    extras_require={"hf": ["transformers>=5,<6"], "open-clip": ["open_clip_torch>=3"]},
)
