"""The build: which kernels the extension registered."""
import os

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tt_kernels


@pytest.mark.skipif(torch.version.cuda is None or CUDA_HOME is None
                    or os.environ.get("TT_BUILD_CUDA") == "0",
                    reason="CUDA kernels are only built by a CUDA torch with nvcc")
def test_cuda_kernels_compiled_and_linked():
    info = tt_kernels.build_info()
    assert set(info["cuda_ops"]) == {"match", "apply", "untransform", "transform", "cls_attention"}


def test_unverified_gpu_backends_are_opt_in():
    info = tt_kernels.build_info()
    verified = {name for name, v in info["verified_on_gpu"].items() if v["verified"]}
    assert set(info["default_backend"]["cuda"].values()) <= verified | {"reference"}
