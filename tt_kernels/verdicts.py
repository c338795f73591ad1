"""Which GPU backends are verified on this machine, and on what evidence.

A GPU backend becomes the default for CUDA tensors only once it has agreed with the reference on
the GPU it runs on. Two kinds of evidence count: a pass on the project's own GPU run, committed in
VERIFIED_ON_GPU, and a pass of ``python -m tt_kernels.selftest`` on this machine, recorded in a cache file
under the GPU's fingerprint (device, compute capability, driver, torch, Triton and this build's
id). A change of any of these needs a new self-test. A local verdict overrides the committed one, so
a failing self-test keeps the reference even where our run passed.
"""
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import torch

BACKENDS = ("cuda", "triton")
# The project's own GPU runs that verified a backend (every GPU test, memcheck and racecheck passed):
# the card, date, commit and result file in bench/results/. None yet.
VERIFIED_ON_GPU = {"cuda": None, "triton": None}
PACKAGE = Path(__file__).resolve().parent


def cache_file():
    """$TT_KERNELS_CACHE_DIR, else $XDG_CACHE_HOME/tt_kernels, else ~/.cache/tt_kernels."""
    folder = os.environ.get("TT_KERNELS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "tt_kernels")
    return Path(folder) / "selftest.json"


@functools.cache
def build_id():
    """A digest of what runs on the GPU: the compiled extension and the Triton kernels' source."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.glob("_C*.so")) + sorted((PACKAGE / "triton_kernels").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _driver():
    """The CUDA driver's version, as cuDriverGetVersion reports it ("13.0"), or "unknown"."""
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        pass
    return "unknown"


def fingerprint(device):
    """What a verdict holds for: the GPU and the software that runs on it."""
    from . import triton_kernels

    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device": torch.cuda.get_device_name(index),
            "capability": "%d.%d" % torch.cuda.get_device_capability(index),
            "driver": _driver(), "torch": torch.__version__,
            "triton": triton_kernels.triton_version(), "build": build_id()}


def _load(path):
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return records if isinstance(records, list) else []


def record(fingerprint, results, path=None):
    """Stores {backend: {"passed": bool, ...}} for `fingerprint` (a backend's older verdict on the
    same fingerprint is replaced, the others' kept) and forgets the verdicts read so far."""
    path = path or cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # self-tests of two backends may finish together
        records = _load(path)
        mine = next((r for r in records if r.get("fingerprint") == fingerprint), None)
        if mine is None:
            mine = {"fingerprint": fingerprint, "results": {}}
            records.append(mine)
        mine["results"].update({name: dict(r, time=stamp) for name, r in results.items()})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)  # atomic: a reader sees the old file or the new one
    verdict.cache_clear()
    return path


@functools.cache
def verdict(backend, device_index):
    """(verified, evidence) of `backend` on the CUDA device `device_index`."""
    device = torch.device("cuda", device_index)
    mine = fingerprint(device)
    path = cache_file()
    for r in _load(path):
        if r.get("fingerprint") == mine and backend in r.get("results", {}):
            mine = r["results"][backend]
            passed = bool(mine.get("passed"))
            return passed, (f"self-test {'passed' if passed else 'FAILED'} on this GPU at "
                            f"{mine.get('time')} ({path})")
    if VERIFIED_ON_GPU[backend]:
        return True, f"the project's GPU run: {VERIFIED_ON_GPU[backend]}"
    return False, "not verified on this GPU: run python -m tt_kernels.selftest"


def evidence(backend, device):
    """(verified, evidence) of `backend` on `device`; without a visible GPU, the committed run's."""
    if not torch.cuda.is_available():
        run = VERIFIED_ON_GPU[backend]
        return bool(run), f"the project's GPU run: {run}" if run else "not verified on a GPU"
    return verdict(backend, device.index if device.index is not None
                   else torch.cuda.current_device())
