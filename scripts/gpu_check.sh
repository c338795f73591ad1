#!/usr/bin/env bash
# Everything a GPU lease must do, in ONE call: versions and nvidia-smi; build the extension in place
# for the visible card; the full test suite on CUDA (junit XML); compute-sanitizer memcheck and
# racecheck over scripts/sanitize_kernels.py (every CUDA C++ and Triton kernel, small shapes); the
# ptxas register/spill report of csrc/cuda/*.cu; bench/bench_gpu.py. Each step logs and the script
# goes on after a failure; it ends with a summary (stdout and $OUT/summary.txt).
#
#   bash scripts/gpu_check.sh                        # everything
#   bash scripts/gpu_check.sh --no-build             # use the extension already built in place
#   bash scripts/gpu_check.sh --no-build --steps memcheck,racecheck
#
# Options:
#   --no-build           do not build (the extension must already be built and installed here)
#   --steps LIST         comma list of build,ptxas,tests,memcheck,racecheck,bench (default: all;
#                        info always runs). Without a GPU every step is skipped by default; a step
#                        named here runs anyway where it can: ptxas (needs only nvcc), tests on
#                        CPU, bench --smoke, the sanitizer program as a CPU dry run (no
#                        compute-sanitizer).
#   --budget SECONDS     wall-clock budget of the whole script (default 560: a device call's 600 s
#                        less a margin); each step gets what its successors leave it, or is skipped
#   --pytest-args ARGS   replaces the pytest target "tests" (e.g. "tests/test_cuda.py -x")
#   --bench-args ARGS    extra bench_gpu.py arguments (default "--warmup-ms 10 --rep-ms 50";
#                        without a GPU "--models tiny --batches 1,2")
# Order: info; ptxas in the background; build; then tests, memcheck and racecheck side by side
# (none of them times anything); then the benchmark alone on the GPU.
# $OUT (the device tool sets it; default ./out/gpu) gets at most 5 files: summary.txt,
# logs.tar.gz (every step's full log, re-packed after each step), junit.xml, gpu-<card>.json
# (also written to bench/results/), ptxas.txt.
# Exit status: 0 every step that ran passed; 1 a step failed or timed out; 2 nothing failed but no
# GPU was visible, so the GPU steps were skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)

NO_BUILD=0
STEPS_ARG=""
BUDGET=560
PYTEST_ARGS=""
BENCH_ARGS=""
while (($#)); do
  case $1 in
    --no-build) NO_BUILD=1 ;;
    --steps) STEPS_ARG=${2:?--steps needs a list}; shift ;;
    --steps=*) STEPS_ARG=${1#*=} ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --pytest-args) PYTEST_ARGS=${2?}; shift ;;
    --bench-args) BENCH_ARGS=${2?}; shift ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
ALL_STEPS=build,ptxas,tests,memcheck,racecheck,bench
STEPS=${STEPS_ARG:-$ALL_STEPS}
for s in ${STEPS//,/ }; do
  [[ ",$ALL_STEPS," == *",$s,"* ]] || { echo "gpu_check: unknown step $s ($ALL_STEPS)" >&2; exit 64; }
done

OUT=${OUT:-$ROOT/out/gpu}
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then echo "gpu_check: cannot create $OUT" >&2; exit 1; fi
rm -f "$OUT"/summary.txt "$OUT"/logs.tar.gz "$OUT"/junit.xml "$OUT"/gpu-*.json "$OUT"/ptxas.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
STATUS=$WORK/status
mkdir -p "$STATUS" "$WORK/obj"

now() { date +%s; }
log() { echo "[gpu_check +$(($(now) - T0))s] $*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
explicit() { [[ -n $STEPS_ARG && ",$STEPS_ARG," == *",$1,"* ]]; }
# record STEP STATUS SECONDS DETAIL
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >"$STATUS/$1"
  log "$1: $2 (${3}s) $4"
}
# step_timeout CAP RESERVE: seconds a step may run, leaving RESERVE for later steps; 0 = no time
step_timeout() {
  local t=$((T0 + BUDGET - $(now) - $2))
  ((t > $1)) && t=$1
  ((t < 20)) && t=0
  echo "$t"
}
# run_logged STEP SECONDS CMD...: CMD under timeout, output appended to $WORK/STEP.log
run_logged() {
  local name=$1 secs=$2
  shift 2
  ((secs > 0)) || { echo "# not run: no time left" >>"$WORK/$name.log"; return 124; }
  printf '$ %s\n# timeout %ss, started %s\n' "$*" "$secs" "$(date -u +%T)" >>"$WORK/$name.log"
  timeout --kill-after=10 "$secs" "$@" >>"$WORK/$name.log" 2>&1
}
timed_out() { [[ $1 == 124 || $1 == 137 ]]; }
pack() {
  tar czf "$WORK.tar.gz" -C "$WORK" --exclude=obj . 2>/dev/null && mv -f "$WORK.tar.gz" "$OUT/logs.tar.gz"
}

# ------------------------------------------------------------------------------------ environment
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" >/dev/null 2>&1; then PY=$c; break; fi
  done
  PY=${PY:-python3}
fi
if [[ -z ${CUDA_HOME:-} ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
[[ -n ${CUDA_HOME:-} ]] && export CUDA_HOME
NVCC=""
[[ -n $CUDA_HOME && -x $CUDA_HOME/bin/nvcc ]] && NVCC=$CUDA_HOME/bin/nvcc
[[ -z $NVCC ]] && NVCC=$(command -v nvcc || true)
SANITIZER=$(command -v compute-sanitizer || true)
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" \
  /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
  /opt/nvidia/compute-sanitizer/compute-sanitizer; do
  [[ -z $SANITIZER && -x $c ]] && SANITIZER=$c
done

GPU=0 GPU_NAME="" CAP=""
facts=$(timeout 120 "$PY" -c "
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    print('1|%s|%d.%d' % ((torch.cuda.get_device_name(),) + torch.cuda.get_device_capability()))
else:
    print('0||')" 2>/dev/null | tail -1)
IFS='|' read -r GPU GPU_NAME CAP <<<"${facts:-0||}"
[[ $GPU == 1 ]] || GPU=0
if ((GPU)); then
  ARCH=${TORCH_CUDA_ARCH_LIST:-$CAP}
  SM=${CAP/./}
else
  ARCH=${TORCH_CUDA_ARCH_LIST:-}
  SM=90  # setup.py's default target without a GPU (9.0+PTX)
fi
if [[ -n ${MAX_JOBS:-} ]]; then JOBS=$MAX_JOBS; else JOBS=$(nproc 2>/dev/null || echo 4); ((JOBS > 16)) && JOBS=16; fi

# ------------------------------------------------------------------------------------ info
{
  echo "## gpu_check $(date -u +%FT%TZ) in $ROOT, budget ${BUDGET}s, steps $STEPS, no-build $NO_BUILD"
  echo "## host: $(uname -srm), $(nproc) cores"
  echo "## GPU visible to torch: $([[ $GPU == 1 ]] && echo "yes: $GPU_NAME (sm_$SM)" || echo NO)"
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
  echo "## nvcc ($NVCC), CUDA_HOME=$CUDA_HOME"
  [[ -n $NVCC ]] && "$NVCC" --version 2>&1 | tail -2 || echo "nvcc: not found"
  echo "## compute-sanitizer: ${SANITIZER:-not found}"
  [[ -n $SANITIZER ]] && timeout 30 "$SANITIZER" --version 2>&1 | tail -1
  echo "## python ($PY)"
  timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "timm", "numpy", "pytest", "xdist", "setuptools", "pip"):
    try:
        print(f"{name:10} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:
        print(f"{name:10} missing ({type(e).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
EOF
  echo "## git: $(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) changed paths)"
} >"$WORK/info.log" 2>&1
cat "$WORK/info.log"
if ((GPU)); then
  record info PASS $(($(now) - T0)) "$GPU_NAME (sm_$SM)"
else
  record info WARN $(($(now) - T0)) "NO GPU visible to torch: GPU steps are skipped"
fi

# ------------------------------------------------------------------------------------ ptxas
ptxas_step() {
  local start secs flags cu rc=0 n spills
  start=$(now)
  secs=$(step_timeout 300 0)
  if [[ -z $NVCC ]]; then record ptxas SKIP 0 "nvcc not found"; return; fi
  flags=$(timeout 120 "$PY" - 2>>"$WORK/ptxas.log" <<'EOF'
import inspect, re
import torch
import torch.utils.cpp_extension as ce
try:
    paths = ce.include_paths("cuda")
except TypeError:  # older torch: include_paths(cuda=True)
    paths = ce.include_paths(cuda=True)
stds = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(ce))
std = max(map(int, stds)) if stds else 17
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
print(" ".join(["-I" + p for p in paths] + [f"-std=c++{std}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
               + ce.COMMON_NVCC_FLAGS))
EOF
  )
  if [[ -z $flags ]]; then record ptxas FAIL $(($(now) - start)) "torch include paths not found"; return; fi
  for cu in csrc/cuda/*.cu; do
    [[ -e $cu ]] || continue
    secs=$(step_timeout 300 0)
    ((secs == 0)) && { rc=124; break; }
    # shellcheck disable=SC2086  # $flags is a list of words
    run_logged ptxas "$secs" "$NVCC" -c "$cu" -o "$WORK/obj/$(basename "$cu" .cu).o" -O3 -lineinfo \
      -Icsrc $flags -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      --compiler-options -fPIC -gencode "arch=compute_$SM,code=sm_$SM" -Xptxas -v || rc=$?
  done
  # regs, stack, spill stores, spill loads, kernel (demangled when a demangler is there)
  local demangle=cat
  command -v cu++filt >/dev/null && demangle="cu++filt"
  [[ $demangle == cat ]] && command -v c++filt >/dev/null && demangle="c++filt"
  {
    echo "# ptxas -v for csrc/cuda/*.cu, sm_$SM ($(basename "$NVCC") $("$NVCC" --version 2>/dev/null | grep -o 'release [0-9.]*'))"
    printf 'regs\tstack\tspill_st\tspill_ld\tkernel\n'
    awk '/Function properties for/ { sub(/.*Function properties for /, ""); name = $0 }
         /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
         /ptxas info *: Used [0-9]+ registers/ {
           for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
           printf "%s\t%s\t%s\t%s\t%s\n", regs, stack, st, ld, name }' "$WORK/ptxas.log" |
      $demangle
  } >"$WORK/ptxas.txt"
  cp "$WORK/ptxas.txt" "$OUT/ptxas.txt"
  n=$(tail -n +3 "$WORK/ptxas.txt" | wc -l)
  spills=$(tail -n +3 "$WORK/ptxas.txt" | awk -F'\t' '$3 > 0 || $4 > 0 { print $5 }' | head -3)
  if timed_out $rc; then
    record ptxas TIMEOUT $(($(now) - start)) "$n kernels reported before the time ran out"
  elif ((rc != 0)); then
    record ptxas FAIL $(($(now) - start)) "nvcc failed (rc $rc), see ptxas.log"
  elif ((n == 0)); then
    record ptxas FAIL $(($(now) - start)) "no ptxas report parsed"
  elif [[ -n $spills ]]; then
    record ptxas WARN $(($(now) - start)) "$n kernels, SPILLS in: ${spills//$'\n'/; }"
  else
    record ptxas PASS $(($(now) - start)) "$n kernels, no spills, max $(tail -n +3 "$WORK/ptxas.txt" | cut -f1 | sort -n | tail -1) registers (ptxas.txt)"
  fi
}

# ------------------------------------------------------------------------------------ build
IMPORT_OK=1
import_check() {
  timeout 120 "$PY" -c "
import json, sys, tt_kernels
info = tt_kernels.build_info()
print(json.dumps(info))
sys.exit(0 if info['cuda_compiled'] or not $GPU else 3)" >>"$WORK/build.log" 2>&1
}
build_step() {
  local start secs rc build_cuda=""
  start=$(now)
  ((GPU)) && build_cuda=1
  secs=$(step_timeout 330 240)
  if ((secs == 0)); then record build SKIP 0 "out of time"; return; fi
  run_logged build "$secs" env ${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} ${build_cuda:+TT_BUILD_CUDA=1} \
    MAX_JOBS="$JOBS" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    --disable-pip-version-check -v -e .
  rc=$?
  if ((rc != 0)) && ! timed_out $rc; then
    log "build: pip install -e failed (rc $rc); falling back to setup.py build_ext --inplace"
    secs=$(step_timeout 330 240)
    if ((secs > 0)); then
      run_logged build "$secs" env ${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} \
        ${build_cuda:+TT_BUILD_CUDA=1} MAX_JOBS="$JOBS" "$PY" setup.py build_ext --inplace
      rc=$?
      # tt_kernels (tt_kernels/triton_kernels is a link in the tree) from the repo root, also
      # for the scripts run from scripts/ and bench/
      ((rc == 0)) && export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
  fi
  if timed_out $rc; then
    record build TIMEOUT $(($(now) - start)) "see build.log"
    IMPORT_OK=0
  elif ((rc != 0)); then
    record build FAIL $(($(now) - start)) "rc $rc, see build.log"
    import_check || IMPORT_OK=0
  elif import_check; then
    record build PASS $(($(now) - start)) "TORCH_CUDA_ARCH_LIST=${ARCH:-default}; $(tail -1 "$WORK/build.log" | grep -o '"cuda_ops": \[[^]]*\]')"
  else
    IMPORT_OK=0
    record build FAIL $(($(now) - start)) "built, but tt_kernels does not import or has no CUDA kernels (build.log)"
  fi
}

# ------------------------------------------------------------------------------------ tests
tests_step() {
  local start secs rc xdist="" line
  start=$(now)
  if ! ((GPU)) && ! explicit tests; then
    record tests SKIP 0 "no GPU (the CPU suite is CI's; name --steps tests to run it here)"
    return
  fi
  ((IMPORT_OK)) || { record tests SKIP 0 "tt_kernels does not import (see build)"; return; }
  secs=$(step_timeout 330 200)
  if ((secs == 0)); then record tests SKIP 0 "out of time"; return; fi
  if ((GPU)) && [[ " $PYTEST_ARGS " != *" -n "* ]] && "$PY" -c "import xdist" 2>/dev/null; then
    xdist="-n 6"
  fi
  local -a target=(tests)
  [[ -n $PYTEST_ARGS ]] && eval "target=($PYTEST_ARGS)"  # shell words, quotes respected
  # shellcheck disable=SC2086  # xdist is a list of words
  run_logged tests "$secs" "$PY" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit2 $xdist "${target[@]}"
  rc=$?
  line=$(grep -E '(passed|failed|error|no tests ran)' "$WORK/tests.log" | tail -1 | sed 's/=//g; s/^ *//')
  if timed_out $rc; then
    record tests TIMEOUT $(($(now) - start)) "killed after ${secs}s; ${line:-no summary}"
  elif ((rc == 0)); then
    record tests PASS $(($(now) - start)) "$line$( ((GPU)) || echo ' (CPU)')"
  else
    record tests FAIL $(($(now) - start)) "rc $rc: $line (junit.xml, tests.log)"
  fi
}

# ------------------------------------------------------------------------------------ sanitizers
sanitize_step() {
  local tool=$1 start secs rc line
  start=$(now)
  if ! ((GPU)); then
    if explicit "$tool"; then
      secs=$(step_timeout 200 0)
      run_logged "$tool" "$secs" "$PY" scripts/sanitize_kernels.py --quick
      rc=$?
      line=$(grep 'cases,' "$WORK/$tool.log" | tail -1)
      if ((rc == 0)); then record "$tool" PASS $(($(now) - start)) "CPU dry run only (no GPU, no sanitizer): $line"
      else record "$tool" FAIL $(($(now) - start)) "CPU dry run rc $rc: $line"; fi
    else
      record "$tool" SKIP 0 "no GPU"
    fi
    return
  fi
  [[ -n $SANITIZER ]] || { record "$tool" SKIP 0 "compute-sanitizer not found"; return; }
  ((IMPORT_OK)) || { record "$tool" SKIP 0 "tt_kernels does not import (see build)"; return; }
  secs=$(step_timeout 330 200)
  if ((secs == 0)); then record "$tool" SKIP 0 "out of time"; return; fi
  local -a env_args=()
  # Without the caching allocator every tensor is its own allocation: memcheck then sees any
  # access past a tensor's end.
  [[ $tool == memcheck ]] && env_args=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  run_logged "$tool" "$secs" env "${env_args[@]}" "$SANITIZER" --tool "$tool" --error-exitcode 86 \
    --print-limit 100 "$PY" scripts/sanitize_kernels.py
  rc=$?
  line=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|cases,' "$WORK/$tool.log" | tail -2 | sed 's/=* *//' | tr '\n' ' ')
  if timed_out $rc; then
    record "$tool" TIMEOUT $(($(now) - start)) "killed after ${secs}s; $line"
  elif grep -qiE 'device not supported|not supported on this (device|platform)' "$WORK/$tool.log"; then
    record "$tool" UNSUPPORTED $(($(now) - start)) "compute-sanitizer refused the device (gVisor?)"
  elif ((rc == 0)); then
    record "$tool" PASS $(($(now) - start)) "$line"
  elif ((rc == 86)); then
    record "$tool" FAIL $(($(now) - start)) "sanitizer errors: $line($tool.log)"
  else
    record "$tool" FAIL $(($(now) - start)) "rc $rc: $line($tool.log)"
  fi
}

# ------------------------------------------------------------------------------------ bench
bench_step() {
  local start secs rc line
  local -a extra=()
  start=$(now)
  ((IMPORT_OK)) || { record bench SKIP 0 "tt_kernels does not import (see build)"; return; }
  secs=$(step_timeout 400 10)
  if ((secs == 0)); then record bench SKIP 0 "out of time"; return; fi
  if ((GPU)); then
    mkdir -p bench/results
    eval "extra=(${BENCH_ARGS:---warmup-ms 10 --rep-ms 50})"
    run_logged bench "$secs" env PYTHONUNBUFFERED=1 "$PY" bench/bench_gpu.py --out-dir "$OUT" \
      --out-dir bench/results "${extra[@]}"
  elif explicit bench; then
    eval "extra=(${BENCH_ARGS:---models tiny --batches 1,2})"
    run_logged bench "$secs" env PYTHONUNBUFFERED=1 TRITON_INTERPRET=1 "$PY" bench/bench_gpu.py \
      --smoke --out-dir "$OUT" "${extra[@]}"
  else
    record bench SKIP 0 "no GPU (bench/bench_gpu.py --smoke is the CPU dry run)"
    return
  fi
  rc=$?
  line=$(grep -E '^checks:' "$WORK/bench.log" | tail -1 | cut -c1-300)
  if timed_out $rc; then
    record bench TIMEOUT $(($(now) - start)) "killed after ${secs}s; partial JSON kept (complete: false)"
  elif ((rc == 0)); then
    local json=("$OUT"/gpu-*.json)
    record bench PASS $(($(now) - start)) "$line$( ((GPU)) || echo ' (smoke, CPU)'); ${json[0]##*/}"
  else
    record bench FAIL $(($(now) - start)) "rc $rc: ${line:-see bench.log}"
  fi
}

# ------------------------------------------------------------------------------------ run
declare -a bg=()
if want ptxas; then
  if ((GPU)) || explicit ptxas; then
    ptxas_step &
    bg+=($!)
  else
    record ptxas SKIP 0 "no GPU (it needs only nvcc: name --steps ptxas to run it here)"
  fi
fi
if want build; then
  if ((NO_BUILD)); then
    if import_check; then
      record build SKIP 0 "--no-build; tt_kernels imports: $(tail -1 "$WORK/build.log" | grep -o '"cuda_ops": \[[^]]*\]')"
    else
      IMPORT_OK=0
      record build FAIL 0 "--no-build, and tt_kernels does not import$( ((GPU)) && echo ' or has no CUDA kernels') (build.log)"
    fi
  else
    build_step
  fi
  pack
elif ! import_check; then
  IMPORT_OK=0
fi
# tests and the two sanitizers side by side (correctness only; nothing is timed)
declare -a phase=()
want tests && { tests_step & phase+=($!); }
want memcheck && { sanitize_step memcheck & phase+=($!); }
want racecheck && { sanitize_step racecheck & phase+=($!); }
((${#phase[@]})) && wait "${phase[@]}"
pack
((${#bg[@]})) && wait "${bg[@]}"  # ptxas: done long before; the benchmark wants the CPU quiet
want bench && bench_step
pack

# ------------------------------------------------------------------------------------ summary
elapsed=$(($(now) - T0))
failed=""
{
  echo "gpu_check summary: $(date -u +%FT%TZ), ${elapsed}s of a ${BUDGET}s budget"
  if ((GPU)); then
    echo "device: $GPU_NAME (sm_$SM); $(grep -E '^(torch|triton) ' "$WORK/info.log" | tr -s ' ' | tr '\n' ' ')"
  else
    echo "NO GPU: torch sees no CUDA device here, so the build for a card, the CUDA tests, the"
    echo "sanitizers and the benchmark were skipped (name them in --steps for their CPU dry runs)."
  fi
  printf '%-10s %-11s %6s  %s\n' step status time detail
  for s in info ${ALL_STEPS//,/ }; do
    if [[ -f $STATUS/$s ]]; then
      IFS=$'\t' read -r name st secs detail <"$STATUS/$s"
      printf '%-10s %-11s %5ss  %s\n' "$name" "$st" "$secs" "$detail"
      [[ $st == FAIL || $st == TIMEOUT ]] && failed+="$name "
    elif want "$s" || [[ $s == info ]]; then
      printf '%-10s %-11s %6s  %s\n' "$s" SKIP - "not run"
    fi
  done
  if [[ -f $WORK/ptxas.txt ]]; then
    echo "--- ptxas (regs stack spill_st spill_ld kernel):"
    tail -n +3 "$WORK/ptxas.txt" | cut -c1-150
  fi
  if [[ -f $WORK/bench.log ]]; then
    echo "--- bench (end of bench.log):"
    awk '/^reduction step/ { p = 1 } p && /^$/ { exit } p' "$WORK/bench.log" | head -12
    grep -E '^(checks|JSON|Triton kernels with)' "$WORK/bench.log" | cut -c1-400
  fi
  if [[ -n $failed ]]; then
    echo "RESULT: FAILED: $failed"
  elif ((GPU)); then
    echo "RESULT: all steps that ran passed"
  else
    echo "RESULT: no GPU; nothing failed"
  fi
  grep -l 'out of time' "$STATUS"/* >/dev/null 2>&1 &&
    echo "Steps skipped for time: rerun them on the warm machine with --no-build --steps LIST."
  files="summary.txt"
  for f in "$OUT"/*; do [[ -e $f && ${f##*/} != summary.txt ]] && files+=" ${f##*/}"; done
  echo "files in $OUT: $files (logs.tar.gz: every step's log)"
} >"$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/summary.txt"
pack
echo
cat "$OUT/summary.txt"
rm -rf "$WORK" "$WORK.tar.gz"
if [[ -n $failed ]]; then exit 1; fi
((GPU)) || exit 2
exit 0
