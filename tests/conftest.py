"""Shared helpers of the tt_kernels tests: the backends under test (the `tt` fixture), inputs that
look like ViT tokens, and tolerances."""
import atexit
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter, which must be on
# before any @triton.jit module is imported (the `tt` fixture's "triton" backend relies on it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tt_kernels
from tt_kernels.measure import vit_tokens
from tt_kernels.ops import ops
from tt_kernels.rules import OPS
from tt_kernels.verify import (U32, apply_magnitude, cls_attention_tol, cosine_error,  # noqa: F401
                               sum_tol, unit_roundoff, weight_tol, x_tol)

# The tests that run something on a CUDA device when there is one get the `gpu` marker: the GPU
# run selects them (`pytest -m gpu`, scripts/gpu_check.sh) and leaves the rest (CPU kernels, the
# host build of the CUDA code, ptxas, argument checks) to CI, which runs every test without a GPU,
# these included (they skip there or run on CPU tensors). Three ways a test runs on CUDA:
GPU_PARAMS = {"tt": {"cuda", "triton"}, "device": {"cuda"}}  # a parameter (or parametrized
# fixture) of one of these values
GPU_MODULES = {"test_cuda_stream.py"}  # every test: tensors on the module's DEVICE
GPU_TESTS = {"test_api.py": {"test_triton_backend_has_the_gradients_of_the_ops"},
             "test_bad_input.py": {"test_op_rejects_device_mix"}}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device when one is present (the GPU "
                                       "run's selection: pytest -m gpu)")
    config.addinivalue_line("markers", "slow: compiles for long (Triton kernels at N >= 577)")
    config.addinivalue_line("markers", "triton: runs the Triton kernels as the `tt` backend")
    config.addinivalue_line("markers", "interpreted: a case the `tt` fixture's Triton backend "
                                       "runs (the others are deselected for it: the interpreter "
                                       "is slow, and on a GPU each variant compiles within the "
                                       "GPU check's few minutes; the self-test covers Triton at "
                                       "the models' shapes)")


def pytest_collection_modifyitems(config, items):
    interpreter_skips = []
    for item in items:
        module = item.path.name
        params = getattr(getattr(item, "callspec", None), "params", {})
        named = GPU_TESTS.get(module, ())
        for name in named:  # a renamed test would silently leave the GPU run
            if not hasattr(item.module, name):
                raise pytest.UsageError(f"tests/conftest.py GPU_TESTS names {module}::{name}, "
                                        f"which does not exist")
        if module in GPU_MODULES or item.originalname in named or any(
                params.get(name) in values for name, values in GPU_PARAMS.items()):
            item.add_marker(pytest.mark.gpu)
        if params.get("tt") == "triton":
            item.add_marker(pytest.mark.triton)
            if item.get_closest_marker("interpreted") is None:
                interpreter_skips.append(item)
    if interpreter_skips:
        config.hook.pytest_deselected(items=interpreter_skips)
        left_out = set(map(id, interpreter_skips))
        items[:] = [item for item in items if id(item) not in left_out]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances are bounds from the arithmetic, never what one machine printed: tt_kernels.verify
# derives them (and judges near ties), for the tests, the benchmarks and the self-test alike.
# make_tokens' inputs: D = 16, C = 24, sizes in [1, 4], N <= 257, tau = 0.1.
WEIGHT_TOL = weight_tol()
SIZE_TOL = sum_tol(257)


def construction_kwargs(method, k=1, alpha=0.0, targets="all", tau=0.1, cost="cosine"):
    """The keyword arguments of a construction; only spread takes k/alpha/targets/tau/cost."""
    if method != "spread":
        return {}
    return dict(k=k, tau=tau, alpha=alpha, targets=targets, cost=cost)


def r_for(kind, method, n, prefix, alpha=0.0):
    """r from 0, 1 or "max" (the largest r the construction accepts, from tt_kernels.max_r)."""
    r_max = tt_kernels.max_r(method, n, prefix, by_importance=method == "spread" and alpha == 1)
    return min(kind, r_max) if kind != "max" else r_max


# x, metric, size, score that look like ViT tokens (with exact duplicates on request): written once,
# for the tests, the benchmarks and the self-test alike.
make_tokens = vit_tokens


def non_contiguous(t, kind="sliced"):
    """The same values as `t` in a non-contiguous view: "sliced" takes every other element of a
    wider tensor (falling back to "transposed" when the last dimension has size 1), "transposed"
    views a copy with the first two dimensions swapped."""
    view = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0] if kind == "sliced" else t
    if view.is_contiguous() and t.dim() >= 2:
        view = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(view, t)
    return view


def _build_cuda_kernels_on_host():
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    sources = sorted(str(p) for p in (here / "cuda_on_host").glob("*.cpp"))
    # A folder of this run's own: torch's shared cache (~/.cache/torch_extensions) is keyed by name
    # only, and a run killed while building there leaves a lock that every later run waits on.
    build = tempfile.mkdtemp(prefix="tt_cuda_on_host-")
    atexit.register(shutil.rmtree, build, ignore_errors=True)
    # threaded_exec.h needs C++20 (std::barrier, std::atomic_ref); torch 2.11's loader asks for
    # C++17, 2.14's for C++20, and the last -std flag wins.
    load(name="tt_cuda_on_host", sources=sources, build_directory=build,
         extra_include_paths=[str(here.parent / "csrc"), str(here / "cuda_on_host")],
         extra_cflags=["-O2", "-std=c++20"], is_python_module=False)


@functools.cache
def _cuda_kernels_on_host_build():
    """The build's outcome, failure included, so a broken build fails every test at once instead
    of being retried by each."""
    try:
        _build_cuda_kernels_on_host()
        return None
    except Exception as error:  # noqa: BLE001  (re-raised by every caller)
        return error


def cuda_kernels_on_host():
    """Builds tests/cuda_on_host (the CUDA kernels' per-image code with host executors) once per
    run and returns torch.ops.tt_host. About 30 s on 2 cores."""
    error = _cuda_kernels_on_host_build()
    if error is not None:
        raise RuntimeError("building tests/cuda_on_host failed (see the first failure)") from error
    return torch.ops.tt_host


def host_ops(rows=32, stage=True, packed=True, threads=0, key_parts=0):
    """The CUDA kernels' per-image code run on the CPU (tests/cuda_on_host) with torch.ops.tt's
    signatures and argument checks, under a plan: affinity rows per chunk, metric staged in shared
    memory, 16-byte packs, threads (0: serial, else a block of host threads), and the removal keys
    from key_parts blocks an image first (0: in the image's own block), as small batches run."""
    host = cuda_kernels_on_host()

    def transform(x, size, metric, score=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
                  targets="all", prefix=1, mode="mean", cost="cosine"):
        args = (r, method, k, tau, alpha, targets, prefix, mode, cost)
        ops.check_transform(x, size, metric, score, *args)
        return tuple(host.transform(x, size, metric, score, *args, rows, stage, packed, threads,
                                    0, key_parts))

    def match(metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
              targets="all", prefix=1, cost="cosine"):
        args = (r, method, k, tau, alpha, targets, prefix)
        ops.check_match(metric, score, size, *args, cost)
        if size is None:
            size = torch.ones((metric if metric is not None else score).shape[:2])
        out = host.transform(None, size, metric, score, *args, "mean", cost, rows, stage, packed,
                             threads, 0, key_parts)
        return out[2], out[3]

    def apply(x, size, dst, weight, n_out, mode="mean"):
        ops.check_apply(x, size, dst, weight, n_out, mode)
        return tuple(host.apply(x, size, dst, weight, n_out, mode, rows, packed, threads))

    def untransform(y, dst, weight):
        ops.check_untransform(y, dst, weight)
        return host.untransform(y, dst, weight, rows, packed, threads)

    def cls_attention(q, k, size=None, scale=None):
        ops.check_cls_attention(q, k, size, scale)
        return host.cls_attention(q, k, size, k.shape[-1] ** -0.5 if scale is None else scale,
                                  threads)

    return SimpleNamespace(match=match, transform=transform, apply=apply, untransform=untransform,
                           cls_attention=cls_attention)


# --- the backends under test -----------------------------------------------------------------
# The `tt` fixture: every backend with torch.ops.tt's signatures, called on the same CPU inputs.
#   cpu                 the C++ CPU kernels
#   cuda                the CUDA kernels, on a GPU (skipped without one)
#   triton              the Triton kernels: on a GPU, or else interpreted on CPU tensors; only the
#                       cases marked `interpreted`
#   cuda-on-host[-...]  the CUDA kernels' per-image code (csrc/cuda/*_image.cuh) run on the CPU by
#                       tests/cuda_on_host, under each plan a launch may choose: affinity rows per
#                       chunk (and output rows per block of apply/untransform), metric staged in
#                       shared memory or read in place, 16-byte packs or element by element; and
#                       either serially or by a block of 64 host threads with CUDA's semantics.

# (rows per chunk or block, metric staged, 16-byte packs, threads: 0 serial, else a block of host
# threads with 32-lane warps, removal keys from that many blocks an image first: 0 none) of each
# host run of the CUDA code.
HOST_PLANS = {"cuda-on-host": (32, True, True, 0, 0), "cuda-on-host-rows3": (3, False, False, 0, 0),
              "cuda-on-host-rows1": (1, True, True, 0, 0),
              "cuda-on-host-threads": (8, True, True, 64, 0),
              "cuda-on-host-keys3": (8, True, True, 64, 3)}
BACKENDS = ["cpu", "cuda", "triton", *HOST_PLANS]


def _to_cuda(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def _on_cuda(fn):
    """fn on CUDA copies of its tensor arguments, with its outputs back on the CPU."""
    def run(*args, **kwargs):
        out = fn(*map(_to_cuda, args), **{k: _to_cuda(v) for k, v in kwargs.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return run


@pytest.fixture(params=BACKENDS)
def tt(request):
    """The backend under test, with torch.ops.tt's signatures."""
    if request.param == "cpu":
        return ops
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return SimpleNamespace(**{op: _on_cuda(getattr(ops, op)) for op in OPS})
    if request.param == "triton":
        triton = tt_kernels.triton_kernels
        if triton.triton_version() is None:
            pytest.skip("needs Triton")
        if torch.cuda.is_available():
            return SimpleNamespace(**{op: _on_cuda(triton.kernel(op)) for op in OPS})
        if not triton.interpreted():
            pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
        return SimpleNamespace(**{op: triton.kernel(op) for op in OPS})
    return host_ops(*HOST_PLANS[request.param])


@pytest.fixture(scope="session")
def photos_installed():
    """Skips unless the packages that ship the photos (tt_kernels.data) are installed."""
    for package in ("skimage", "foolbox"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
