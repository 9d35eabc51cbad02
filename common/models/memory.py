"""Keep a training process's resident memory near what it actually uses.

glibc raises its mmap threshold after large blocks are freed, so later activation buffers
(tens of MB each) come from the heap and stay mapped when freed: a causal-LM client measured
4.7 GiB peak where its tensors never exceed 2.9 GiB (benchmarks/causal_lm_memory.py). Fixing the
threshold serves blocks above it with mmap and returns them to the OS on free (what
MALLOC_MMAP_THRESHOLD_ does, set from inside the process so simulation actors and SuperNode apps
get it too). At 4 MiB the activation buffers still go back; below that every block is an mmap and
its page faults: a SmolLM2-135M DP step (batch 8 x 128, 2 threads) took 8.89 s fp32 and 6.73 s
bf16 at 64 KiB, 5.64 s and 3.29 s at 4 MiB, 6.10 s and 3.85 s at glibc's default, for peaks of
1.94/1.40, 2.51/1.66 and 2.86/1.93 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD_BYTES = 4 * 1024 * 1024


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
