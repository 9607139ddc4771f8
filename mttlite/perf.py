"""CPU allocator tuning: stop paying page faults for every large tensor.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. An activation of the reference student
(100 images × 128 channels × 32 × 32 floats = 52 MB) is such a block, and one student step
allocates dozens of them: each one is new memory that the kernel must fault in and zero, page by
page. Measured on 2 CPU cores (``benchmarks/iteration_speed.py``), that costs about a third of
an iteration.

:func:`keep_freed_memory` tells glibc to serve large blocks from its heap and not to return freed
memory to the system, so the next step mostly reuses pages that are already mapped (not always:
the heap still grows now and then; ``tests/test_perf.py`` counts 3–8× fewer page faults). The same
effect as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…`` in the environment. The trade-off: the
process keeps its peak memory until it exits, and fragments more (vmap-parallel experts ran out of
memory with it, see ``docs/performance.md``). Nothing changes numerically.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (Linux/glibc only); returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1  # no mmap for large blocks: they come from the heap
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never shrink the heap (≈ 2 GiB threshold: the int maximum)
    return bool(ok)
