"""tt_kernels.machine: what a result records about the CPU it ran on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tt_kernels import machine


def test_the_cpu_identity_names_the_instruction_set_aten_runs():
    """ATEN_CPU_CAPABILITY lowers the kernels' instruction set for a process: the record says
    the one that ran, not what the CPU could run."""
    code = "from tt_kernels.machine import cpu_identity; print(cpu_identity()['aten_capability'])"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-1] == "DEFAULT"


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/cache").is_dir(),
                    reason="the caches are read from Linux's /sys")
def test_the_cpu_identity_has_every_cache_linux_lists():
    listed = list(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    identity = machine.cpu_identity()
    caches = {key: size for key, size in identity.items() if key.startswith("L")}
    assert len(caches) == len(listed) and all(size[:-1].isdigit() for size in caches.values())
    assert "cpu_identity" in machine.machine_info()
