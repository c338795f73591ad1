#!/usr/bin/env bash
# The install matrix: tt_kernels must build and import the same way whatever pip, setuptools and
# wheel the user has. Each toolchain is a fresh venv that sees this Python's packages (torch,
# numpy, triton...) but not its pip, setuptools, wheel or tt_kernels; each route builds a fresh
# copy of this working tree (CPU kernels only, TT_BUILD_CUDA=0), then imports tt_kernels and
# tt_kernels.triton_kernels from outside the copy and calls torch.ops.tt.transform.
#
#   bash scripts/check_install.sh                 # the whole matrix
#   bash scripts/check_install.sh old+wheel new   # some toolchains
#
# Toolchains:  old        pip 23.2.1, setuptools 65.5.0 (Python 3.11's venv), no wheel
#              old+wheel  the same with wheel
#              new        the newest pip, the newest setuptools this torch allows, no wheel
# Routes:      editable   pip install --no-build-isolation -e .   (from outside: no top-level
#                         `triton_kernels`)
#              wheel      pip wheel --no-build-isolation --no-deps . (real files, tt_kernels/
#                         triton_kernels as in triton_kernels/, no link, no top-level
#                         `triton_kernels`), then pip install of that wheel
#              inplace    python setup.py build_ext --inplace, the copy on PYTHONPATH
#              develop    python setup.py develop --no-deps (the legacy route; setuptools >= 80
#                         runs pip with build isolation instead: must fail as `isolated` does)
#              isolated   pip install . without --no-build-isolation: must fail with setup.py's
#                         message (pip's isolated build cannot see torch)
# On `old`, editable and wheel must fail with setup.py's message asking for `wheel`.
# The first build compiles; the others take its object files (a compiler wrapper keyed by the
# compile command and the source), so the matrix costs one build plus pip's work (~2.5 min on 2
# cores). Needs PyPI for the toolchains. Exit status 1 when a cell fails. TT_CHECK_KEEP=1 keeps
# the work folder (venvs, copies, logs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
git rev-parse --git-dir >/dev/null 2>&1 || { echo "check_install: needs a git checkout" >&2; exit 1; }
PY=${PYTHON:-python}
T0=$(date +%s)
TOOLCHAINS=("$@")
((${#TOOLCHAINS[@]})) || TOOLCHAINS=(old old+wheel new)
RUN=$(mktemp -d "${TMPDIR:-/tmp}/check_install.XXXXXX") || exit 1
RUN=$(cd "$RUN" && pwd -P)
mkdir -p "$RUN/logs" "$RUN/bin" "$RUN/obj" "$RUN/main-site" "$RUN/tree"
cleanup() { if [[ ${TT_CHECK_KEEP:-0} == 1 ]]; then echo "kept $RUN"; else rm -rf "$RUN"; fi; }
trap cleanup EXIT
unset PYTHONPATH PIP_REQUIRE_VIRTUALENV

# This Python's packages, less the build tools under test and tt_kernels itself (its .pth files,
# such as an editable install's finder, are left out with them).
for site in $("$PY" -c 'import sysconfig; print(*{sysconfig.get_paths()[k] for k in ("purelib", "platlib")})'); do
  for p in "$site"/*; do
    case ${p##*/} in
      pip | pip-* | setuptools | setuptools-* | pkg_resources | _distutils_hack | wheel | wheel-* | \
        tt_kernels* | __editable__* | *.pth | __pycache__) ;;
      *) [[ -e $RUN/main-site/${p##*/} ]] || ln -s "$p" "$RUN/main-site/" ;;
    esac
  done
done
# The tree as git sees it (tracked files and untracked ones it does not ignore), links as links.
git ls-files -z -c -o --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null |
  tar -C "$RUN/tree" -xf - || { echo "check_install: cannot copy the tree" >&2; exit 1; }

cat >"$RUN/bin/g++" <<'EOF'
#!/usr/bin/env bash
# c++ with a cache of object files for this run: the key is the compile command less its output
# paths, with this run's own folders (copies, venvs) dropped, and the source's content.
set -euo pipefail
args=("$@") out="" dep="" src="" key=()
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    -o) out=${args[++i]} ;;
    -MF) dep=${args[++i]} ;;
    *.cpp | *.cc | *.cu) src=${args[i]}; key+=("$src") ;;
    *) key+=("${args[i]}") ;;
  esac
done
[[ -n $out && -n $src && " ${args[*]} " == *" -c "* ]] || exec "$TT_CHECK_CXX" "$@"
k=$({ printf '%s\n' "${key[@]}" | sed "s#$TT_CHECK_RUN/[^/]*#@#g"; cat "$src"; } | sha256sum | cut -c1-32)
if [[ -f $TT_CHECK_RUN/obj/$k.o ]]; then
  cp "$TT_CHECK_RUN/obj/$k.o" "$out"
  [[ -z $dep ]] || printf '%s: %s\n' "$out" "$src" >"$dep"
  exit 0
fi
"$TT_CHECK_CXX" "$@"
cp "$out" "$TT_CHECK_RUN/obj/$k.o.$$" && mv "$TT_CHECK_RUN/obj/$k.o.$$" "$TT_CHECK_RUN/obj/$k.o"
EOF
chmod +x "$RUN/bin/g++"
TORCH=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))') || exit 1
export TT_CHECK_RUN=$RUN TT_CHECK_CXX=${CXX:-c++} CXX=$RUN/bin/g++ TT_BUILD_CUDA=0
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# What a route's import must show: tt_kernels and tt_kernels.triton_kernels from WHERE, the
# subpackage's modules, the compiled op; with NOTOP, no top-level triton_kernels from WHERE or the
# copy.
cat >"$RUN/import_check.py" <<'EOF'
import importlib.util, os, sys
import torch
import tt_kernels
import tt_kernels.triton_kernels as tk

where, copy, notop = sys.argv[1], sys.argv[2], sys.argv[3] == "notop"
real = lambda p: os.path.realpath(p)
for mod in (tt_kernels, tk):
    assert real(mod.__file__).startswith(real(where) + os.sep), (mod.__name__, mod.__file__, where)
missing = [op for op in tk.OPS if importlib.util.find_spec(f"tt_kernels.triton_kernels.{op}") is None]
assert not missing, f"tt_kernels.triton_kernels lacks {missing}"
top = importlib.util.find_spec("triton_kernels")
if notop and top is not None:
    assert not any(real(top.origin).startswith(real(d) + os.sep) for d in (where, copy)), \
        f"our triton_kernels is importable as a top-level package: {top.origin}"
x, metric, size = torch.randn(2, 17, 8), torch.randn(2, 17, 4), torch.ones(2, 17)
x_out, size_out, dst, weight = torch.ops.tt.transform(x, size, metric, None, 4, "spread")
assert x_out.shape == (2, 13, 8) and torch.allclose(size_out.sum(1), size.sum(1))
print(f"import ok: {os.path.dirname(tt_kernels.__file__)}, {os.path.dirname(tk.__file__)}; "
      f"top-level triton_kernels: {top.origin if top else 'none'}")
EOF
# What the wheel must hold: the subpackage's files as in triton_kernels/, no links, nothing
# top-level but tt_kernels and its dist-info.
cat >"$RUN/wheel_check.py" <<'EOF'
import glob, os, stat, sys, zipfile
whl, tree = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(whl)
names = z.namelist()
links = [i.filename for i in z.infolist() if stat.S_ISLNK(i.external_attr >> 16)]
assert not links, f"links in the wheel: {links}"
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
assert tops == {"tt_kernels"}, f"top-level entries: {tops}"
want = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tree, "triton_kernels", "*.py")))
have = sorted(n.split("/")[-1] for n in names if n.startswith("tt_kernels/triton_kernels/"))
assert have == want, f"tt_kernels/triton_kernels in the wheel: {have}, in the tree: {want}"
for f in want:
    assert z.read(f"tt_kernels/triton_kernels/{f}") == open(os.path.join(tree, "triton_kernels", f), "rb").read(), f
assert any(n.startswith("tt_kernels/_C") and n.endswith(".so") for n in names), "no tt_kernels/_C*.so"
print(f"wheel ok: {len(names)} files, no links, tt_kernels/triton_kernels/ = triton_kernels/*.py ({len(have)})")
EOF

declare -a RESULTS=()
FAILED=0
# cell TOOLCHAIN ROUTE STATUS SECONDS DETAIL
cell() {
  RESULTS+=("$(printf '%-10s %-9s %-5s %4ss  %s' "$1" "$2" "$3" "$4" "$5")")
  echo "[check_install +$(($(date +%s) - T0))s] $1 $2: $3 ($4s) $5"
  if [[ $3 == FAIL ]]; then
    FAILED=1
    tail -n 25 "$RUN/logs/$1-$2.log" | sed 's/^/    | /'
  fi
}
# run LOG CMD...: CMD's output appended to LOG
run() { local log=$1; shift; echo "\$ $*" >>"$log"; "$@" >>"$log" 2>&1; }

toolchain() {  # NAME: makes $RUN/venv-NAME; prints nothing, fails when it cannot
  local v=$RUN/venv-$1 log=$RUN/logs/$1-venv.log purelib
  run "$log" "$PY" -m venv "$v" || return 1
  purelib=$("$v/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$RUN/main-site" >"$purelib/_tt_check_main_site.pth"
  case $1 in
    old) run "$log" "$v/bin/python" -m pip install "pip==23.2.1" "setuptools==65.5.0" &&
      run "$log" "$v/bin/python" -m pip uninstall -y wheel ;;
    old+wheel) run "$log" "$v/bin/python" -m pip install "pip==23.2.1" "setuptools==65.5.0" wheel ;;
    new) # the newest setuptools that this torch allows (torch 2.11 pins setuptools<82)
      run "$log" "$v/bin/python" -m pip install -U pip setuptools "torch==$TORCH" &&
      run "$log" "$v/bin/python" -m pip uninstall -y wheel ;;
    *) echo "unknown toolchain $1 (old, old+wheel, new)" >>"$log"; return 1 ;;
  esac || return 1
  "$v/bin/python" -c 'import importlib.util as u; wheel = u.find_spec("wheel")  # before setuptools >= 71 adds its own
import setuptools, pip; print(f"pip {pip.__version__}, setuptools {setuptools.__version__}, wheel", "yes" if wheel else "no")'
}

for tc in "${TOOLCHAINS[@]}"; do
  start=$(date +%s)
  if ! versions=$(toolchain "$tc" 2>>"$RUN/logs/$tc-venv.log"); then
    cell "$tc" venv FAIL $(($(date +%s) - start)) "cannot make the toolchain (PyPI?)"
    continue
  fi
  cell "$tc" venv PASS $(($(date +%s) - start)) "$versions"
  vpy=$RUN/venv-$tc/bin/python
  purelib=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for route in wheel editable inplace develop isolated; do
    start=$(date +%s)
    src=$RUN/src-$tc-$route log=$RUN/logs/$tc-$route.log
    cp -a "$RUN/tree" "$src"
    run "$log" "$vpy" -m pip uninstall -y tt_kernels
    ok=0 expect_wheel_refusal=0
    [[ $tc == old && ($route == wheel || $route == editable) ]] && expect_wheel_refusal=1
    case $route in
      wheel)
        (cd "$src" && run "$log" "$vpy" -m pip wheel --no-build-isolation --no-deps -w "$RUN/wheels-$tc" .) &&
          run "$log" "$vpy" "$RUN/wheel_check.py" "$(ls "$RUN/wheels-$tc"/tt_kernels-*.whl)" "$src" &&
          run "$log" "$vpy" -m pip install --no-deps "$(ls "$RUN/wheels-$tc"/tt_kernels-*.whl)" &&
          (cd "$RUN" && run "$log" "$vpy" "$RUN/import_check.py" "$purelib" "$src" notop) && ok=1 ;;
      editable)
        (cd "$src" && run "$log" "$vpy" -m pip install --no-build-isolation --no-deps -e .) &&
          (cd "$RUN" && run "$log" "$vpy" "$RUN/import_check.py" "$src" "$src" notop) && ok=1 ;;
      inplace)
        (cd "$src" && run "$log" "$vpy" setup.py build_ext --inplace) &&
          (cd "$RUN" && PYTHONPATH=$src run "$log" "$vpy" "$RUN/import_check.py" "$src" "$src" top) && ok=1 ;;
      develop)
        if [[ $tc == new ]]; then
          (cd "$src" && run "$log" "$vpy" setup.py develop --no-deps)
          if grep -q "compiles against the installed torch" "$log"; then
            cell "$tc" "$route" PASS $(($(date +%s) - start)) "refused with setup.py's message (setuptools runs pip with build isolation)"
          else
            cell "$tc" "$route" FAIL $(($(date +%s) - start)) "expected setup.py's message (build isolation)"
          fi
          continue
        fi
        (cd "$src" && run "$log" "$vpy" setup.py develop --no-deps) &&
          (cd "$RUN" && run "$log" "$vpy" "$RUN/import_check.py" "$src" "$src" top) && ok=1 ;;
      isolated)
        if (cd "$src" && run "$log" "$vpy" -m pip install --no-deps .); then
          cell "$tc" "$route" FAIL $(($(date +%s) - start)) "an isolated build succeeded: it cannot have used this torch"
        elif grep -q "compiles against the installed torch" "$log"; then
          cell "$tc" "$route" PASS $(($(date +%s) - start)) "refused with setup.py's message (torch hidden)"
        else
          cell "$tc" "$route" FAIL $(($(date +%s) - start)) "failed without setup.py's message"
        fi
        continue ;;
    esac
    secs=$(($(date +%s) - start))
    if ((expect_wheel_refusal)); then
      if ((ok == 0)) && grep -q 'only with the `wheel` package' "$log"; then
        cell "$tc" "$route" PASS "$secs" "refused with setup.py's message: needs wheel or setuptools>=70.1"
      else
        cell "$tc" "$route" FAIL "$secs" "expected setup.py's refusal (no wheel, setuptools<70.1)"
      fi
    elif ((ok)); then
      cell "$tc" "$route" PASS "$secs" "$(grep -h '^\(wheel ok\|import ok\)' "$log" | sed "s#$RUN/##g" | tr '\n' ' ')"
    else
      cell "$tc" "$route" FAIL "$secs" "see the log"
    fi
  done
done

echo
echo "check_install: $(($(date +%s) - T0))s"
printf '%s\n' "${RESULTS[@]}"
if ((FAILED)); then
  echo "RESULT: FAILED"
  exit 1
fi
echo "RESULT: every cell as expected"
