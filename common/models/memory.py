"""Keep a training process's resident memory near what it actually uses.

glibc raises its mmap threshold after large blocks are freed, so later activation buffers
(tens of MB each) come from the heap and stay mapped when freed: a causal-LM client measured
4.7 GiB peak where its tensors never exceed 2.9 GiB (benchmarks/causal_lm_memory.py). Fixing the threshold at 64 KiB serves
large blocks with mmap and returns them to the OS on free (what MALLOC_MMAP_THRESHOLD_=65536
does, set from inside the process so simulation actors and SuperNode apps get it too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD_BYTES = 64 * 1024


@functools.cache
def release_freed_memory() -> bool:
    """Apply the fixed mmap threshold once per process; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl or macOS: no mallopt
        return False
