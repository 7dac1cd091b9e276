"""Keeping the streaming conversion's memory flat: freed tensors go back to the system.

glibc serves allocations above its mmap threshold with their own mappings, returned to the system when
freed; but it raises that threshold (up to 32 MB) each time such a block is freed, after which layer-sized
tensors come from the heap, whose freed space it keeps. One layer after another, the heap then holds the
largest few layers' worth of dead tensors: about 120 MB more peak RSS on the benchmark's 12-layer model.
A fixed threshold keeps every large tensor in its own mapping.
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
THRESHOLD_BYTES = 1 << 20


@functools.cache
def return_large_frees() -> bool:
    """Fix glibc's mmap threshold at 1 MB for this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
