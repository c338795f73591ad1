"""The build: which kernels the extension registered."""
import os

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tt_kernels


def test_cpu_kernels_registered():
    assert set(tt_kernels.build_info()["cpu_ops"]) == {
        "match", "apply", "untransform", "transform", "cls_attention"}


@pytest.mark.skipif(torch.version.cuda is None or CUDA_HOME is None
                    or os.environ.get("TT_BUILD_CUDA") == "0",
                    reason="CUDA kernels are only built by a CUDA torch with nvcc")
def test_cuda_kernels_compiled_and_linked():
    info = tt_kernels.build_info()
    assert {"apply", "untransform"} <= set(info["cuda_ops"])
    # Never verified on a GPU, so never the default for CUDA tensors.
    assert info["verified_on_gpu"]["cuda"] or info["default_backend"]["cuda"] != "cuda"
