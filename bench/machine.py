"""The machine a benchmark ran on, recorded beside its results."""
from __future__ import annotations

import os
import platform
import sys


def _proc_line(path: str, prefix: str) -> str | None:
    """The first line of /proc file `path` that starts with `prefix`, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            return next((line for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def machine() -> dict:
    cpu = _proc_line("/proc/cpuinfo", "model name")
    mem = _proc_line("/proc/meminfo", "MemTotal")
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"nproc": os.cpu_count(), "cpu": cpu.split(":", 1)[1].strip() if cpu else "unknown",
            "mem_gib": round(int(mem.split()[1]) / 1024 / 1024, 1) if mem else None,
            "python": platform.python_version(), "torch": torch_version, "platform": platform.platform(),
            "executable": sys.executable}
