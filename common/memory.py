"""Image-sized buffers handed back to the system when they are freed (glibc's malloc).

glibc serves an allocation of at least its mmap threshold (128 KiB) with a mapping of its own,
unmapped when freed, but raises the threshold to the size of each such block freed, up to
32 MiB. After the first few images, a shard member's raw bytes and a decoded image come from the
heap instead, where freed blocks stay behind as fragments the process keeps: in a transform
process over one chunk of 1,000 photographs of 3,000x2,000 (tests/workers/test_photographs.py),
the peak resident memory was 430-505 MiB, and 351-355 MiB with the threshold fixed. Setting the
threshold with mallopt turns the adjustment off. Elsewhere than glibc, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024  # a 224x224 output is 150 KB decoded; raws and photographs far larger


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold for this process and the ones it forks; False where the C
    library is not glibc (or refused)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
