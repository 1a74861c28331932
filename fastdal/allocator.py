"""Handing the C allocator's free memory back to the system after a pass over a pool.

A pass allocates and frees a few batch-sized tensors per batch. glibc serves allocations below its mmap
threshold from its heap and raises that threshold (up to 32 MiB) each time a larger mapped block is freed,
so after a pass the heap can hold tens of MiB of freed blocks that it neither reuses for anything else nor
returns: the resident set after scoring 300000 samples varied from 10 to 90 MiB over identical runs, all of
it free memory (``malloc_trim`` brought every run back to the 6 MiB of results). Trimming once per pass
costs well under a millisecond next to the pass and leaves the resident set at what the caller holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
