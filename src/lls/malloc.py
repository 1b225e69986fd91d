"""Keep freed tensor memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``. glibc
serves large blocks with ``mmap`` and returns them on ``free``, so each training step faults its
whole working set back in page by page (measured: 440,000 page faults per VGG8 step at batch 128,
8,500 per SmallConv step). Disabling ``mmap`` for allocations and trimming keeps the freed blocks
on the heap for the next step, like a caching allocator: 0 to 8,000 faults per step, 25-30 % less
step time for every rule (numbers in docs/cost.md). The price is that the process keeps its peak
heap (resident memory stays at the high-water mark of the run).

``lls`` commands call :func:`tune_malloc` at start; set ``LLS_MALLOC=default`` to keep glibc's
defaults. Library users can call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 40  # never trim the heap


def tune_malloc() -> bool:
    """Ask glibc to keep freed memory for reuse; returns whether the settings were applied."""
    if os.environ.get("LLS_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trimmed = mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(KEEP_FREED_BYTES, 2**31 - 1)).value)
    no_mmap = mallopt(M_MMAP_MAX, 0)
    return bool(trimmed and no_mmap)
