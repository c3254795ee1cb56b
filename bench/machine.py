"""The machine a benchmark ran on, recorded beside its results."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def commit_of(root: str = ROOT) -> str | None:
    """The checkout's commit (short hash), '+' when its tracked files differ from it; None outside git
    (or without git)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not head:
            return None
        return head + ("+" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")
    except OSError:
        return None
