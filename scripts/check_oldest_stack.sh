#!/usr/bin/env bash
# The oldest stack tt_kernels claims, torch 2.11.0 (the cu130 build, as on our GPU machine) with
# triton 3.6.0, checked on a CPU: build the extension (C++ and CUDA) for it, then run the Triton
# tests (interpreter), every Triton kernel compiled for sm_90, the self-test's checks, the host
# build of the CUDA code (tests/cuda_on_host), the build and the opcheck tests. The full suite runs
# on the main stack (.ci/run).
#
#   bash scripts/check_oldest_stack.sh             # extra arguments go to pytest (e.g. -x)
#
# Nothing of the current Python or of this checkout is changed. Everything lives in $TT_OLDEST_DIR
# (default /tmp/tt_kernels-oldest-stack), locked while a run uses it, and reused by the next run:
#   venv/  --system-site-packages, so numpy, timm, pytest, ninja... come from the current Python
#          (set up by scripts/setup.sh); only torch, triton, torchvision and setuptools are
#          installed into it, --no-deps: the CUDA libraries torch 2.11 pins are only loaded on a
#          GPU. Recreated when its versions are not the ones below.
#   src/   a copy of this checkout's working tree (tracked and untracked files, not ignored ones),
#          synced every run: a file whose content changed is copied with a new mtime, unchanged
#          ones keep theirs, so the objects kept in build/temp* are rebuilt exactly where needed
#          (copying mtimes from the checkout could leave an object newer than a changed source).
#   run/   pytest's working folder.
# The copy is installed into the venv as a plain (not editable) package and pytest runs from run/,
# so `import tt_kernels` finds that build: neither this checkout's tt_kernels/ (its _C was built
# for the main torch) nor the current Python's editable install of it are on the path first. The
# script checks where tt_kernels was imported from before testing.
# Measured on 2 cores: 3.3 to 4.2 min from an empty folder (venv ~25 s with the ~720 MB download
# of torch and triton, build 75-95 s: the C++ and CUDA files against torch's headers, tests
# 105-135 s), ~2.5 min when nothing changed; up to twice that while other work loads the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TORCH=2.11.0
TRITON=3.6.0
TORCHVISION=0.26.0  # timm imports torchvision; the current Python's is built for its own torch
WORK=${TT_OLDEST_DIR:-/tmp/tt_kernels-oldest-stack}
VENV=$WORK/venv
SRC=$WORK/src
PY=$VENV/bin/python
T0=$(date +%s)
step() { echo "== [$(($(date +%s) - T0)) s] $*"; }

mkdir -p "$WORK/run"
exec 9>"$WORK/lock"
flock 9  # one run at a time per folder; released when this shell exits, however it ends

step "venv $VENV: torch $TORCH, triton $TRITON, torchvision $TORCHVISION"
if ! "$PY" - "$TORCH" "$TRITON" "$TORCHVISION" 2>/dev/null <<'EOF'
import sys, setuptools, torch, torchvision, triton
want = sys.argv[1:]
have = [torch.__version__.split("+")[0], triton.__version__, torchvision.__version__.split("+")[0]]
assert have == want and int(setuptools.__version__.split(".")[0]) >= 71, have
EOF
then
  rm -rf "$VENV" "$SRC/build"  # objects built against another torch go too
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # setuptools: the venv's bundled one is too old to build a wheel without the `wheel` package, and
  # torch 2.11 asks for < 82.
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "torch==$TORCH" "triton==$TRITON" \
    "torchvision==$TORCHVISION" "setuptools>=71,<82"
fi
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"

step "copy of the working tree -> $SRC"
STAGE=$WORK/stage
rm -rf "$STAGE" "$SRC"/build/lib* "$SRC"/build/bdist*  # no stale Python files in the wheel
mkdir -p "$STAGE" "$SRC"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi  # not tracked files deleted since
done | tar --null -T - -cf - | tar -xf - -C "$STAGE"
(cd "$SRC" && find . -path ./build -prune -o ! -type d -print0) | while IFS= read -r -d '' f; do
  if [[ ! -e $STAGE/$f && ! -L $STAGE/$f ]]; then rm -f "$SRC/$f"; fi
done
(cd "$STAGE" && find . ! -type d -print0) | while IFS= read -r -d '' f; do
  if [[ -L $STAGE/$f ]]; then  # a link (tt_kernels/triton_kernels): the same target, or anew
    [[ -L $SRC/$f && $(readlink "$SRC/$f") == "$(readlink "$STAGE/$f")" ]] && continue
  elif [[ ! -L $SRC/$f ]] && cmp -s "$STAGE/$f" "$SRC/$f"; then
    continue
  fi
  rm -rf "${SRC:?}/$f" && mkdir -p "$(dirname "$SRC/$f")" && cp -P "$STAGE/$f" "$SRC/$f" || exit 1
done
rm -rf "$STAGE"

step "build and install into the venv (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
(cd "$SRC" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps .)

step "tests"
cd "$WORK/run"
"$PY" - "$VENV" <<'EOF'
import json, os, sys
import tt_kernels, tt_kernels.triton_kernels as tk
for module in (tt_kernels, tk):
    path = os.path.realpath(module.__file__)
    assert path.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"not the venv's build: {path}"
print(json.dumps(tt_kernels.build_info()))
EOF
"$PY" -m pytest -q -p no:cacheprovider "$SRC/tests/test_build.py" \
  "$SRC/tests/test_triton_compile.py" "$SRC/tests/test_selftest.py" "$SRC/tests/test_opcheck.py" \
  "$SRC"/tests/test_{match,transform,apply,untransform,cls_attention,every_op}.py \
  -k "not (test_match.py or test_transform.py or test_apply.py or test_untransform.py or"\
" test_cls_attention.py or test_every_op.py) or triton or cuda-on-host or shared_memory_plans" "$@"
step "done"
