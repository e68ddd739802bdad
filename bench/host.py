"""Facts about the host a benchmark records beside its numbers. Standard library only, and nothing else of the
repository: the one module of bench/ that scripts/ may import (scripts/train_demo.py records cpu_name())."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def is_amd() -> bool:
    return "AuthenticAMD" in _cpuinfo()[:4096]


def mkl_for_amd() -> None:
    """MKL's AVX2 kernels on AMD, as `python -m service` sets them: call before the first Paddle import."""
    if is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def loadavg() -> str:
    """The 1-minute load average, as printed beside a timing."""
    return f"{os.getloadavg()[0]:.2f}"
