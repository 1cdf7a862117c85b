"""The CPU heap policy of a training process: keep freed memory for reuse, as CUDA's allocator does.

A decoder training step on CPU allocates gigabytes of activations and frees them again. With glibc's
default policy every block of 32 MiB and up is its own ``mmap``, so each step page-faults all of
them afresh, one 4 KiB page at a time (on the reference 2-core VM ~10 M faults per official-preset
step at batch 16 for the eager baseline, ~2.5 M for this model, each several microseconds of kernel
time plus host-side stalls), and returns them on free. :func:`retained_heap` switches malloc to
serve every block from a heap it never trims, which is what Intel's PyTorch CPU tuning guide gets by
preloading jemalloc/tcmalloc, done in-process with ``mallopt``: from the second step on a training
loop reuses resident pages. The price is that the process keeps its peak until the block exits.

``orchestrator.trainable`` runs CPU trials inside :func:`retained_heap` (``TrialConfig.cpu_heap``);
``benchmarks`` measures what it buys. Everything here is a no-op returning False where the C library
is not glibc >= 2.33.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterator
from contextlib import contextmanager


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc >= 2.33 (``mallopt``, ``malloc_trim``, ``mallinfo2``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def heap_bytes_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: heap + mmapped chunks).

    Unlike RSS this does not depend on whether freed memory went back to the OS, so it measures a
    step's live memory the same way whatever the allocator keeps. None where glibc is absent.
    """
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def mmapped_bytes() -> int | None:
    """Bytes malloc holds in blocks that have their own ``mmap`` (glibc ``mallinfo2().hblkhd``).

    Under :func:`heap_retention` a new large block comes from the heap and leaves this unchanged;
    under glibc's default it grows by the block's size. None where glibc is absent.
    """
    libc = _glibc()
    return None if libc is None else int(libc.mallinfo2().hblkhd)


def free_heap_bytes() -> int | None:
    """Free bytes malloc holds for reuse (glibc ``mallinfo2().fordblks``), resident or not."""
    libc = _glibc()
    return None if libc is None else int(libc.mallinfo2().fordblks)


# mallopt parameters (malloc.h) and glibc's own steady state for large blocks: blocks from 32 MiB up
# get their own mmap (the dynamic threshold's ceiling on 64-bit), freed heap above 64 MiB is trimmed.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD = 32 * 2**20
_GLIBC_MMAP_MAX = 65536


def glibc_default_heap() -> bool:
    """Pin glibc's steady-state large-block policy (what a long-running process ends up with).

    Every block of 32 MiB and up is its own ``mmap``: each step's large activations are fresh,
    zero-filled pages, page-faulted in one 4 KiB page at a time, and unmapped when freed. This is
    what a PyTorch process runs with unless told otherwise. Returns False where glibc is absent.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD)
    return True


def heap_retention(retain: bool) -> bool:
    """Switch the CPU heap policy: keep freed memory for reuse (True) or glibc's steady state (False).

    Retained: every allocation comes from the heap (``M_MMAP_MAX=0``) and freed memory is never
    given back (``M_TRIM_THRESHOLD`` = SIZE_MAX, passed as -1), so from the second step on a
    training loop reuses resident pages instead of page-faulting gigabytes of fresh ones per step
    (a 4 KiB fault cost ~7 us on the reference VM: ~12 s of system CPU per official-preset step at
    batch 16). It is the CPU analogue of CUDA's caching allocator; the price is that the process
    keeps its peak until :func:`release_heap`. Switching does not release anything. Returns False
    (changing nothing) where glibc is absent.
    """
    libc = _glibc()
    if libc is None:
        return False
    if not retain:
        return glibc_default_heap()
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)
    return True


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a whole range in with one call


def prefault_heap(nbytes: int) -> bool:
    """Make ``nbytes`` of free heap memory resident, as a training loop's first step would.

    With :func:`heap_retention` on, later allocations carve from this memory without page faults,
    so a benchmark reaches a long training loop's steady state without running warm-up steps.
    First the free memory malloc already holds is made resident: :func:`release_heap` (and glibc's
    own trimming) hands free pages inside the heap back to the OS but keeps their address ranges,
    so reusing them page-faults again. It is claimed in 1 MiB blocks, which malloc serves from those
    free ranges before it grows the heap. Then the heap grows by what is still missing. Each block
    is faulted in with one ``MADV_POPULATE_WRITE`` call (about 5x faster than touching it; where
    unsupported it is written). Returns False where glibc is absent or ``nbytes <= 0``.
    """
    libc = _glibc()
    if libc is None or nbytes <= 0:
        return False
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    held = free_heap_bytes() or 0
    small = [libc.malloc(_BLOCK) for _ in range(held // _BLOCK)]
    large = libc.malloc(nbytes - held) if nbytes > held else None
    try:
        for pointer, size in [(b, _BLOCK) for b in small] + [(large, nbytes - held)]:
            if pointer:
                _populate(libc, pointer, size)
    finally:
        for pointer in [*small, large]:
            if pointer:
                libc.free(pointer)
    return True


_BLOCK = 2**20


def _populate(libc: ctypes.CDLL, pointer: int, size: int) -> None:
    """Fault in the whole pages of ``[pointer, pointer + size)`` for writing."""
    page = mmap.PAGESIZE
    start = (pointer + page - 1) // page * page
    end = (pointer + size) // page * page
    if end > start and libc.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        ctypes.memset(start, 0, end - start)


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def retained_heap() -> Iterator[bool]:
    """:func:`heap_retention` on inside the block; glibc's steady state and a release on exit."""
    enabled = heap_retention(True)
    try:
        yield enabled
    finally:
        if enabled:
            heap_retention(False)
            release_heap()
