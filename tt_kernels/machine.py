"""What a measurement ran on, recorded beside every benchmark and evaluation result: the machine,
the device and the versions, written once for bench/, the demo and the evaluation."""
import os
import platform
import re
import socket
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_CACHE_KIND = {"Data": "d", "Instruction": "i"}  # L1d, L1i; unified caches: L2, L3


def cpu_identity():
    """What tells two CPUs of one model name apart (a cloud's Xeons all read "Intel(R) Xeon(R)
    Processor", and their speeds differ): family, model and stepping, each cache's size, and the
    instruction set ATen's kernels run (AVX512, AVX2 or DEFAULT: ATEN_CPU_CAPABILITY may lower it).
    Linux's /proc and /sys; what a platform does not expose is left out."""
    identity = {"aten_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("cpu family", "model", "stepping") and key not in identity:
                identity[key] = value
            elif not line.strip() and len(identity) > 1:  # the first processor's block only
                break
    except OSError:
        pass
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip()
                                 for name in ("level", "type", "size"))
        except OSError:
            continue
        identity[f"L{level}{_CACHE_KIND.get(kind, '')}"] = size
    return identity


def git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def machine_info():
    from .backends import build_info
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_identity": cpu_identity(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "tt_kernels_build": build_info(),
        "git": git_state(),
    }


def slug(text):
    """`text` as part of a file name: lower-case letters and digits, runs of others one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def nvidia_smi():
    """nvidia-smi's line on each GPU (name, driver, memory, max clocks, power limit), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device):
    """The device a benchmark runs on: a CUDA GPU's properties, or the CPU's model and threads."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_model(), "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "total_memory_gib": round(p.total_memory / 2**30, 2),
            "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "nvidia_smi": nvidia_smi()}


def versions():
    """Versions of the stack a benchmark ran with (None for what is missing)."""
    from .triton_kernels import triton_version
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "triton": triton_version(),
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import timm
        v["timm"] = timm.__version__
    except ImportError:
        v["timm"] = None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                             timeout=20).stdout
        v["nvcc"] = next((line.strip() for line in out.splitlines() if "release" in line), None)
    except (OSError, subprocess.SubprocessError):
        v["nvcc"] = None
    return v
