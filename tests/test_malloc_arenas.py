"""The executor caps glibc's malloc arenas (--malloc-arenas, default 1) before its threads start, so
a rank's compute thread and gloo's threads share one heap: with an arena per thread, peak RSS of the
same run jumped by 100-330 MiB in some runs (executor.metrics.limit_malloc_arenas)."""
import platform
import subprocess
import sys
import textwrap

import pytest

from compiler import build_spec, compile_plan, resolve_model
from ir import save

GLIBC = platform.libc_ver()[0] == "glibc"

# a new thread's first malloc (64 KiB: below the mmap threshold, so from an arena); glibc's
# malloc_stats then lists every arena on the process's stderr
PROBE = textwrap.dedent("""
    import ctypes, sys, threading
    from executor.metrics import limit_malloc_arenas
    print(limit_malloc_arenas(int(sys.argv[1])), flush=True)
    keep = []
    t = threading.Thread(target=lambda: keep.append(bytearray(65536)))
    t.start()
    t.join()
    ctypes.CDLL(None).malloc_stats()
""")


def arenas(n: int) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, str(n)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt; elsewhere the option does nothing")
def test_one_arena_for_the_threads_started_after_the_cap():
    said, stats = arenas(1)
    assert said == "True" and "Arena 0:" in stats and "Arena 1:" not in stats
    said, stats = arenas(0)  # the C library's default: the new thread gets an arena of its own
    assert said == "False" and "Arena 1:" in stats


def test_the_executor_caps_the_arenas_it_is_told(tmp_path, monkeypatch):
    from executor import cli, metrics

    plan = compile_plan(build_spec("1f1b", resolve_model("tiny"), pp=2, microbatches=2, slices=1, virtual_stages=1,
                                   seq_len=32))
    path = str(tmp_path / "plan.json")
    save(plan, path)
    told = []
    monkeypatch.setattr(metrics, "limit_malloc_arenas", told.append)
    for extra, want in (([], 1), (["--malloc-arenas", "3"], 3), (["--malloc-arenas", "0"], 0)):
        assert cli.main([path, "--local", "--quiet", "--steps", "1", *extra]) == 0
        assert told.pop() == want and not told
