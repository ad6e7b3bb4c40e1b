"""Opt-in C heap settings for a batch-1 scoring process: its resident peak close to its tensors.

torch takes CPU tensors from the C library's malloc. glibc serves a block below its mmap
threshold from a heap it keeps (a freed block is reused, not handed back) and a larger one
straight from the kernel (handed back when freed). By default that threshold adapts: it rises
to the largest block freed so far, up to 32 MiB, so after one image nearly every tensor of the
fast path comes from the heap, whose high-water mark then depends on where blocks happened to
be placed. For the paper configuration at batch 1 (VGG19-12, int8 head, 256 px, 2 threads) the
live tensors peak at about 41 MB while identical processes' anonymous peaks spread over 69-82
MB (ad hoc, `benchmarks/speed.py`'s sampled child, 2-core dev machine).

`bound_heap` fixes the threshold at 2.5 MiB, so every block that large (the pooled features,
the coarse maps, a Winograd layer's scratch) goes to the kernel and back, and only the smaller,
same-sized blocks of stripes, bands and chunks are reused from the heap; and a 64 MiB trim
threshold keeps the heap's free top for the next image instead of handing it back to be faulted
in again (a fixed threshold alone leaves glibc's 128 KiB, which cost 45 ms an image at 2 MiB).
In `benchmarks/speed.py` (BENCHMARKS.md, "Speed and memory") the paper configuration's peak
above the model fell from 67-88 to 56-62 MB (two runs), at 6-17 % more time. Ad-hoc sweeps
(alternating): 2 MiB held 52-62 MB and was about 8 % slower than 2.5 MiB; 4.5 MiB held 61-68
MB at about its speed.

Not the default: the setting is process-wide, and a batched forward's large activations then
fault in fresh pages on every batch (the default mobilenet_v2 model at batch 32: 46 against 29
ms an image, ad hoc), so the scoring job's actors do not apply it. For a process that scores
one image at a time with a large backbone. glibc only: elsewhere it does nothing (False).
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks from this size up come from the kernel; smaller ones from the reused heap.
MMAP_THRESHOLD = 2560 << 10
#: Free memory at the heap's top kept for reuse before it is handed back.
TRIM_THRESHOLD = 64 << 20


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return None  # mallopt's parameters are glibc's own
    return libc


def bound_heap() -> bool:
    """Set this process's malloc thresholds (module docstring). True when they were set (glibc),
    False where the C library is not glibc and nothing changed."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``), so that what a
    build or a warm-up freed is not silently reused by what comes next (a measurement's
    baseline). True when pages were handed back."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "bound_heap", "release_free_heap"]
