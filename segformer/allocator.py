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

One block above the threshold is unavoidable: the logits of a batch (b0 at batch 8, 512×512, 150 labels: 79 MB,
19,200 fresh pages, ~15 ms per call). :class:`ReusableBuffer` keeps such an output once it is handed out and
hands the same memory out again when nobody holds any tensor or storage of it any more; with any reference
left (the logits themselves, a view, a NumPy array or DLPack capsule of them, their storage) a new block is
allocated and the old one is left to its holder. It keeps at most one block of up to ``TRIM_THRESHOLD``
bytes (the memory a tuned heap keeps anyway) and is off with ``SEGFORMER_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import sys
import threading

import torch

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


class ReusableBuffer:
    """A large CPU output tensor allocated once and handed out again while nobody else holds it (see the module
    docstring). ``empty(shape, dtype)`` returns an uninitialised contiguous tensor: the kept block when it is
    free and exactly that size and dtype, else a new block (which is then the kept one). Outputs below glibc's
    mmap threshold (its heap reuses them), above ``TRIM_THRESHOLD``, or with ``SEGFORMER_MALLOC=system`` are
    plain ``torch.empty``. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block: torch.Tensor | None = None  # the kept block, 1-D; handed out as views
        self._storage: torch.UntypedStorage | None = None  # its storage object, held to count others' references
        self._idle: tuple[int, int] = (0, 0)  # (storage use count, Python references) with no holder but us

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if not (MMAP_THRESHOLD <= nbytes <= TRIM_THRESHOLD) or os.environ.get(ENV, "").strip().lower() == "system":
            return torch.empty(shape, dtype=dtype)
        if not hasattr(torch._C, "_storage_Use_Count"):  # the count of tensors on a storage (a private call)
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            block = self._block
            if block is None or block.dtype != dtype or block.numel() != numel or not self._free():
                block = torch.empty(numel, dtype=dtype)
                self._block, self._storage = block, block.untyped_storage()
                self._idle = self._counts()
            return block.view(shape)

    def __reduce__(self) -> tuple:  # a copied or pickled model starts with no block of its own (and a new lock)
        return (ReusableBuffer, ())

    def _counts(self) -> tuple[int, int]:
        assert self._storage is not None
        return torch._C._storage_Use_Count(self._storage._cdata), sys.getrefcount(self._storage)

    def _free(self) -> bool:
        """No tensor but the kept block on the storage (views, NumPy arrays and DLPack capsules hold a tensor of
        their own) and no Python reference to the storage object but ours."""
        return self._counts() == self._idle
