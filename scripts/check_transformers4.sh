#!/usr/bin/env bash
# The HF transformers 4.x line tt_kernels takes (4.40 on; checked at 4.49.0, whose layers return
# tuples and whose ViT/DeiT/DINOv2 attention takes no additive mask): the model-family tests, the
# real-weight DINOv2 agreement and the main job's hf: model under it. CI runs the current 5.x with
# the whole suite (.ci/run).
#
# A venv with --system-site-packages (torch, timm, open_clip, pytest from the current Python, set
# up by scripts/setup.sh, and this checkout's in-place build), only transformers installed into
# it; kept in $TT_TRANSFORMERS4_DIR (default /tmp/tt_kernels-transformers4) and reused while it
# holds that version. About 1 min for the venv, 2 to 3 min for the tests on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=4.49.0
VENV=${TT_TRANSFORMERS4_DIR:-/tmp/tt_kernels-transformers4}
if ! "$VENV/bin/python" -c "import sys, transformers; sys.exit(transformers.__version__ != '$VERSION')" \
    2>/dev/null; then
  rm -rf "$VENV"
  python -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$VERSION"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_families.py \
  tests/test_dinov2_onnx.py::test_hf_dinov2_and_timm_agree_patched_on_real_photos \
  tests/test_evaluate.py::test_main_job_takes_an_hf_model_folder_and_its_preprocessing "$@"
