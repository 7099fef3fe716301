"""Keep large CPU tensors cheap to allocate: glibc's malloc settings for a process that runs SegFormer.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block above its mmap threshold
(dynamic, 128 KiB rising to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when the
tensor dies, and it hands the free top of its heap back to the kernel once that exceeds twice the threshold.
Either way the next forward pass touches brand-new pages: a page fault and 4 KiB of zeroing each. A b0 forward
at batch 8, 512×512, took ~150,000 page faults per call that way (``getrusage``'s ``ru_minflt``, with the
model's CPU chunking, see ``SegformerForSemanticSegmentation._cpu_chunk``) and none with these settings:

- ``M_MMAP_THRESHOLD`` = 32 MiB, the most glibc allows: blocks up to that size come from the heap, where
  freed memory is reused (glibc reaches the same value by itself, but only after freeing such a block);
- ``M_TRIM_THRESHOLD`` = 256 MiB: up to that much free heap top stays with the process between passes;
- ``M_ARENA_MAX`` = 1: threads created later (a server's inference worker, a data-loader thread) share the
  main heap instead of arenas of their own that start from nothing.

The cost: up to 256 MiB of freed memory stays with the process for reuse (measured: peak RSS 482 → 499 MB for
b0 at batch 8). Blocks above 32 MiB (the activations of a 1024×2048 image) still come and go as mappings: a
larger threshold would reuse them too, but glibc refuses one, and with ``posix_memalign`` (PyTorch's call)
heap blocks that large fragment badly (a loop of 256 MiB tensors grew to 2.3 GB resident). ``segformer``
commands call :func:`tune_allocator` at start-up (``SEGFORMER_MALLOC=system`` turns it off); a program of your
own can call it once, early, before it starts threads. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "SEGFORMER_MALLOC"  # "system": leave the C library's defaults alone
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems: mallopt refuses more
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (glibc's malloc.h)

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings above once per process; True when they are in effect (glibc, not turned off by
    ``SEGFORMER_MALLOC=system``). Safe to call more than once and from any layer; never raises."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV, "").strip().lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, 1))
        _tuned = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
    except (OSError, AttributeError):  # no loadable C library, or one without mallopt
        _tuned = False
    return _tuned
