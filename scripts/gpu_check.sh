#!/usr/bin/env bash
# A GPU lease's work in two calls (a 15-minute window: a machine start of 1-2 minutes, then two
# calls of about 7 minutes). Each step logs, the script goes on after a failure, and a summary
# (stdout and $OUT/summary.txt) ends each call with what to commit.
#
#   bash scripts/gpu_check.sh --phase build-test          # call 1 (device tool: timeout_s 500)
#   bash scripts/gpu_check.sh --phase bench --no-build    # call 2 (device tool: timeout_s 500)
#   bash scripts/gpu_check.sh --no-build --steps memcheck,racecheck   # a rerun on a warm machine
#
# Phase build-test (budget 420 s): info; build in place for the visible card only (its compute
# capability as TORCH_CUDA_ARCH_LIST, 16 jobs, nvcc -Xptxas -v, so the build's own log gives the
# ptxas register/spill report); then memcheck and racecheck (compute-sanitizer over
# scripts/sanitize_kernels.py, filtered to the project's kernels) in the background while the GPU
# tests run (`pytest -m gpu`, pytest-xdist) and then `python -m tt_kernels.selftest`; ptxas.
# Phase bench (budget 460 s): info; build only if no extension built in place imports with its
# CUDA kernels (a cold machine starts bare; a warm one keeps the first call's build); the op
# benchmarks (bench/bench_gpu.py, --time-budget: at most 160 s, less when a rebuild took time),
# proportional attention's forms (bench/bench_attention.py, 60 s kept for it) and the end-to-end
# benchmark (bench/bench_model.py, 190 s kept for it), each with the GPU to itself.
#
# Estimated wall time on the H200 machine (16 cores), from cpu-seconds measured on this
# repository's 2-core AMD EPYC (2026-11-30, no GPU) divided by the parallelism there:
#   info       15 s   torch import, nvidia-smi, compute-sanitizer --version
#   build      70 s   nvcc for one arch: transform.cu ~37 cpu-s, match.cu ~30, apply.cu,
#                     untransform.cu and cls_attention.cu ~26 each (torch's headers ~22 of each);
#                     each C++ file ~11 (g++ -O3); ~245 cpu-s in all, but 16 jobs compile every
#                     file at once, so: the longest file, plus pip's setup and the link
#   tests     120 s   384 tests (-m gpu) on 14 workers: ~15 s start and collection each, Triton
#                     compiles spread over the workers (~50 specializations, 1-3 s each), one
#                     torch.compile (~40 s) and one float64 ViT-S forward on the CPU (~10 s)
#   selftest  200 s   at most: one process per backend, side by side; the CUDA kernels' ~300 cases
#                     (~60 s, mostly the float64 reference); Triton's compile first (~100
#                     specializations up to N = 1370, 1-20 s each on this CPU), so it gets
#                     --time-budget and is left unverified, not killed, if that runs out
#   memcheck  200 s   244 cases; each Triton specialization compiles once (~40, 2-3 s each; on
#   racecheck 240 s   the CPU here the whole program takes 400 s, interpreted); the instrumented
#                     kernels run on a few images: start-up and compiles dominate. Both run beside
#                     tests + selftest
#   ptxas       0 s   parsed from the build log (standalone: the five files at once, ~40 s)
#   => build-test ~15 + 70 + max(120 + 200, 240) + summary ~ 410 s of its 420
#   bench     160 s   bench_gpu.py --time-budget 160 (warm machine; ViT-L at B=256 comes last)
#   attention  60 s   bench_attention.py: bf16, batch 256 and 1, DeiT-S/B and DINOv2-S shapes
#   model     180 s   bench_model.py: 3 models x batches 256, 64, 1 eager (a third of the time,
#                     --time-budget), then DeiT-S compiled at 256 and 1 (15-30 s a compile)
#   => bench ~15 + (0 warm | 70 cold: bench then gets 90 s) + 160 + 60 + 180 ~ 440 s of its 460
# Both calls and a 90 s start: ~860 s of the 900. With less device time left before call 2, pass
# --budget (the device tool's budget_left_s less 30): bench_gpu's share shrinks first.
#
# Options:
#   --phase P            build-test, bench or all (all: every step, budget 880 s: not one call)
#   --no-build           reuse the extension built in place if it imports with its CUDA kernels;
#                        build only if it does not (without: always build)
#   --steps LIST         comma list of build,ptxas,tests,selftest,memcheck,racecheck,bench,model
#                        (default: the phase's; info always runs). Without a GPU every step is
#                        skipped unless named here; then it runs its CPU dry run: ptxas (nvcc
#                        only), tests (-m gpu --collect-only), selftest --quick and
#                        sanitize_kernels.py --quick under TRITON_INTERPRET=1 (no sanitizer),
#                        bench_gpu.py --smoke, bench_model.py on the CPU at batch 1.
#   --budget SECONDS     wall-clock budget of the whole call (default: the phase's); each step
#                        gets what its successors leave it, or is skipped
#   --pytest-args ARGS   replaces "-m gpu -n N tests" (e.g. "tests/test_cuda_stream.py -x")
#   --bench-args ARGS    replaces bench_gpu.py's "--warmup-ms 10 --rep-ms 50" (without a GPU
#                        "--models tiny --batches 1,2")
# $OUT (the device tool sets it; default ./out/gpu) gets at most 8 files: summary.txt,
# logs.tar.gz (every step's log, re-packed after each step), junit.xml, ptxas.txt,
# gpu-<card>.json and model-*.json (also written to bench/results/ on that machine).
# Exit status: 0 every step that ran passed; 1 a step failed or timed out; 2 nothing failed but no
# GPU was visible, so the GPU steps were skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)

PHASE=all
NO_BUILD=0
STEPS_ARG=""
BUDGET=""
PYTEST_ARGS=""
BENCH_ARGS=""
while (($#)); do
  case $1 in
    --phase) PHASE=${2:?--phase needs build-test, bench or all}; shift ;;
    --phase=*) PHASE=${1#*=} ;;
    --no-build) NO_BUILD=1 ;;
    --steps) STEPS_ARG=${2:?--steps needs a list}; shift ;;
    --steps=*) STEPS_ARG=${1#*=} ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --pytest-args) PYTEST_ARGS=${2?}; shift ;;
    --bench-args) BENCH_ARGS=${2?}; shift ;;
    -h | --help) sed -n '2,61p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
ALL_STEPS=build,ptxas,tests,selftest,memcheck,racecheck,bench,attention,model
case $PHASE in
  build-test) PHASE_STEPS=build,ptxas,tests,selftest,memcheck,racecheck; BUDGET=${BUDGET:-420} ;;
  bench) PHASE_STEPS=build,bench,attention,model; BUDGET=${BUDGET:-460} ;;
  all) PHASE_STEPS=$ALL_STEPS; BUDGET=${BUDGET:-880} ;;
  *) echo "gpu_check: --phase must be build-test, bench or all, got $PHASE" >&2; exit 64 ;;
esac
STEPS=${STEPS_ARG:-$PHASE_STEPS}
for s in ${STEPS//,/ }; do
  [[ ",$ALL_STEPS," == *",$s,"* ]] || { echo "gpu_check: unknown step $s ($ALL_STEPS)" >&2; exit 64; }
done

OUT=${OUT:-$ROOT/out/gpu}
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then echo "gpu_check: cannot create $OUT" >&2; exit 1; fi
rm -f "$OUT"/summary.txt "$OUT"/logs.tar.gz "$OUT"/junit.xml "$OUT"/gpu-*.json "$OUT"/model-*.json \
  "$OUT"/attention-*.json \
  "$OUT"/ptxas.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
STATUS=$WORK/status
mkdir -p "$STATUS" "$WORK/obj"
# The in-place build is importable from the root, also by the scripts in scripts/ and bench/; any
# extension torch compiles at run time goes to this run's folder, never to a shared cache where a
# killed run would leave a lock.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions

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
  tar czf "$WORK.tar.gz" -C "$WORK" --exclude=obj --exclude=torch_extensions . 2>/dev/null &&
    mv -f "$WORK.tar.gz" "$OUT/logs.tar.gz"
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
[[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]] && NVCC=$CUDA_HOME/bin/nvcc
[[ -z $NVCC ]] && NVCC=$(command -v nvcc || true)
SANITIZER=$(command -v compute-sanitizer || true)
for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
  "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
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
  ARCH=${TORCH_CUDA_ARCH_LIST:-$CAP}  # the visible card's architecture only: nvcc is the build
  SM=${CAP/./}
else
  ARCH=${TORCH_CUDA_ARCH_LIST:-}
  SM=90  # setup.py's default target without a GPU (9.0+PTX)
fi
if [[ -n ${MAX_JOBS:-} ]]; then JOBS=$MAX_JOBS; else JOBS=$(nproc 2>/dev/null || echo 4); ((JOBS > 16)) && JOBS=16; fi

# ------------------------------------------------------------------------------------ info
{
  echo "## gpu_check $(date -u +%FT%TZ) in $ROOT, phase $PHASE, budget ${BUDGET}s, steps $STEPS, no-build $NO_BUILD"
  echo "## host: $(uname -srm), $(nproc) cores"
  echo "## GPU visible to torch: $([[ $GPU == 1 ]] && echo "yes: $GPU_NAME (sm_$SM)" || echo NO)"
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
  echo "## nvcc ($NVCC), CUDA_HOME=${CUDA_HOME:-}"
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
# ptxas_table LOG: regs, stack, spill stores, spill loads, kernel (demangled when a demangler is
# there) of every `ptxas -v` function report in LOG.
ptxas_table() {
  local demangle=cat
  command -v cu++filt >/dev/null && demangle="cu++filt"
  [[ $demangle == cat ]] && command -v c++filt >/dev/null && demangle="c++filt"
  echo "# ptxas -v for csrc/cuda/*.cu, sm_$SM ($(basename "${NVCC:-nvcc}") $("${NVCC:-nvcc}" --version 2>/dev/null | grep -o 'release [0-9.]*'))"
  printf 'regs\tstack\tspill_st\tspill_ld\tkernel\n'
  awk '/Function properties for/ { sub(/.*Function properties for /, ""); name = $0 }
       /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
       /ptxas info *: Used [0-9]+ registers/ {
         for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
         printf "%s\t%s\t%s\t%s\t%s\n", regs, stack, st, ld, name }' "$1" | $demangle
}
# ptxas_record START RC SOURCE: the ptxas step's status from $WORK/ptxas.txt
ptxas_record() {
  local n spills
  cp "$WORK/ptxas.txt" "$OUT/ptxas.txt"
  n=$(tail -n +3 "$WORK/ptxas.txt" | wc -l)
  spills=$(tail -n +3 "$WORK/ptxas.txt" | awk -F'\t' '$3 > 0 || $4 > 0 { print $5 }' | head -3)
  if timed_out "$2"; then
    record ptxas TIMEOUT $(($(now) - $1)) "$n kernels reported before the time ran out"
  elif (($2 != 0)); then
    record ptxas FAIL $(($(now) - $1)) "nvcc failed (rc $2), see ptxas.log"
  elif ((n == 0)); then
    record ptxas FAIL $(($(now) - $1)) "no ptxas report parsed"
  elif [[ -n $spills ]]; then
    record ptxas WARN $(($(now) - $1)) "$n kernels, SPILLS in: ${spills//$'\n'/; }"
  else
    record ptxas PASS $(($(now) - $1)) "$n kernels, no spills, max $(tail -n +3 "$WORK/ptxas.txt" | cut -f1 | sort -n | tail -1) registers ($3; ptxas.txt)"
  fi
}
# The standalone report: each csrc/cuda/*.cu compiled for sm_$SM with -Xptxas -v, all at once.
ptxas_step() {
  local start secs flags cu rc=0 pid
  local -a pids=()
  start=$(now)
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
  secs=$(step_timeout 300 0)
  for cu in csrc/cuda/*.cu; do
    [[ -e $cu ]] || continue
    # shellcheck disable=SC2086  # $flags is a list of words
    run_logged "ptxas-$(basename "$cu" .cu)" "$secs" "$NVCC" -c "$cu" \
      -o "$WORK/obj/$(basename "$cu" .cu).o" -O3 -lineinfo -Icsrc $flags \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C --compiler-options -fPIC \
      -gencode "arch=compute_$SM,code=sm_$SM" -Xptxas -v &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { local r=$?; ((rc == 0)) && rc=$r; }; done
  cat "$WORK"/ptxas-*.log >>"$WORK/ptxas.log" 2>/dev/null
  rm -f "$WORK"/ptxas-*.log
  ptxas_table "$WORK/ptxas.log" >"$WORK/ptxas.txt"
  ptxas_record "$start" "$rc" "standalone nvcc"
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
  secs=$(step_timeout 300 240)
  if ((secs == 0)); then record build SKIP 0 "out of time"; IMPORT_OK=0; return; fi
  # -Xptxas -v through nvcc's own variable: the build log holds the ptxas report of the very
  # objects built, so the ptxas step compiles nothing again.
  local -a env_args=(${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} ${build_cuda:+TT_BUILD_CUDA=1}
    MAX_JOBS="$JOBS" "NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v")
  run_logged build "$secs" env "${env_args[@]}" "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index --disable-pip-version-check -v -e .
  rc=$?
  if ((rc != 0)) && ! timed_out $rc; then
    log "build: pip install -e failed (rc $rc); falling back to setup.py build_ext --inplace"
    secs=$(step_timeout 300 240)
    run_logged build "$secs" env "${env_args[@]}" "$PY" setup.py build_ext --inplace
    rc=$?
  fi
  if timed_out $rc; then
    record build TIMEOUT $(($(now) - start)) "see build.log"
    IMPORT_OK=0
  elif ((rc != 0)); then
    record build FAIL $(($(now) - start)) "rc $rc, see build.log"
    import_check || IMPORT_OK=0
  elif import_check; then
    record build PASS $(($(now) - start)) "TORCH_CUDA_ARCH_LIST=${ARCH:-default}, $JOBS jobs; $(tail -1 "$WORK/build.log" | grep -o '"cuda_ops": \[[^]]*\]')"
  else
    IMPORT_OK=0
    record build FAIL $(($(now) - start)) "built, but tt_kernels does not import or has no CUDA kernels (build.log)"
  fi
}

# ------------------------------------------------------------------------------------ tests
tests_step() {
  local start secs rc line workers=$1
  start=$(now)
  ((IMPORT_OK)) || { record tests SKIP 0 "tt_kernels does not import (see build)"; return; }
  local -a args=(-m gpu -n "$workers" tests)
  if ! ((GPU)); then
    # The selection's CPU dry run: which tests the GPU run would take (they skip or run on the
    # CPU here, and CI runs them all anyway).
    explicit tests || { record tests SKIP 0 "no GPU (CI runs the CPU suite)"; return; }
    args=(-m gpu --collect-only tests)
  elif ! "$PY" -c "import xdist" 2>/dev/null; then
    args=(-m gpu tests)
  fi
  [[ -n $PYTEST_ARGS ]] && eval "args=($PYTEST_ARGS)"  # shell words, quotes respected
  secs=$(step_timeout 300 100)
  if ((secs == 0)); then record tests SKIP 0 "out of time"; return; fi
  run_logged tests "$secs" "$PY" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit2 "${args[@]}"
  rc=$?
  line=$(grep -E '(passed|failed|skipped|error|deselected|no tests ran|collected).* in [0-9.]+s' "$WORK/tests.log" | tail -1 | sed 's/=//g; s/^ *//')
  if timed_out $rc; then
    record tests TIMEOUT $(($(now) - start)) "killed after ${secs}s; ${line:-no summary}"
  elif ((rc == 0)); then
    record tests PASS $(($(now) - start)) "$line$( ((GPU)) || echo ' (CPU dry run: selection only)')"
  else
    record tests FAIL $(($(now) - start)) "rc $rc: $line (junit.xml, tests.log)"
  fi
}

# ------------------------------------------------------------------------------------ selftest
selftest_step() {
  local start secs rc=0 rc_triton=0 line
  start=$(now)
  ((IMPORT_OK)) || { record selftest SKIP 0 "tt_kernels does not import (see build)"; return; }
  if ! ((GPU)); then
    explicit selftest || { record selftest SKIP 0 "no GPU"; return; }
    secs=$(step_timeout 200 15)
    run_logged selftest "$secs" env PYTHONUNBUFFERED=1 TRITON_INTERPRET=1 "$PY" -m tt_kernels.selftest --quick
    rc=$?
  else
    secs=$(step_timeout 200 15)
    if ((secs == 0)); then record selftest SKIP 0 "out of time"; return; fi
    # One process per backend, side by side: the CUDA kernels are compiled already, Triton's
    # compile at first use (one per variant and token bucket), so Triton gets a time budget and
    # stays unverified, not killed, if it runs out. Each records its own verdict.
    run_logged selftest "$secs" env PYTHONUNBUFFERED=1 "$PY" -m tt_kernels.selftest --backends cuda &
    local pid=$!
    run_logged selftest_triton "$secs" env PYTHONUNBUFFERED=1 "$PY" -m tt_kernels.selftest \
      --backends triton --time-budget $((secs - 40))
    rc_triton=$?
    wait "$pid"
    rc=$?
    cat "$WORK/selftest_triton.log" >>"$WORK/selftest.log"
    ((rc == 0)) && rc=$rc_triton
  fi
  line=$(grep -E '^(cuda|triton) +(PASS|FAIL)' "$WORK/selftest.log" | tr -s ' ' | tr '\n' ';')
  if timed_out $rc; then
    record selftest TIMEOUT $(($(now) - start)) "killed after ${secs}s; ${line:-no verdict}"
  elif ((rc == 0)); then
    record selftest PASS $(($(now) - start)) "$line$( ((GPU)) || echo ' (CPU dry run, --quick)')"
  else
    record selftest FAIL $(($(now) - start)) "rc $rc: ${line:-see selftest.log}"
  fi
}

# ------------------------------------------------------------------------------------ sanitizers
sanitize_step() {
  local tool=$1 start secs rc line help filters
  start=$(now)
  if ! ((GPU)); then
    if explicit "$tool"; then
      secs=$(step_timeout 240 0)
      run_logged "$tool" "$secs" env TRITON_INTERPRET=1 "$PY" scripts/sanitize_kernels.py --quick
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
  help=$(timeout 30 "$SANITIZER" --help 2>&1)
  has() { grep -q -- "$1" <<<"$help"; }
  # Only the project's kernels are instrumented; the others (PyTorch's copies and fills) run as
  # they are. Options that older sanitizers lack are left out, not guessed.
  filters=$("$PY" scripts/sanitize_kernels.py --kernel-filters)
  has --kernel-name || filters=${filters//--kernel-name /--kernel-regex }
  local -a opts=(--tool "$tool" --error-exitcode 86 --print-limit 100)
  # ptxas and Triton's compiler run as child processes that never touch CUDA
  has --target-processes && opts+=(--target-processes application-only)
  # start-up under a loaded CPU (tests beside it) can exceed the default 10 s to connect
  has --launch-timeout && opts+=(--launch-timeout 120)
  # CUDA API errors that PyTorch and Triton provoke and handle themselves (symbol probing) would
  # count as errors; a failing launch of ours raises in the program and fails its case there.
  has --report-api-errors && opts+=(--report-api-errors no)
  local -a env_args=()
  if [[ $tool == memcheck ]]; then
    # Without the caching allocator every tensor is its own allocation, and with padding after
    # each one an access past a tensor's end is out of bounds even when the next one follows.
    env_args=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    has --padding && opts+=(--padding 256)
  fi
  secs=$(step_timeout 330 15)
  if ((secs == 0)); then record "$tool" SKIP 0 "out of time"; return; fi
  # shellcheck disable=SC2086  # $filters is a list of words
  run_logged "$tool" "$secs" env "${env_args[@]}" "$SANITIZER" "${opts[@]}" $filters \
    "$PY" scripts/sanitize_kernels.py
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

# ------------------------------------------------------------------------------------ benchmarks
MODEL_SHARE=200  # bench_model's 190 s and the summary's 10, kept from bench_gpu's time budget
ATTENTION_SHARE=60  # bench_attention's, likewise
bench_step() {
  local start secs rc line budget
  local -a extra=()
  start=$(now)
  ((IMPORT_OK)) || { record bench SKIP 0 "tt_kernels does not import (see build)"; return; }
  if ((GPU)); then
    local reserve=10
    want model && reserve=$MODEL_SHARE
    want attention && reserve=$((reserve + ATTENTION_SHARE))
    budget=$(step_timeout 220 $((reserve + 30)))
    if ((budget == 0)); then record bench SKIP 0 "out of time"; return; fi
    secs=$(step_timeout $((budget + 30)) "$reserve")
    mkdir -p bench/results
    eval "extra=(${BENCH_ARGS:---warmup-ms 10 --rep-ms 50})"
    run_logged bench "$secs" env PYTHONUNBUFFERED=1 "$PY" bench/bench_gpu.py --out-dir "$OUT" \
      --out-dir bench/results --time-budget "$budget" "${extra[@]}"
  elif explicit bench; then
    secs=$(step_timeout 400 10)
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

model_step() {
  local start secs rc=0 line
  local -a eager=() compiled=()
  start=$(now)
  ((IMPORT_OK)) || { record model SKIP 0 "tt_kernels does not import (see build)"; return; }
  secs=$(step_timeout 400 10)
  if ((secs == 0)); then record model SKIP 0 "out of time"; return; fi
  if ((GPU)); then
    # The headline first (batch 256): every model eager, then DeiT-S compiled (each compiled row
    # is a compile of 15-30 s, so the sweep of all models could not fit). The patched rows time
    # the CUDA kernels, verified or not; --time-budget leaves a compile's margin before the kill.
    local common=(--device cuda --dtype bf16 --amp --backend cuda --out-dir bench/results --out-dir "$OUT")
    eager=(bench/bench_model.py "${common[@]}" --batch 256,64,1 --time-budget $((secs / 3))
      --models deit_small_patch16_224,deit_base_patch16_224,vit_small_patch14_dinov2)
    compiled=(bench/bench_model.py "${common[@]}" --batch 256,1 --compile
      --models deit_small_patch16_224)
  elif explicit model; then
    eager=(bench/bench_model.py --device cpu --batch 1 --models deit_small_patch16_224
      --out-dir "$OUT")
  else
    record model SKIP 0 "no GPU (name --steps model for the CPU dry run)"
    return
  fi
  run_logged model "$secs" env PYTHONUNBUFFERED=1 "$PY" "${eager[@]}" || rc=$?
  if ((${#compiled[@]})) && ! timed_out $rc; then
    secs=$(step_timeout 400 10)
    run_logged model "$secs" env PYTHONUNBUFFERED=1 "$PY" "${compiled[@]}" --time-budget $((secs - 60)) || rc=$?
  fi
  local files
  files=$(cd "$OUT" && ls model-*.json 2>/dev/null | tr '\n' ' ')
  ((GPU)) && files+="; patched rows on the CUDA kernels (--backend cuda)"
  if timed_out $rc; then
    record model TIMEOUT $(($(now) - start)) "killed after ${secs}s; ${files:-no JSON}"
  elif ((rc == 0)); then
    record model PASS $(($(now) - start)) "${files:-no JSON written?}$( ((GPU)) || echo ' (CPU dry run)')"
  else
    record model FAIL $(($(now) - start)) "rc $rc: $(tail -1 "$WORK/model.log" | cut -c1-200) (model.log)"
  fi
}

attention_step() {
  local start secs rc reserve=10
  start=$(now)
  ((IMPORT_OK)) || { record attention SKIP 0 "tt_kernels does not import (see build)"; return; }
  want model && reserve=$MODEL_SHARE
  secs=$(step_timeout $ATTENTION_SHARE "$reserve")
  if ((secs == 0)); then record attention SKIP 0 "out of time"; return; fi
  if ((GPU)); then
    # proportional attention's forms at the shapes of the headline (bf16, batch 256 and 1): which
    # one tt_kernels.attention.CUDA_AUTO should name
    run_logged attention "$secs" env PYTHONUNBUFFERED=1 "$PY" bench/bench_attention.py \
      --dtypes bf16 --batches 256,1 --out-dir bench/results --out-dir "$OUT"
  elif explicit attention; then
    run_logged attention "$secs" env PYTHONUNBUFFERED=1 "$PY" bench/bench_attention.py --smoke \
      --out-dir "$OUT"
  else
    record attention SKIP 0 "no GPU (bench/bench_attention.py --smoke is the CPU dry run)"
    return
  fi
  rc=$?
  if timed_out $rc; then
    record attention TIMEOUT $(($(now) - start)) "killed after ${secs}s"
  elif ((rc == 0)); then
    record attention PASS $(($(now) - start)) "$(grep -iE 'suggest|CUDA_AUTO' "$WORK/attention.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
  else
    record attention FAIL $(($(now) - start)) "rc $rc: $(tail -1 "$WORK/attention.log" | cut -c1-200) (attention.log)"
  fi
}

# ------------------------------------------------------------------------------------ run
if want build; then
  if ! ((GPU)) && ! explicit build; then
    record build SKIP 0 "no GPU (name --steps build to build the CPU kernels in place)"
    import_check || IMPORT_OK=0
  elif ((NO_BUILD)) && import_check; then
    record build SKIP 0 "--no-build, and the extension built in place imports: $(tail -1 "$WORK/build.log" | grep -o '"cuda_ops": \[[^]]*\]')"
  elif ((NO_BUILD)) && ! ((GPU)); then
    IMPORT_OK=0
    record build FAIL 0 "--no-build, and tt_kernels does not import (build.log)"
  else
    ((NO_BUILD)) && log "build: --no-build, but no extension with CUDA kernels is built here (a cold machine): building"
    build_step
  fi
  pack
elif ! import_check; then
  IMPORT_OK=0
fi
if want ptxas; then
  if grep -q 'Used [0-9]* registers' "$WORK/build.log" 2>/dev/null; then
    ptxas_table "$WORK/build.log" >"$WORK/ptxas.txt"
    ptxas_record "$(now)" 0 "from the build's nvcc"
  elif ((GPU)) || explicit ptxas; then
    ptxas_step &
    PTXAS_PID=$!
  else
    record ptxas SKIP 0 "no GPU (it needs only nvcc: name --steps ptxas to run it here)"
  fi
fi
# memcheck and racecheck in the background (nothing here times anything), the tests and then the
# self-test in the foreground; the tests' workers leave a core to each sanitizer.
declare -a sanitizers=()
want memcheck && { sanitize_step memcheck & sanitizers+=($!); }
want racecheck && { sanitize_step racecheck & sanitizers+=($!); }
workers=$((JOBS - ${#sanitizers[@]}))
((workers < 1)) && workers=1
want tests && tests_step "$workers"
pack
want selftest && selftest_step
pack
((${#sanitizers[@]})) && wait "${sanitizers[@]}"
[[ -n ${PTXAS_PID:-} ]] && wait "$PTXAS_PID"
pack
# the benchmarks, each with the GPU and the CPU to itself
want bench && bench_step
pack
want attention && attention_step
want model && model_step
pack

# ------------------------------------------------------------------------------------ summary
elapsed=$(($(now) - T0))
failed=""
passed() { [[ -f $STATUS/$1 ]] && [[ $(cut -f2 "$STATUS/$1") == PASS ]]; }
{
  echo "gpu_check summary: $(date -u +%FT%TZ), phase $PHASE, ${elapsed}s of a ${BUDGET}s budget"
  if ((GPU)); then
    echo "device: $GPU_NAME (sm_$SM); $(grep -E '^(torch|triton) ' "$WORK/info.log" | tr -s ' ' | tr '\n' ' ')"
  else
    echo "NO GPU: torch sees no CUDA device here, so the build for a card, the CUDA tests, the"
    echo "self-test, the sanitizers and the benchmarks were skipped (name them in --steps for their"
    echo "CPU dry runs)."
  fi
  printf '%-10s %-11s %6s  %s\n' step status time detail
  for s in info ${ALL_STEPS//,/ }; do
    if [[ -f $STATUS/$s ]]; then
      IFS=$'\t' read -r name st secs detail <"$STATUS/$s"
      printf '%-10s %-11s %5ss  %s\n' "$name" "$st" "$secs" "$detail"
      [[ $st == FAIL || $st == TIMEOUT ]] && failed+="$name "
    elif want "$s"; then
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
    grep -E '^(checks|JSON|Triton kernels with|fastest at)' "$WORK/bench.log" | cut -c1-400
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
  if ((GPU)); then
    echo "--- what to commit (files come back in the device tool's files_at, a copy of \$OUT):"
    if want bench || want attention || want model; then
      for f in "$OUT"/gpu-*.json "$OUT"/attention-*.json "$OUT"/model-*.json; do
        [[ -e $f ]] && echo "  copy ${f##*/} into bench/results/ and commit it"
      done
    fi
    if want tests || want selftest || want memcheck || want racecheck; then
      verified=$(grep -oE '(cuda|triton) PASS' "$STATUS/selftest" 2>/dev/null | cut -d' ' -f1 | tr '\n' ' ')
      if passed tests && passed memcheck && passed racecheck && [[ -n $verified ]]; then
        echo "  tt_kernels/verdicts.py: VERIFIED_ON_GPU[backend] = \"$GPU_NAME (sm_$SM), $(date -u +%F)," \
          "commit $(git rev-parse --short HEAD 2>/dev/null): gpu_check build-test\" for: $verified" \
          "(the self-test: $(cut -f4 "$STATUS/selftest"))"
        echo "  then order GPU_ORDER in tt_kernels/backends.py by the bench phase's 'fastest at' line"
      else
        echo "  leave VERIFIED_ON_GPU alone: tests, memcheck, racecheck and a backend's self-test must all pass on"
        echo "  one run (here: $(for s in tests selftest memcheck racecheck; do
          printf '%s %s, ' "$s" "$(cut -f2 "$STATUS/$s" 2>/dev/null || echo 'not run')"; done))"
      fi
    fi
    echo "  and keep summary.txt for the note"
  fi
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
